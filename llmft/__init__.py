"""llmft: fine-tune open LLMs on your own chat data."""

__version__ = "0.1.0"
