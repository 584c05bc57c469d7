"""The demo's task: rewrite a date written in words as ISO 8601 (YYYY-MM-DD).

Small instruct models get this wrong in telling ways (the month's number, zero padding, chatty answers), a short
LoRA fine-tune fixes it, and exact match scores it without ambiguity. All text is generated here, from a seed.
The same questions also come as preference pairs (`pairs=True`): the right ISO date chosen, a plausible wrong
answer rejected (day and month swapped, no zero padding, the US form, the month off by one).
"""

from __future__ import annotations

import calendar
import json
import random
from pathlib import Path

INSTRUCTIONS = (
    "Write this date in ISO 8601 format (YYYY-MM-DD): {date}",
    "Convert the date to YYYY-MM-DD: {date}",
    "What is {date} in ISO format? Answer with the date only.",
    "Give the ISO 8601 form of this date: {date}",
    "Reformat as year-month-day with dashes: {date}",
)


SYSTEM = "You are a concise assistant."


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _spoken(year: int, month: int, day: int, rng: random.Random) -> str:
    name, short = calendar.month_name[month], calendar.month_abbr[month]
    style = rng.randrange(5)
    if style == 0:
        return f"{name} {day}, {year}"
    if style == 1:
        return f"{day} {name} {year}"
    if style == 2:
        return f"{short} {day}, {year}"
    if style == 3:
        return f"the {_ordinal(day)} of {name}, {year}"
    return f"{name} {_ordinal(day)}, {year}"


def make_example(rng: random.Random) -> dict:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    question = rng.choice(INSTRUCTIONS).format(date=_spoken(year, month, day, rng))
    # A short system prompt: the template's default one would triple each example's length.
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": f"{year:04d}-{month:02d}-{day:02d}"}]}


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to an ISO-date question: what small models write instead."""
    year, month, day = (int(part) for part in answer.split("-"))
    mistakes = [f"{month:02d}/{day:02d}/{year}", f"{year:04d}-{month % 12 + 1:02d}-{day:02d}"]
    if month < 10 or day < 10:  # without zero padding (the same as the answer when both have two digits)
        mistakes.append(f"{year}-{month}-{day}")
    if day <= 12 and day != month:
        mistakes.append(f"{year:04d}-{day:02d}-{month:02d}")
    return rng.choice(mistakes)


def as_pair(example: dict, rng: random.Random) -> dict:
    """A demo conversation as a preference pair: its answer chosen, a plausible wrong one rejected."""
    *prompt, answer = example["messages"]
    return {"prompt": prompt, "chosen": [answer],
            "rejected": [{"role": "assistant", "content": wrong_answer(answer["content"], rng)}]}


def write_demo_data(out: Path, train_rows: int = 320, eval_rows: int = 48, seed: int = 0,
                    pairs: bool = False) -> dict[str, Path]:
    """train.jsonl and eval.jsonl under `out` (conversations, or with `pairs` preference pairs); no eval question
    also appears in train."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < train_rows + eval_rows:
        example = make_example(rng)
        question = example["messages"][1]["content"]
        if question not in seen:
            seen.add(question)
            rows.append(example)
    if pairs:
        rows = [as_pair(row, rng) for row in rows]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    for name, part in (("train", rows[:train_rows]), ("eval", rows[train_rows:])):
        with paths[name].open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return paths
