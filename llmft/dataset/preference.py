"""Converters from the preference formats users bring into llmft's two preference schemas (llmft.schema):

  pair       {prompt: messages ending on the user, chosen: [assistant message], rejected: [assistant message],
              score_chosen?, score_rejected?}                        DPO, ORPO, SimPO, reward models
  feedback   {prompt: messages, completion: [assistant message], label: bool}                   KTO

Formats: `pairs` (TRL's: prompt + chosen + rejected, as text or messages, the prompt explicit or shared by both
answers), `sharegpt_pairs` (LLaMA-Factory: ShareGPT `conversations` + chosen + rejected turns), `hh` (Anthropic
HH-RLHF: two transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..." that share all but the last answer),
`ultrafeedback` (one instruction, several rated completions: best vs worst, or every pair at least `margin`
apart), `oasst_pairs` (OASST trees: for each message with ranked replies, the best vs the worst) and `kto`
(LLaMA-Factory's {messages, label}, or TRL's {prompt, completion, label}). Each converter is a pure function of
one row (an UltraFeedback row may give several pairs) and raises RowError naming the field it cannot use.
"""

from __future__ import annotations

import re
from typing import Any

from llmft.dataset.formats import from_openai, from_sharegpt, oasst_walk, reply_rank, text_of
from llmft.schema import Messages, RowError

PREFERENCE_FORMATS = ("pairs", "sharegpt_pairs", "hh", "ultrafeedback", "oasst_pairs", "kto")
PAIR_FORMATS = ("pairs", "sharegpt_pairs", "hh", "ultrafeedback", "oasst_pairs")
SCORE_KEYS = ("overall_score", "score", "rating", "fine-grained_score")  # UltraFeedback's first, then common names
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def _messages(value: Any, field: str, role: str) -> Messages:
    """Text as one message of `role`, or a list of messages as they are (tool calls, reasoning and all)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "empty")
        return [{"role": role, "content": value}]
    if isinstance(value, dict) and ("value" in value or "content" in value):  # one ShareGPT / OpenAI turn
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError(field, f"must be text or a non-empty list of messages, got {type(value).__name__}")
    if all(isinstance(m, dict) and "from" in m for m in value):
        return _renamed(lambda: from_sharegpt({"conversations": value}), "conversations", field)
    return _renamed(lambda: from_openai({"messages": value}), "messages", field)


def _renamed(convert, inner: str, field: str):
    try:
        return convert()
    except RowError as err:
        raise RowError(field + (err.field or "")[len(inner):], err.problem) from err


def _pair(prompt: Messages, chosen: Messages, rejected: Messages, row: dict | None = None) -> dict[str, Any]:
    scores = {k: (row or {}).get(k) for k in ("score_chosen", "score_rejected")}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **scores}


def _split_shared(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Two whole conversations as (the prompt they share, chosen's answer, rejected's answer)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise RowError("chosen", "shares no prompt with rejected: give a prompt, or conversations that start the same")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def from_pairs(row: dict) -> dict[str, Any]:
    """TRL's preference rows: {prompt?, chosen, rejected} as text or messages. Without a prompt, chosen and rejected
    are whole conversations and the prompt is what they share; with one, answers that repeat it (as
    ultrafeedback_binarized's do) are cut after it."""
    chosen, rejected = _messages(row.get("chosen"), "chosen", "assistant"), _messages(row.get("rejected"),
                                                                                      "rejected", "assistant")
    if row.get("prompt") is None:
        return _pair(*_split_shared(chosen, rejected), row)
    prompt = _messages(row["prompt"], "prompt", "user")
    chosen, rejected = (a[len(prompt):] if a[:len(prompt)] == prompt else a for a in (chosen, rejected))
    return _pair(prompt, chosen, rejected, row)


def from_sharegpt_pairs(row: dict, role_map: dict[str, str] | None = None) -> dict[str, Any]:
    """LLaMA-Factory's pairs: {conversations: [{from, value}, ... ending on human], chosen: {from: gpt, value},
    rejected: {from: gpt, value}} (chosen and rejected may also be plain text)."""
    prompt = from_sharegpt({"conversations": row.get("conversations")}, role_map)
    if isinstance(row.get("system"), str) and row["system"].strip() and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": row["system"]})
    answers = []
    for name in ("chosen", "rejected"):
        value = row.get(name)
        if isinstance(value, dict):
            value = value.get("value", value.get("content"))
        answers.append(_messages(value, name, "assistant"))
    return _pair(prompt, *answers, row)


def _hh_turns(text: Any, field: str) -> Messages:
    if not isinstance(text, str) or not text.strip():
        raise RowError(field, "must be a transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(field, "must be a transcript of 'Human:' and 'Assistant:' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": said.strip()} for speaker, said in zip(parts[1::2], parts[2::2])]


def from_hh(row: dict) -> dict[str, Any]:
    """Anthropic HH-RLHF: {chosen, rejected}, two transcripts identical up to the last Assistant turn."""
    return _pair(*_split_shared(_hh_turns(row.get("chosen"), "chosen"), _hh_turns(row.get("rejected"), "rejected")))


def _score(completion: Any, index: int) -> float:
    for key in SCORE_KEYS:
        value = completion.get(key) if isinstance(completion, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return float(value)
    raise RowError(f"completions[{index}]", f"no numeric rating (looked for {', '.join(SCORE_KEYS)})")


def from_ultrafeedback(row: dict, margin: float | None = None) -> list[dict[str, Any]]:
    """UltraFeedback: {instruction (or prompt), completions: [{response, overall_score}, ...]} -> the best-rated
    answer against the worst; with `margin`, every pair rated at least `margin` apart."""
    prompt = [{"role": "user", "content": text_of(row, "instruction" if "instruction" in row else "prompt")}]
    completions = row.get("completions")
    if not isinstance(completions, list) or len(completions) < 2:
        raise RowError("completions", "must be a list of at least two rated answers")
    rated = []
    for i, completion in enumerate(completions):
        text = completion.get("response", completion.get("text")) if isinstance(completion, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"completions[{i}].response", "missing or empty")
        rated.append((_score(completion, i), text))
    rated.sort(key=lambda pair: -pair[0])
    if margin is None:
        pairs = [(rated[0], rated[-1])] if rated[0][0] > rated[-1][0] else []
    else:
        pairs = [(a, b) for i, a in enumerate(rated) for b in rated[i + 1:] if a[0] - b[0] >= margin]
    if not pairs:
        raise RowError("completions", "no two answers rated differently enough to prefer one" if margin else
                       "every answer has the same rating: no preference")
    return [{"prompt": prompt, "chosen": [{"role": "assistant", "content": a[1]}],
             "rejected": [{"role": "assistant", "content": b[1]}], "score_chosen": a[0], "score_rejected": b[0]}
            for a, b in pairs]


def oasst_pairs(root: dict) -> list[dict[str, Any]]:
    """For each prompter message of an OASST tree with two or more ranked assistant replies: the thread up to it,
    the best-ranked reply as chosen and the worst-ranked as rejected (lower rank is better)."""
    pairs = []
    for node, path, _, replies in oasst_walk(root):
        ranked = sorted((r for _, r in replies if not reply_rank(r)[0]), key=reply_rank)
        if node["role"] == "prompter" and len(ranked) >= 2 and reply_rank(ranked[0]) != reply_rank(ranked[-1]):
            best, worst = (text_of(r, "text") for r in (ranked[0], ranked[-1]))
            pairs.append({"prompt": path, "chosen": [{"role": "assistant", "content": best}],
                          "rejected": [{"role": "assistant", "content": worst}],
                          "score_chosen": None, "score_rejected": None})
    return pairs


def from_kto(row: dict) -> dict[str, Any]:
    """KTO rows: {messages, label} (the last message is the judged answer) or {prompt, completion, label}."""
    if "messages" in row:
        messages = _messages(row["messages"], "messages", "user")
        if messages[-1]["role"] != "assistant":
            raise RowError("messages", f"ends on {messages[-1]['role']!r}; the last message is the judged answer")
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt = _messages(row.get("prompt"), "prompt", "user")
        completion = _messages(row.get("completion"), "completion", "assistant")
        if completion[:len(prompt)] == prompt:
            completion = completion[len(prompt):]
    label = row.get("label")
    if label not in (True, False) or not isinstance(label, (bool, int)):
        raise RowError("label", f"must be true (desirable) or false (undesirable), got {label!r}")
    return {"prompt": prompt, "completion": completion, "label": bool(label)}


def detect_preference_format(row: dict) -> str | None:
    """The preference format a row's keys say it is in, or None (not preference data)."""
    keys = set(row)
    if "label" in keys and ("messages" in keys or {"prompt", "completion"} <= keys):
        return "kto"
    if {"chosen", "rejected"} <= keys:
        if "conversations" in keys:
            return "sharegpt_pairs"
        if "prompt" not in keys and isinstance(row["chosen"], str) and "Human:" in row["chosen"]:
            return "hh"
        return "pairs"
    if "completions" in keys and ({"instruction", "prompt"} & keys):
        return "ultrafeedback"
    return None
