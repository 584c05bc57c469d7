"""Converters from the formats users bring into the one chat format: `{"messages": [{role, content}, ...]}`.

Each converter is a small pure function from one raw row to a list of messages (OASST trees give several), and
raises `RowError(field, problem)` for a row it cannot convert. `detect_format` picks one from a row's keys
where that is unambiguous.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from llmft.schema import REASONING_FIELDS, Messages, RowError, weight_problem

# The speaker names ShareGPT-style data documents; any other is an error (or mapped with the source's role_map).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool", "function_response": "tool", "function_call": "assistant"}
SHAREGPT_CALLS = ("function_call",)  # speakers whose value is a tool call: {"name": ..., "arguments": {...}}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def text_of(row: dict, field: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError(field, "missing" if field not in row else "null" if value is None else "empty")
        return ""
    if not isinstance(value, str):
        raise RowError(field, f"must be a string, got {type(value).__name__}")
    return value


def from_alpaca(row: dict) -> Messages:
    """{instruction, input, output} with optional system and history [[user, assistant], ...]."""
    instruction, extra, output = text_of(row, "instruction"), text_of(row, "input", False), text_of(row, "output")
    messages: Messages = []
    if text_of(row, "system", False):
        messages.append({"role": "system", "content": row["system"]})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("history", f"must be a list of [user, assistant] pairs, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)):
            raise RowError(f"history[{i}]", "must be a [user, assistant] pair of non-empty strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def from_sharegpt(row: dict, role_map: dict[str, str] | None = None) -> Messages:
    """{conversations: [{from: human|gpt|system|..., value}]}; `user`/`assistant` role names work too, and the
    speakers `role_map` names (e.g. {"bing": "assistant"})."""
    roles = {**SHAREGPT_ROLES, **(role_map or {})}
    field = "conversations" if "conversations" in row else "messages"
    turns = row.get(field)
    if not isinstance(turns, list) or not turns:
        raise RowError(field, "must be a non-empty list of {from, value} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{field}[{i}]", "must be an object with 'from' and 'value'")
        speaker = turn.get("from", turn.get("role"))
        if not isinstance(speaker, str) or speaker not in roles:
            raise RowError(f"{field}[{i}].from", f"unknown speaker {speaker!r}; expected one of {sorted(roles)} (map "
                                                 "others with --role-map SPEAKER=ROLE)")
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise RowError(f"{field}[{i}].value", f"must be a string, got {type(value).__name__}")
        if speaker in SHAREGPT_CALLS:
            messages.append({"role": "assistant", "content": "", "tool_calls": [_sharegpt_call(value, f"{field}[{i}]")]})
        elif roles[speaker] == "tool":
            messages.append({"role": "tool", "content": value, **_called_name(messages)})
        else:
            messages.append({"role": roles[speaker], "content": value})
    return messages


def _sharegpt_call(value: str, where: str) -> dict:
    """A ShareGPT function_call value (JSON: {"name": ..., "arguments": {...}}) as an OpenAI tool call."""
    try:
        call = json.loads(value)
    except json.JSONDecodeError as err:
        raise RowError(f"{where}.value", f"a function call must be JSON {{name, arguments}}: {err.msg}") from err
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise RowError(f"{where}.value", "a function call must be a JSON object with a 'name'")
    arguments = call.get("arguments", call.get("parameters", {}))
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}


def _called_name(messages: Messages) -> dict:
    """The name of the tool whose result this is: the latest call before it (templates label results by name)."""
    for message in reversed(messages):
        for call in reversed(message.get("tool_calls") or []):
            return {"name": call["function"]["name"]}
    return {}


def from_openai(row: dict) -> Messages:
    """{messages: [{role, content, tool_calls?, tool_call_id?, name?}]}: kept as they are, tool calls included."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise RowError(f"messages[{i}]", "must be an object with 'role' and 'content'")
        weight = weight_problem(message.get("weight"), message["role"])
        if weight:
            raise RowError(f"messages[{i}].weight", weight)
        kept = {k: v for k, v in message.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name")}
        if message.get("weight") == 0:
            kept["weight"] = 0  # context only: an answer the conversation goes on from, not learned
        trace = next((message[f] for f in REASONING_FIELDS if message.get(f)), None)
        if trace is not None:
            kept["reasoning_content"] = trace  # one name for the trace, whatever the data called it
        if kept.get("content") is None and kept.get("tool_calls"):
            kept["content"] = ""  # an assistant turn that only calls tools
        out.append(kept)
    return out


def from_prompt_completion(row: dict) -> Messages:
    """{prompt, completion} as strings, or as message lists (TRL's conversational prompt-completion: the prompt's
    own assistant turns become context only, weight 0, so only the completion is learned, as TRL trains it)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = from_openai({"messages": prompt + completion})
        return [{**m, "weight": 0} if i < len(prompt) and m["role"] == "assistant" else m
                for i, m in enumerate(messages)]
    return [{"role": "user", "content": text_of(row, "prompt")}, {"role": "assistant", "content": text_of(row, "completion")}]


def from_text(row: dict) -> dict[str, str]:
    """A raw document for continued pretraining: {"text": ...} (a .txt file, or JSONL/Parquet with a text column)."""
    text = row.get("text")
    if not isinstance(text, str):
        raise RowError("text", "missing" if text is None else f"{type(text).__name__}, not a string")
    return {"text": text}


def from_columns(row: dict, prompt: str, completion: str, system: str | None = None) -> Messages:
    """Plain columns named by the source's prompt_field, completion_field (and system_field), e.g. GSM8K's
    {question, answer}."""
    for name, flag in ((prompt, "--prompt-field"), (completion, "--completion-field"), (system, "--system-field")):
        if name and name not in row:  # the default column names (question, answer) are not this data's
            raise RowError(name, f"missing (the row's columns: {', '.join(map(str, row))}; name the right one "
                                 f"with {flag})")
    messages = [{"role": "system", "content": text_of(row, system)}] if system else []
    return messages + [{"role": "user", "content": text_of(row, prompt)},
                       {"role": "assistant", "content": text_of(row, completion)}]


# OASST message trees -------------------------------------------------------------------------------------------


def oasst_paths(root: dict, best_only: bool) -> list[Messages]:
    """Every root-to-leaf conversation of a nested tree ({text, role, replies: [...]}), or only the best-ranked one.

    Ranks follow OASST: a lower `rank` is better; replies without a rank come after ranked ones. Replies marked
    `deleted: true` are left out (`oasst_deleted` counts them).
    """
    def best(replies):
        return [min(replies, key=lambda pair: reply_rank(pair[1]))] if best_only and replies else replies

    return [path for _, path, _, replies in oasst_walk(root, best) if not replies]


def oasst_walk(root: dict, choose=lambda replies: replies) -> Iterator[tuple[dict, Messages, str, list]]:
    """(message, the thread through it, where, the replies walked on) for each message of a tree, depth first, going
    on into the (index, reply) pairs `choose` keeps. A stack, not recursion: a tree may be as deep as its JSON."""
    stack = [(root, [], "prompt")]
    while stack:
        node, path, where = stack.pop()
        if not isinstance(node, dict):
            raise RowError(where, f"must be a message object {{text, role, replies}}, got {type(node).__name__}")
        role = node.get("role")
        if not isinstance(role, str) or role not in OASST_ROLES:
            raise RowError(f"{where}.role", f"expected 'prompter' or 'assistant', got {role!r}")
        path = path + [{"role": OASST_ROLES[role], "content": text_of(node, "text")}]
        replies = choose(live_replies(node, where))
        yield node, path, where, replies
        stack += [(reply, path, f"{where}.replies[{i}]") for i, reply in reversed(replies)]


def live_replies(node: dict, where: str) -> list[tuple[int, Any]]:
    """(index, reply) of a node's replies that are not deleted."""
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise RowError(f"{where}.replies", f"must be a list of messages, got {type(replies).__name__}")
    return [(i, r) for i, r in enumerate(replies) if not (isinstance(r, dict) and r.get("deleted") is True)]


def oasst_deleted(root: Any) -> int:
    """Replies marked deleted anywhere in a tree (left out of its conversations, and counted)."""
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        replies = node.get("replies") if isinstance(node, dict) else None
        for reply in replies if isinstance(replies, list) else []:
            if isinstance(reply, dict) and reply.get("deleted") is True:
                count += 1
            else:
                stack.append(reply)
    return count


def reply_rank(reply) -> tuple[bool, float]:
    """Sort key of a reply: ranked ones first, lower rank better (a rank that is not a number counts as unranked)."""
    rank = reply.get("rank") if isinstance(reply, dict) else None
    usable = isinstance(rank, (int, float)) and not isinstance(rank, bool) and rank == rank
    return (not usable, rank if usable else 0)


def oasst_flat_to_trees(rows: Iterable[dict]) -> tuple[list[dict], list[tuple[str, RowError]]]:
    """Flat OASST rows (message_id, parent_id, text, role, rank) as nested trees, one per root message; and the
    messages that cannot be placed, each with why: a repeated id, a parent that is not in the rows (the orphan's
    whole thread is left out), or a cycle of parent ids that no root reaches."""
    nodes, children, parents, problems = {}, defaultdict(list), {}, []
    for row in rows:
        message_id = row["message_id"]
        if message_id in nodes:
            problems.append((message_id, RowError("message_id", "repeats an earlier message's id (the first one is "
                                                                "kept)")))
            continue
        nodes[message_id] = {"text": row.get("text"), "role": row.get("role"), "rank": row.get("rank"),
                             "deleted": row.get("deleted", False) is True, "replies": []}
        parents[message_id] = row.get("parent_id")
        children[row.get("parent_id")].append(message_id)
    for parent, kids in children.items():
        if parent in nodes:
            nodes[parent]["replies"] = [nodes[k] for k in kids]
    roots = children.get(None, [])
    reached = _below(roots, children)
    for message_id, parent in parents.items():
        if parent is not None and parent not in nodes:
            size = len(_below([message_id], children))
            problems.append((message_id, RowError("parent_id", f"names no message in the file (its thread of {size} "
                                                               "message(s) is left out)")))
            reached |= _below([message_id], children)
    problems += [(m, RowError("parent_id", "is part of a cycle of parent ids: no root message above it"))
                 for m in parents if m not in reached]
    return [nodes[k] for k in roots], problems


def _below(ids: list, children: dict) -> set:
    """The ids given and every message under them."""
    seen, stack = set(), list(ids)
    while stack:
        message_id = stack.pop()
        if message_id not in seen:
            seen.add(message_id)
            stack += children.get(message_id, [])
    return seen


def trim_to_answer(path: Messages) -> Messages | None:
    """An OASST thread up to its last assistant reply (a prompter message nobody answered teaches nothing), or None
    when no assistant replied at all."""
    last = max((i for i, m in enumerate(path) if m["role"] == "assistant"), default=None)
    return None if last is None else path[: last + 1]


# Detection -----------------------------------------------------------------------------------------------------

FORMATS = ("alpaca", "sharegpt", "openai", "prompt_completion", "columns", "oasst", "text")
CONVERTERS: dict[str, Callable[[dict], Messages]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "openai": from_openai,
    "prompt_completion": from_prompt_completion,
}


def detect_format(row: dict) -> str:
    """The format a row's keys say it is in; a clear error naming the keys when they say nothing certain."""
    keys = set(row)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        first = row["messages"][0] if isinstance(row["messages"], list) and row["messages"] else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "openai"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "message_tree_id" in keys and isinstance(row.get("prompt"), dict) or {"message_id", "parent_id", "role", "text"} <= keys:
        return "oasst"
    if isinstance(row.get("text"), str):
        return "text"
    raise ValueError(
        f"cannot tell the format from the keys {sorted(keys)}. Pass --format ({', '.join(FORMATS)}); for plain "
        "columns: --format columns --prompt-field QUESTION_COLUMN --completion-field ANSWER_COLUMN"
    )
