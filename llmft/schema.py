"""The one conversation schema every entry point uses: roles, validation, row -> messages, and the file readers.

A training row is one of
  messages            [{role, content, tool_calls?, tool_call_id?, name?, reasoning_content?}, ...]
  prompt/completion   both strings (plain text, no chat template), or both lists of messages
  preference          prompt (messages ending on the user), chosen and rejected (the assistant's answers, as
                      messages), optional score_chosen / score_rejected: DPO, ORPO, SimPO and reward models
  unpaired            prompt (messages), completion (the assistant's answer), label (true: desirable): KTO
with an optional `tools` column: the OpenAI-format tool schemas the conversation may call. Roles are system, user,
assistant and tool; an assistant message may carry `tool_calls` ([{type: function, function: {name, arguments}}])
and its reasoning (`reasoning_content`, or a `<think>...</think>` block at the start of its content). `conversation_problems` is the only definition of a valid
conversation: training, `llmft data report` and `llmft data convert` all call it; builds call it with
`strict=True`, which adds the checks a clean dataset should pass but a training run can tolerate (alternating
turns, ending on the assistant, no empty or misplaced messages). Light: no torch, no transformers.
"""

from __future__ import annotations

import hashlib
import logging
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
MESSAGES, PROMPT_COMPLETION, PREFERENCE, UNPAIRED = "messages", "prompt_completion", "preference", "unpaired"
TEXT = "text"  # raw documents for continued pretraining
PROMPT_ONLY = "prompt_only"  # prompts for online RL, with a reference (or answer) column for the rewards
KINDS = (MESSAGES, PROMPT_COMPLETION, PREFERENCE, UNPAIRED, TEXT, PROMPT_ONLY)
COLUMNS = {MESSAGES: ("messages",), PROMPT_COMPLETION: ("prompt", "completion"),
           PREFERENCE: ("prompt", "chosen", "rejected"), UNPAIRED: ("prompt", "completion", "label"), TEXT: ("text",),
           PROMPT_ONLY: ("prompt",)}
REFERENCE_COLUMNS = ("reference", "answer")  # where a prompt-only row keeps its reference answer
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")  # names datasets and templates use for a trace
THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
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
    """The kind of rows a dataset holds (one of KINDS), from its columns."""
    columns = set(columns)
    if {MESSAGES, "label"} <= columns and not set(COLUMNS[UNPAIRED]) <= columns:
        raise DataError(f"{source}: conversations with a 'label' column (KTO's desirable or not): trained as they are, "
                        "the undesirable answers would be learned. Convert them to KTO rows (llmft data convert "
                        "--format kto), or drop the column to learn every conversation.")
    for kind in (PREFERENCE, UNPAIRED, MESSAGES, PROMPT_COMPLETION, TEXT):  # the most specific first
        if set(COLUMNS[kind]) <= columns:
            return kind
    if "prompt" in columns and columns & set(REFERENCE_COLUMNS) and not columns & {"chosen", "rejected"}:
        return PROMPT_ONLY  # a prompt and its reference answer, nothing else a training row needs
    raise DataError(
        f"{source}: none of the columns of a training row (found {sorted(columns)}): 'messages'; 'prompt' and "
        "'completion'; 'prompt', 'chosen' and 'rejected' (preference pairs); or 'prompt', 'completion' and 'label' "
        "(KTO); 'text' (raw documents, for continued pretraining); or 'prompt' with 'reference' or 'answer' (prompts "
        "for grpo). Convert the data first (llmft data convert), or rename its columns."
    )


@dataclass(frozen=True)
class Example:
    """A row as one conversation, its messages cleaned (`clean_messages`). Assistant messages before
    `first_trainable` carry no loss (they belong to a conversational prompt); `plain_text` rows (prompt/completion
    strings) are rendered without a chat template; `tools` are the tool schemas the template is given."""

    messages: Messages
    first_trainable: int = 0
    plain_text: bool = False
    tools: list[dict[str, Any]] | None = None


def example(row: dict[str, Any], kind: str, answer: str = "chosen") -> Example:
    """A row as one conversation; for a preference row, the prompt followed by its `answer` (chosen or rejected)."""
    tools = clean_tools(row.get("tools"))
    if kind == PREFERENCE:
        prompt = clean_messages(row["prompt"])
        return Example(prompt + clean_messages(row[answer]), first_trainable=len(prompt), tools=tools)
    if kind == MESSAGES:
        return Example(clean_messages(row[MESSAGES]), tools=tools)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                       plain_text=True)
    return Example(clean_messages(list(prompt) + list(completion)), first_trainable=len(prompt), tools=tools)


def clean_messages(messages: Messages) -> Messages:
    """Messages as templates expect them: no field that is None (columnar storage gives every message every
    field; templates test `'tool_calls' in message`), tool-call arguments as objects, not JSON text."""
    return [_clean_message(m) for m in messages]


def _clean_message(message: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.items() if v is not None}
    if out.get("tool_calls"):
        out["tool_calls"] = [_clean_call(call) for call in out["tool_calls"]]
    elif "tool_calls" in out:
        del out["tool_calls"]
    return out


def _clean_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    function.setdefault("arguments", {})  # a call without arguments: templates serialise what is there
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"] or "{}")
        except json.JSONDecodeError:
            pass  # left as text; validation names it
    return {**{k: v for k, v in call.items() if v is not None}, "type": call.get("type") or "function",
            "function": function}


def clean_tools(tools: Any) -> list[dict[str, Any]] | None:
    """A row's tool schemas in OpenAI's form ([{type: function, function: {name, description, parameters}}]), from
    that form, a bare list of function schemas, or either as JSON text (ShareGPT exports); None when there are none."""
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    if not tools:
        return None
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def reasoning_of(message: dict[str, Any]) -> tuple[str | None, str]:
    """(the message's reasoning trace, its content without one): from a reasoning field, or a leading <think> block."""
    content = message.get("content") or ""
    trace = next((message[f] for f in REASONING_FIELDS if message.get(f)), None)
    match = THINK.match(content) if isinstance(content, str) else None
    if match:
        return trace or match.group(1).strip(), content[match.end():]
    return trace, content


def without_reasoning(text: str) -> str:
    """A generated or reference answer without its reasoning: what answer metrics compare. The block may have lost
    its opening <think> (pre-filled by the generation prompt, or decoded away as a special token). A block never
    closed (cut off by the length limit) holds no answer: nothing of it is one."""
    match = THINK.match(text)
    if match:
        return text[match.end():]
    if text.lstrip().startswith("<think>") and "</think>" not in text:
        return ""
    close = text.find("</think>")
    return text[close + len("</think>"):].lstrip() if close >= 0 and "<think>" not in text[:close] else text


def prompt_and_reference(row: dict[str, Any], kind: str) -> tuple[Messages | str, str]:
    """What a model is asked (the conversation before the last learned assistant message, or the prompt text) and
    the answer it should give (that message's content, without its reasoning; a pair's chosen answer; an unpaired
    row's answer, which callers take only where it is labelled desirable)."""
    if kind == PROMPT_ONLY:
        column = next((c for c in REFERENCE_COLUMNS if c in row), None)
        value = None if column is None else row[column]
        return row["prompt"], "" if value is None else str(value)
    ex = example(row, PROMPT_COMPLETION if kind == UNPAIRED else kind)
    if ex.plain_text:
        return row["prompt"], row["completion"]
    last = max(i for i, m in enumerate(ex.messages) if trainable(m))  # a context-only answer is not a reference
    prompt = [{k: v for k, v in m.items() if k != "weight"} for m in ex.messages[:last]]  # a training-only field
    return prompt, reasoning_of(ex.messages[last])[1]


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
    if not any(isinstance(m, dict) and trainable(m) for m in messages):
        problems.append(f"{name}: every assistant message has weight 0, so nothing would be trained.")
    if turns[0][1] != "user":
        problems.append(f"{name}[{turns[0][0]}]: the conversation starts with '{turns[0][1]}'; start with 'user'.")
    if strict:
        problems += _turn_order_problems(turns, name)
    return problems


TEXT_FIELDS = ("name", "tool_call_id", "reasoning_content")  # optional message fields that must be text


def weight_problem(weight: Any, role: Any = "assistant") -> str | None:
    """OpenAI fine-tuning's per-answer `weight`: 1 learns the answer, 0 keeps it as context only (a bad answer the
    conversation goes on from, or an earlier turn of a conversational prompt). Nothing else has a meaning."""
    if weight is None:
        return None
    if role != "assistant":
        return (f"{weight!r} on a {role!r} message: only assistant answers are learned, so only they take a weight "
                "(0: context only, 1: learned). Remove the key.")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        return f"{weight!r}: must be 1 (learn this answer) or 0 (context only, not learned), as OpenAI's format has it."
    return None


def trainable(message: dict[str, Any]) -> bool:
    """An assistant message whose answer is learned (not marked weight 0)."""
    return message.get("role") == "assistant" and message.get("weight") != 0


def _message_problems(message: Any, where: str, index: int, strict: bool) -> list[str]:
    if not isinstance(message, dict):
        return [f"{where}: not an object with 'role' and 'content'."]
    role, content, calls = message.get("role"), message.get("content"), message.get("tool_calls")
    problems = []
    if role not in ROLES:
        problems.append(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}.")
    if calls:
        problems += _calls_problems(calls, f"{where}.tool_calls", role)
    weight = weight_problem(message.get("weight"), role)
    if weight:
        problems.append(f"{where}.weight: {weight}")
    for key in TEXT_FIELDS:  # stored as text columns: a number or object would be turned into a string silently
        value = message.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{where}.{key}: must be a string, got {type(value).__name__}.")
    if content is None and calls:
        return problems  # an assistant turn that only calls tools
    if not isinstance(content, str):
        return problems + [f"{where}.content: must be a string, got {type(content).__name__}."]
    if not content.strip() and not calls and ((role == "assistant" and message.get("weight") != 0) or strict):
        problems.append(f"{where}.content: empty" + (": an empty answer teaches the model to say nothing."
                                                     if role == "assistant" else "."))
    if strict and role == "system" and index != 0:
        problems.append(f"{where}.role: a system message may only come first.")
    return problems


def _calls_problems(calls: Any, where: str, role: Any) -> list[str]:
    if role != "assistant":
        return [f"{where}: only assistant messages call tools."]
    if not isinstance(calls, list):
        return [f"{where}: must be a list of {{type: function, function: {{name, arguments}}}} objects."]
    problems = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            problems.append(f"{where}[{i}].function.name: missing (a call is {{type: function, function: {{name, "
                            "arguments}}}}).")
            continue
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                problems.append(f"{where}[{i}].function.arguments: not valid JSON.")
                continue
        if arguments is not None and not isinstance(arguments, dict):
            problems.append(f"{where}[{i}].function.arguments: must be an object of argument names and values.")
    return problems


def tools_problems(tools: Any) -> list[str]:
    """Problems of a row's `tools` column (None or empty means no tools)."""
    try:
        cleaned = clean_tools(tools)
    except (json.JSONDecodeError, TypeError, AttributeError):
        return ["tools: not a list of tool schemas (or its JSON text)."]
    problems = []
    for i, tool in enumerate(cleaned or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            problems.append(f"tools[{i}]: needs a function name ({{type: function, function: {{name, description, "
                            "parameters}}}}).")
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
    """Problems of one training row of any kind."""
    missing = [f"{f}: missing." for f in COLUMNS[kind] if f not in row]
    if missing:
        return missing
    if kind == TEXT:  # an empty document is counted when it is tokenized, not refused
        return [] if isinstance(row[TEXT], str) else [f"text: {type(row[TEXT]).__name__}, not a string."]
    if kind == PROMPT_ONLY:
        return prompt_problems(row["prompt"])
    tools = tools_problems(row.get("tools"))
    if kind == PREFERENCE:
        return preference_problems(row, strict) + tools
    if kind == UNPAIRED:
        return unpaired_problems(row, strict) + tools
    if kind == MESSAGES:
        return conversation_problems(row[MESSAGES], strict) + tools
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [] if completion.strip() else ["completion: empty: an empty answer teaches the model to say nothing."]
    if isinstance(prompt, list) and isinstance(completion, list):
        problems = conversation_problems(prompt + completion, strict, "prompt+completion")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
            problems.append("completion: no assistant message.")
        elif not any(isinstance(m, dict) and trainable(m) for m in completion):
            problems.append("completion: every assistant message has weight 0, so nothing would be trained.")
        return problems + tools
    return ["prompt, completion: must both be strings or both be lists of messages."]


def preference_problems(row: dict[str, Any], strict: bool = False) -> list[str]:
    """A pair: a prompt that ends on the user, two different answers that each make a valid conversation with it,
    and scores (when given) that are numbers."""
    problems = _prompt_problems(row.get("prompt"))
    if problems:
        return problems
    for answer in ("chosen", "rejected"):
        problems += _answer_problems(row["prompt"], row.get(answer), answer, strict)
    if not problems and _answer_text(row["chosen"]) == _answer_text(row["rejected"]):
        problems.append("chosen, rejected: the same answer, so the pair teaches nothing.")
    for score in ("score_chosen", "score_rejected"):
        value = row.get(score)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
            problems.append(f"{score}: must be a number, got {value!r}.")
    return problems


def unpaired_problems(row: dict[str, Any], strict: bool = False) -> list[str]:
    """An unpaired answer (KTO): a prompt that ends on the user, an answer, and whether it is desirable."""
    problems = _prompt_problems(row.get("prompt")) or _answer_problems(row["prompt"], row.get("completion"),
                                                                        "completion", strict)
    if not isinstance(row.get("label"), bool):
        problems.append(f"label: must be true (desirable) or false (undesirable), got {row.get('label')!r}.")
    return problems


def prompt_problems(prompt: Any) -> list[str]:
    """A prompt on its own (GRPO's prompt-only rows): non-empty text, or messages that end on the user's."""
    if isinstance(prompt, str):
        return [] if prompt.strip() else ["prompt: empty."]
    problems = _prompt_problems(prompt)
    return problems or conversation_problems(prompt + [{"role": "assistant", "content": "-"}], name="prompt")


def _prompt_problems(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return ["prompt: text where a list of messages goes (TRL's plain-text pairs): convert the file first, "
                "llmft data convert FILE --out DIR, and train on DIR."]
    if not isinstance(prompt, list) or not prompt:
        return ["prompt: must be a non-empty list of messages ending on the user's."]
    last = prompt[-1].get("role") if isinstance(prompt[-1], dict) else None
    if last not in ("user", "tool"):
        return [f"prompt: ends on {last!r}; a prompt ends on the user's message (the answers follow it)."]
    return []


def _answer_problems(prompt: Messages, answer: Any, name: str, strict: bool) -> list[str]:
    if not isinstance(answer, list) or len(answer) != 1:
        return [f"{name}: must be a list holding the assistant's one answer message."]
    if not isinstance(answer[0], dict) or answer[0].get("role") != "assistant":
        return [f"{name}[0]: must be the assistant's answer (role 'assistant')."]
    if answer[0].get("weight") == 0:
        return [f"{name}[0].weight: 0 (context only) on the answer a pair or a labelled answer is about; remove it."]
    return conversation_problems(prompt + answer, strict, f"prompt+{name}")


def _answer_text(answer: Messages) -> str:
    return json.dumps([(m.get("content"), m.get("tool_calls")) for m in answer if isinstance(m, dict)], default=str)


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


# A file or folder name that is a split's, as Hub datasets name them: train.jsonl, test-00000-of-00001.parquet,
# validation/ (the word alone, or with a shard number: train_notes.jsonl or testing_plan.txt are not splits).
SPLIT_NAME = re.compile(r"^(train|test|validation|valid|val|dev|eval)(?:-\d{5}-of-\d{5}|-\d+)?$")
SPLIT_KIND = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "test"}


def data_files(files: list[Path], root: Path, check_splits: bool = True) -> list[Path]:
    """The data files among `files` (found under the folder `root`): .txt files are documents, except in a folder
    that also holds data files (a README.txt or LICENSE.txt beside train.jsonl is not data); files under hidden
    folders (.ipynb_checkpoints/, .git/) are not data either; those skipped are logged. A folder whose files are
    named for different splits (train.jsonl beside test.jsonl, as Hub datasets are laid out) is refused unless
    `check_splits` is off (eval sets, where every split is wanted): read as one, its test rows would be trained on."""
    log = logging.getLogger(__name__)
    if is_saved_dataset(root):
        raise DataError(f"{root}: a dataset llmft data convert/build (or datasets' save_to_disk) wrote, not source "
                        "files: train on it as it is (a recipe's data.train_data), or convert the files it was made "
                        "from.")
    hidden = [p for p in files if any(part.startswith(".") for part in p.relative_to(root).parts)]
    if hidden:
        log.warning("Not reading %d file(s) under hidden folders or with hidden names: %s", len(hidden),
                    ", ".join(str(p.relative_to(root)) for p in hidden[:5]))
    outputs = [p for p in files if any(is_saved_dataset(root / folder) for folder in p.relative_to(root).parents
                                       if folder != Path("."))]
    if outputs:  # an earlier --out inside the source folder: its manifest and rejects are not source rows
        log.warning("Not reading %d file(s) of datasets written inside the folder: %s", len(outputs),
                    ", ".join(str(p.relative_to(root)) for p in outputs[:5]))
    files = [p for p in files if p not in hidden and p not in outputs]
    folders_with_data = {p.parent for p in files if p.suffix != ".txt"}
    skipped = [p for p in files if p.suffix == ".txt" and p.parent in folders_with_data]
    if skipped:
        log.warning("Not reading %d .txt file(s) beside data files as documents: %s",
                    len(skipped), ", ".join(p.name for p in skipped[:5]))
    files = [p for p in files if p not in skipped]
    splits = {}
    for path in files if check_splits else []:
        split = _split_of(path.relative_to(root)) if path.suffix != ".txt" else None  # documents' names are free
        if split:
            splits.setdefault(split, []).append(str(path.relative_to(root)))
    if len(splits) > 1:
        named = "; ".join(f"{split}: {', '.join(names[:3])}" for split, names in sorted(splits.items()))
        raise DataError(f"{root}: this folder holds files of different splits ({named}); read as one dataset, the "
                        "held-out rows would be trained on. Point at the training file or folder itself (a recipe "
                        "takes the held-out one as data.eval_data).")
    return files


def is_saved_dataset(folder: Path) -> bool:
    """A folder llmft data convert/build wrote (manifest.json beside its train/ or data_card.md), or a save_to_disk
    dataset."""
    built = (folder / "train").is_dir() or (folder / "data_card.md").is_file()
    return ((folder / "manifest.json").is_file() and built) or (
        (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file())


def _split_of(relative: Path) -> str | None:
    """The split a file's folders or name say it holds (the first that does), or None."""
    for part in (*relative.parts[:-1], relative.stem):
        match = SPLIT_NAME.match(part.lower())
        if match:
            return SPLIT_KIND.get(match.group(1), match.group(1))
    return None


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Windows tools write at the start of a file


def read_jsonl(path: Path, name: str | None = None) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """(where, row) for every non-blank line, "file.jsonl, line 12" (`name` in place of the file's name); a bad line
    (not UTF-8, not JSON, not an object, text JSON allows but UTF-8 cannot hold) comes as a RowError in its place."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{name or path.name}, line {number}"
            try:
                line = (raw[len(BOM):] if number == 1 and raw.startswith(BOM) else raw).decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                yield where, RowError(None, f"not UTF-8 text (byte {err.start + 1} of the line): save the file as "
                                            "UTF-8")
                continue
            if not line.strip():
                continue
            row = _parse_line(line)
            if isinstance(row, RowError) and line.strip() in ("[", "{"):  # the start of one JSON document
                raise DataError(f"{where}: '{line.strip()}' alone: this file holds one JSON document spread over "
                                "many lines (pretty-printed), not one JSON object per line. Name it .json, or write "
                                "one row per line.")
            yield where, row


def _parse_line(line: str) -> dict[str, Any] | RowError:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return RowError(None, f"not valid JSON: {err.msg} at column {err.colno}")
    except RecursionError:
        return RowError(None, "not usable: JSON nested too deeply")
    if not isinstance(row, dict):
        return RowError(None, f"not a JSON object: {type(row).__name__}")
    if "\\u" in line and _lone_surrogate(row):
        return RowError(None, "holds a \\uD800-\\uDFFF escape that is half of a character (a text cut in the "
                              "middle of an emoji?): UTF-8 cannot store it")
    return row


def _lone_surrogate(value: Any) -> bool:
    """Whether a \\ud800-style escape left half a character in the row (valid JSON, but no UTF-8 file or Arrow
    column can hold it)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except RecursionError:
        return False
    return False


def read_json(path: Path, name: str | None = None) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """A JSON array of objects, streamed item by item with ijson (a JSON-lines file named .json works too)."""
    import ijson

    with path.open("rb") as f:
        head = f.read(1024)
    skip = len(BOM) if head.startswith(BOM) else 0
    first = head[skip:].lstrip()[:1]
    if first == b"{":  # one object per line, as many tools write '.json'; or one object for the whole file
        _refuse_single_object(path, head[skip:])
        yield from read_jsonl(path, name)
        return
    if first != b"[":
        raise DataError(f"{path}: expected a JSON array of objects (or one object per line), in UTF-8.")
    number = 0
    with path.open("rb") as f:
        f.seek(skip)
        try:
            for number, row in enumerate(ijson.items(f, "item", use_float=True), start=1):
                where = f"{name or path.name}, row {number}"
                if not isinstance(row, dict):
                    row = RowError(None, f"not a JSON object: {type(row).__name__}")
                elif _lone_surrogate(row):
                    row = RowError(None, "holds a \\uD800-\\uDFFF escape that is half of a character: UTF-8 "
                                         "cannot store it")
                yield where, row
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text after row {number}; save the file as UTF-8.") from err
        except ijson.JSONError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{path}: not valid JSON after row {number} (cut short?): {reason}. A broken JSON array "
                            "cannot be read past the break; fix it, or write one object per line (.jsonl) so that "
                            "a bad line can be skipped.") from err


def _refuse_single_object(path: Path, head: bytes) -> None:
    """A '.json' file holding one object over several lines (e.g. {"data": [rows]}) is not rows: say so, with its
    keys, instead of reporting each of its lines as broken JSON."""
    first_line = head.split(b"\n", 1)[0]
    try:
        json.loads(first_line)
        return  # the first line is an object: JSON lines
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        pass
    try:
        whole = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return  # broken JSON lines: each line is reported
    if isinstance(whole, dict):
        lists = [k for k, v in whole.items() if isinstance(v, list)]
        hint = f" Its rows may be the list under '{lists[0]}': save that list as the file." if lists else ""
        raise DataError(f"{path}: one JSON object (keys: {', '.join(map(str, list(whole)[:8]))}), not rows: expected "
                        f"a JSON array of objects, or one object per line.{hint}")


def load_json_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a .jsonl or .json file; a DataError listing every line or row that is not a usable object."""
    rows, bad = [], []
    reader = read_jsonl if path.suffix == ".jsonl" else read_json
    try:
        for where, row in reader(path):
            if isinstance(row, RowError):
                bad.append(f"{where}: {row}")
            else:
                rows.append(row)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}.") from err
    if bad:
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"{path}: {len(bad)} line(s) or row(s) cannot be read:\n  " + "\n  ".join(bad[:20]) + more
                        + "\nFix or remove them (llmft data convert --on-error skip writes a clean copy).")
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
