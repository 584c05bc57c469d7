"""Evaluation: greedy generation on held-out prompts, scored by exact match against the reference answer."""

from __future__ import annotations

import re
import string
from typing import Any

import datasets
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmft.data import schema_of
from llmft.model import generate_texts


def prompts_and_references(rows: datasets.Dataset, limit: int) -> list[dict[str, Any]]:
    """Each held-out row as (prompt, reference): the conversation before its last assistant message, and that message."""
    schema = schema_of(rows, "eval data")
    items = []
    for row in rows.select(range(min(limit, len(rows)))):
        if schema == "messages":
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            items.append({"prompt": messages[:last], "reference": messages[last]["content"]})
        elif isinstance(row["prompt"], str):
            items.append({"prompt": row["prompt"], "reference": row["completion"]})
        else:
            answers = [m["content"] for m in row["completion"] if m["role"] == "assistant"]
            items.append({"prompt": row["prompt"], "reference": answers[-1]})
    return items


def normalise(text: str) -> str:
    """Lower case, no surrounding punctuation, single spaces: formatting noise is not what exact match tests."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(string.punctuation + " ")


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list, max_new_tokens: int,
             batch_size: int, desc: str = "Generating") -> list[str]:
    """Greedy answers, batched; chat prompts go through the tokenizer's chat template, text prompts as they are."""
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = prompts[start : start + batch_size]
        chat = not isinstance(batch[0], str)
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if chat else p
                 for p in batch]
        answers += generate_texts(model, tokenizer, texts, max_new_tokens=max_new_tokens,
                                  add_special_tokens=not chat)[0]
    return answers


def generation_eval(model, tokenizer, items: list[dict[str, Any]], max_new_tokens: int, batch_size: int,
                    desc: str) -> dict[str, Any]:
    """Exact match over `items`, with every answer kept for the side-by-side table."""
    answers = generate(model, tokenizer, [it["prompt"] for it in items], max_new_tokens, batch_size, desc)
    hits = [normalise(a) == normalise(it["reference"]) for a, it in zip(answers, items)]
    return {"exact_match": sum(hits) / len(hits), "answers": answers, "correct": hits}


def prompt_text(prompt) -> str:
    """The last user turn of a prompt, for display."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
