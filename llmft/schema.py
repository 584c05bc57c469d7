"""The one conversation schema every entry point uses: roles, validation, row -> messages, and the file readers.

A training row is either
  messages            [{role, content, tool_calls?, tool_call_id?, name?}, ...]
  prompt/completion   both strings (plain text, no chat template), or both lists of messages
Roles are system, user, assistant and tool. `conversation_problems` is the only definition of a valid
conversation: training, `llmft data report` and `llmft data convert` all call it; builds call it with
`strict=True`, which adds the checks a clean dataset should pass but a training run can tolerate (alternating
turns, ending on the assistant, no empty or misplaced messages). Light: no torch, no transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
MESSAGES, PROMPT_COMPLETION = "messages", "prompt_completion"
ROW = "_row"  # column holding a row's 1-based number in its source file (kept through shuffled splits)
MAX_LISTED = 20  # problems listed in one error; the rest are counted
Messages = list[dict[str, Any]]


class RowError(ValueError):
    """One row that cannot be read or converted: which field, and what is wrong with it (reported per row)."""

    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"field '{field}': {problem}" if field else problem)


# Kinds of rows -------------------------------------------------------------------------------------------------


def kind_of(columns: set[str] | list[str], source: str) -> str:
    """'messages' or 'prompt_completion', from a dataset's columns."""
    columns = set(columns)
    if MESSAGES in columns:
        return MESSAGES
    if {"prompt", "completion"} <= columns:
        return PROMPT_COMPLETION
    raise DataError(
        f"{source}: no 'messages' column and no 'prompt'/'completion' columns (found {sorted(columns)}). "
        "Convert the data first (llmft data convert), or rename its columns."
    )


@dataclass(frozen=True)
class Example:
    """A row as one conversation. Assistant messages before `first_trainable` carry no loss (they belong to a
    conversational prompt); `plain_text` rows (prompt/completion strings) are rendered without a chat template."""

    messages: Messages
    first_trainable: int = 0
    plain_text: bool = False


def example(row: dict[str, Any], kind: str) -> Example:
    if kind == MESSAGES:
        return Example(row[MESSAGES])
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                       plain_text=True)
    return Example(list(prompt) + list(completion), first_trainable=len(prompt))


def prompt_and_reference(row: dict[str, Any], kind: str) -> tuple[Messages | str, str]:
    """What a model is asked (the conversation before the last assistant message, or the prompt text) and the
    answer it should give (that message)."""
    ex = example(row, kind)
    if ex.plain_text:
        return row["prompt"], row["completion"]
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return ex.messages[:last], ex.messages[last]["content"]


# Validation ----------------------------------------------------------------------------------------------------


def conversation_problems(messages: Any, strict: bool = False, name: str = MESSAGES) -> list[str]:
    """What makes a conversation unfit to train on, each as 'FIELD: problem'; [] when it is fine.

    Always: a non-empty list of message objects with a known role and string content, an assistant answer that is
    not empty (unless it only calls tools), at least one assistant message, and a user message first after any
    system prompt. With `strict` (dataset builds), also: system messages only first, no empty message, turns
    alternating (tool results right after the assistant's tool call), and the assistant speaking last.
    """
    if not isinstance(messages, list) or not messages:
        return [f"{name}: must be a non-empty list of {{role, content}} objects."]
    problems = []
    for i, message in enumerate(messages):
        problems += _message_problems(message, f"{name}[{i}]", i, strict)
    roles = [(i, m.get("role")) for i, m in enumerate(messages) if isinstance(m, dict)]
    turns = [(i, r) for i, r in roles if r != "system"]
    if not any(r == "assistant" for _, r in turns):
        return problems + [f"{name}: no assistant message, so nothing would be trained."]
    if turns[0][1] != "user":
        problems.append(f"{name}[{turns[0][0]}]: the conversation starts with '{turns[0][1]}'; start with 'user'.")
    if strict:
        problems += _turn_order_problems(turns, name)
    return problems


def _message_problems(message: Any, where: str, index: int, strict: bool) -> list[str]:
    if not isinstance(message, dict):
        return [f"{where}: not an object with 'role' and 'content'."]
    role, content, calls = message.get("role"), message.get("content"), message.get("tool_calls")
    problems = []
    if role not in ROLES:
        problems.append(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}.")
    if content is None and calls:
        return problems  # an assistant turn that only calls tools
    if not isinstance(content, str):
        return problems + [f"{where}.content: must be a string, got {type(content).__name__}."]
    if not content.strip() and not calls and (role == "assistant" or strict):
        problems.append(f"{where}.content: empty" + (": an empty answer teaches the model to say nothing."
                                                     if role == "assistant" else "."))
    if strict and role == "system" and index != 0:
        problems.append(f"{where}.role: a system message may only come first.")
    return problems


def _turn_order_problems(turns: list[tuple[int, str]], name: str) -> list[str]:
    problems = []
    for (_, prev), (i, role) in zip(turns, turns[1:]):
        if role == prev and role in ("user", "assistant"):
            problems.append(f"{name}[{i}]: two '{role}' messages in a row (turns must alternate).")
        if role == "tool" and prev not in ("assistant", "tool"):
            problems.append(f"{name}[{i}]: a tool result must follow an assistant tool call.")
    if turns[-1][1] != "assistant":
        problems.append(f"{name}[{turns[-1][0]}]: the conversation ends on '{turns[-1][1]}', not 'assistant'.")
    return problems


def row_problems(row: dict[str, Any], kind: str, strict: bool = False) -> list[str]:
    """Problems of one training row of either kind."""
    fields = [MESSAGES] if kind == MESSAGES else ["prompt", "completion"]
    missing = [f"{f}: missing." for f in fields if f not in row]
    if missing:
        return missing
    if kind == MESSAGES:
        return conversation_problems(row[MESSAGES], strict)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [] if completion.strip() else ["completion: empty: an empty answer teaches the model to say nothing."]
    if isinstance(prompt, list) and isinstance(completion, list):
        problems = conversation_problems(prompt + completion, strict, "prompt+completion")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
            problems.append("completion: no assistant message.")
        return problems
    return ["prompt, completion: must both be strings or both be lists of messages."]


def row_number(row: dict[str, Any], index: int) -> int:
    """The row's 1-based number in its source file (kept through splits), else its position here."""
    return row[ROW] if ROW in row else index + 1


def raise_problems(source: str, problems: list[str]) -> None:
    """One DataError listing the first problems (and counting the rest), or nothing."""
    if problems:
        listed = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{source}: {len(problems)} problem(s) (rows are 1-based):\n  " + "\n  ".join(listed) + more
                        + "\nFix these rows or remove them, then run again.")


def rows_problems(rows, kind: str, strict: bool = False) -> list[str]:
    """'row N: FIELD: problem' for every problem of every row."""
    return [f"row {row_number(row, i)}: {p}" for i, row in enumerate(rows) for p in row_problems(row, kind, strict)]


# Readers -------------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """(where, row) for every non-blank line, "file.jsonl, line 12"; a bad line comes as a RowError in its place."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, RowError(None, f"not valid JSON: {err.msg} at column {err.colno}")
                continue
            yield where, row if isinstance(row, dict) else RowError(None, f"not a JSON object: {type(row).__name__}")


def read_json(path: Path) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """A JSON array of objects, streamed item by item with ijson (a JSON-lines file named .json works too)."""
    import ijson

    with path.open("rb") as f:
        first = f.read(1024).lstrip()[:1]
    if first == b"{":  # one object per line, as many tools write '.json'
        yield from read_jsonl(path)
        return
    if first != b"[":
        raise DataError(f"{path}: expected a JSON array of objects (or one object per line).")
    number = 0
    with path.open("rb") as f:
        try:
            for number, row in enumerate(ijson.items(f, "item", use_float=True), start=1):
                where = f"{path.name}, row {number}"
                yield where, row if isinstance(row, dict) else RowError(None, f"not a JSON object: {type(row).__name__}")
        except ijson.JSONError as err:
            raise DataError(f"{path}: not valid JSON after row {number}: {err}") from err


def load_json_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a .jsonl or .json file; a DataError naming the first line or row that is not a JSON object."""
    rows = []
    reader = read_jsonl if path.suffix == ".jsonl" else read_json
    try:
        for where, row in reader(path):
            if isinstance(row, RowError):
                raise DataError(f"{where}: {row}. Fix or remove it.")
            rows.append(row)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}.") from err
    return rows


def file_fingerprint(source: str | Path, skip: str | None = None) -> dict[str, Any]:
    """sha256 over the bytes of a data file or of every file under a directory (sorted, less names starting with
    `skip`), with its size."""
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not (skip and p.name.startswith(skip))) \
        if path.is_dir() else [path]
    digest, size = hashlib.sha256(), 0
    for p in files:
        digest.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": size, "files": len(files)}
