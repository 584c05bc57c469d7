"""Cleaning converted conversations: normalisation, duplicates, and decontamination (checks: `llmft.schema`).

Each check returns what it found instead of dropping rows itself, so the caller counts every drop and its reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from llmft.schema import Messages

ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
WORD = re.compile(r"\w+", re.UNICODE)


# Normalisation -------------------------------------------------------------------------------------------------


def normalise_text(text: str) -> str:
    """NFC Unicode, no zero-width characters, \\n line endings, no trailing spaces on lines, no outer blank space.

    Indentation inside the text is kept: answers hold code.
    """
    text = unicodedata.normalize("NFC", text).translate(ZERO_WIDTH).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def normalise_messages(messages: Messages, system_prompt: str | None = None) -> Messages:
    """Messages with normalised content, and `system_prompt` first where the conversation has no system message."""
    return with_system([{**m, "content": normalise_text(m["content"])} if isinstance(m.get("content"), str)
                        else dict(m) for m in messages], system_prompt)


def with_system(messages: Messages, system_prompt: str | None) -> Messages:
    """`system_prompt` first where the conversation has no system message."""
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


# Duplicates ----------------------------------------------------------------------------------------------------


def conversation_text(messages: Messages) -> str:
    return "\n".join(m["content"] for m in messages if m.get("role") != "system" and isinstance(m.get("content"), str))


def exact_key(messages: Messages) -> str:
    """Equal for conversations that differ only in case and spacing (system prompts ignored)."""
    canon = [(m.get("role"), " ".join((m.get("content") or "").lower().split()), m.get("tool_calls"))
             + ((0,) if m.get("weight") == 0 else ()) for m in messages if m.get("role") != "system"]
    return hashlib.sha1(json.dumps(canon, sort_keys=True).encode()).hexdigest()


def shingles(text: str, n: int) -> set[str]:
    words = WORD.findall(text.lower())
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


@dataclass
class NearDuplicateFinder:
    """MinHash LSH over word shingles (datasketch): `seen` returns the id of an earlier near-duplicate, or None."""

    threshold: float = 0.85
    num_perm: int = 128
    shingle_size: int = 5
    _lsh: Any = field(init=False, repr=False)
    _signatures: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        from datasketch import MinHashLSH

        self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)

    def seen(self, key: str, text: str) -> str | None:
        from datasketch import MinHash

        signature = MinHash(num_perm=self.num_perm, seed=1)
        for shingle in shingles(text, self.shingle_size):
            signature.update(shingle.encode())
        # LSH finds candidates, some below the threshold (at 0.85, about 1 in 5 pairs at 0.8): their estimated
        # similarity decides
        matches = [m for m in self._lsh.query(signature) if signature.jaccard(self._signatures[m]) >= self.threshold]
        if matches:
            return sorted(matches)[0]
        self._lsh.insert(key, signature)
        self._signatures[key] = signature
        return None


# Held-out splits -----------------------------------------------------------------------------------------------


def group_keys(rows) -> list[str]:
    """One key per row of a dataset; rows that must stay on one side of a split share it: a prompt (pairs from one
    UltraFeedback row, KTO answers to one prompt), or a conversation's opening up to its first user message (OASST's
    threads of one tree). Any other row has a key of its own."""
    if "prompt" in rows.column_names:
        values = rows["prompt"]
    elif "messages" in rows.column_names:
        values = [next((m[: i + 1] for i, x in enumerate(m) if x.get("role") == "user"), None) for m in rows["messages"]]
    else:
        values = [None] * len(rows)
    return [exact_key(v) if isinstance(v, list) else f"#{i}" if v is None else f"text:{v}" for i, v in enumerate(values)]


def held_out_groups(keys: list[str], fraction: float, seed: int) -> list[int]:
    """The sorted indices of a seeded share of rows (at least `fraction`, as datasets' train_test_split sizes it),
    whole groups of equal keys at a time."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    wanted, held = math.ceil(fraction * len(keys)), []
    for group in order:
        if len(held) >= wanted:
            break
        held += group
    return sorted(held)


# Decontamination -----------------------------------------------------------------------------------------------


@dataclass
class EvalIndex:
    """Word n-grams of evaluation rows, to find training rows that share any (13 words, as GPT-3's filter did)."""

    n: int = 13
    owners: dict[str, str] = field(default_factory=dict)  # n-gram -> the first eval row that has it

    def add(self, eval_id: str, text: str) -> None:
        for gram in shingles(text, self.n):
            if len(gram.split()) == self.n:  # texts shorter than n words give no n-gram, so cannot match
                self.owners.setdefault(gram, eval_id)

    def hits(self, text: str) -> set[str]:
        """The eval rows this text shares an n-gram with."""
        return {self.owners[g] for g in shingles(text, self.n) if g in self.owners}
