"""What differs between building conversations, preference pairs and unpaired answers: the columns written, how a
converted row is cleaned and checked, and which messages duplicates and contamination are judged on. Everything
else in a build (reading, counting, mixing, splitting, the manifest) is the same for all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets

from llmft.dataset.clean import normalise_messages, with_system
from llmft.schema import (MESSAGES, PREFERENCE, TEXT, UNPAIRED, Messages, clean_tools, conversation_problems,
                          preference_problems, tools_problems, unpaired_problems)

MESSAGE = {"role": datasets.Value("string"), "content": datasets.Value("string"), "tool_calls": datasets.Json(),
           "tool_call_id": datasets.Value("string"), "name": datasets.Value("string"),
           "reasoning_content": datasets.Value("string"), "weight": datasets.Value("int64")}
COMMON = {"tools": datasets.Json(), "source": datasets.Value("string"), "origin": datasets.Value("string")}


@dataclass(frozen=True)
class RowKind:
    name: str
    columns: dict[str, Any]  # the kind's own columns (tools, source and origin are common)
    message_fields: tuple[str, ...]  # columns holding messages (normalised)
    check: Callable[[dict[str, Any]], list[str]]  # problems of a built row (strict)
    key_fields: tuple[str, ...]  # the messages duplicates are judged on
    label: str  # what one row is, for messages
    as_messages: Callable[[dict[str, Any]], Messages] | None = None  # a row without messages, as messages to compare

    def features(self) -> datasets.Features:
        return datasets.Features({**self.columns, **COMMON})

    def record(self, result: Any, raw: Any, system_prompt: str | None, normalise: bool) -> dict[str, Any]:
        """A converted row as the dataset's columns (without source and origin), its messages normalised."""
        row = {MESSAGES: result} if self.name == MESSAGES else dict(result)
        for name in self.message_fields:
            system = system_prompt if name in (MESSAGES, "prompt") else None
            row[name] = normalise_messages(row[name], system) if normalise else with_system(row[name], system)
        row["tools"] = raw.get("tools") if isinstance(raw, dict) else None
        return row

    def problems(self, row: dict[str, Any]) -> list[str]:
        return self.check(row) + tools_problems(row.get("tools"))

    def stored(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**{k: row.get(k) for k in self.columns}, "tools": clean_tools(row.get("tools"))}

    def key_messages(self, row: dict[str, Any]) -> Messages:
        if self.as_messages:
            return self.as_messages(row)
        return [m for name in self.key_fields for m in row[name]]

    def all_messages(self, row: dict[str, Any]) -> Messages:
        if self.as_messages:
            return self.as_messages(row)
        return [m for name in self.message_fields for m in row[name]]


KINDS = {
    MESSAGES: RowKind(MESSAGES, {MESSAGES: datasets.List(MESSAGE)}, (MESSAGES,),
                      lambda row: conversation_problems(row[MESSAGES], strict=True), (MESSAGES,), "conversation"),
    PREFERENCE: RowKind(PREFERENCE, {"prompt": datasets.List(MESSAGE), "chosen": datasets.List(MESSAGE),
                                     "rejected": datasets.List(MESSAGE), "score_chosen": datasets.Value("float64"),
                                     "score_rejected": datasets.Value("float64")},
                        ("prompt", "chosen", "rejected"), lambda row: preference_problems(row, strict=True),
                        ("prompt",), "pair"),
    UNPAIRED: RowKind(UNPAIRED, {"prompt": datasets.List(MESSAGE), "completion": datasets.List(MESSAGE),
                                 "label": datasets.Value("bool")},
                      ("prompt", "completion"), lambda row: unpaired_problems(row, strict=True),
                      ("prompt", "completion"), "answer"),
    TEXT: RowKind(TEXT, {TEXT: datasets.Value("string")}, (), lambda row: _text_problems(row[TEXT]), (), "document",
                  as_messages=lambda row: [{"role": "user", "content": row[TEXT]}]),  # deduped on the whole text
}


def _text_problems(text: str) -> list[str]:
    return [] if text.strip() else ["text: empty document (no text to train on)."]
