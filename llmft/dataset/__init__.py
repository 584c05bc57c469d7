"""Building training datasets from the files users bring (`llmft data convert|build|report`).

formats     converters from Alpaca, ShareGPT, OpenAI, OASST, prompt/completion and plain columns to messages
preference  converters from preference formats (TRL pairs, LLaMA-Factory, HH-RLHF, UltraFeedback, OASST, KTO)
sources     streaming readers for local files and Hub datasets, each row labelled with where it came from
convert     one source: its options, its format (given or detected), each row converted or rejected with why
kinds       what differs between building conversations, preference pairs and KTO answers
clean       normalisation, duplicates and decontamination
build       the build: convert, check, clean, mix, split, write (dataset + manifest + card)
report      the pre-flight report: what training will see with a recipe's tokenizer and max_length
demo        the demo's dataset (dates in words -> ISO 8601), as conversations or preference pairs
"""
