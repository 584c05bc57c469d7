"""Generated data: self-chat dialogues (Baize) and augmentation, through local or OpenAI-compatible backends.

backends  a local transformers model or an OpenAI-compatible server, batched; their options
selfchat  `llmft selfchat`: one model writes both sides of dialogues about seed questions; resumable
augment   `llmft augment`: paraphrase or back-translate the user turns of a dataset
"""
