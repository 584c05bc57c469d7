"""`llmft augment`: more training rows by rewriting the user turns of existing ones, through the self-chat backends.

Two modes: `paraphrase` asks the model to say the request in other words; `backtranslate` translates it into a
pivot language and back. Only user turns (and string prompts) are rewritten: the answers stay the ones the data
was made with, so an augmented row is as correct as its source. A rewrite that comes back empty, unchanged, or far
shorter or longer than the original is rejected with its row, and the counts are reported.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llmft.errors import ConfigError, DataError
from llmft.schema import MESSAGES, PROMPT_COMPLETION, kind_of, load_json_rows, raise_problems, row_problems
from llmft.synth.backends import BackendOptions, Sampling, make_backend

log = logging.getLogger(__name__)

MODES = ("paraphrase", "backtranslate")
PROMPTS = {
    "paraphrase": "Rewrite the following message in different words. Keep its meaning, its language and every "
                  "detail needed to answer it. Reply with the rewritten message only.\n\n{text}",
    "to_pivot": "Translate the following message into {pivot}. Reply with the translation only.\n\n{text}",
    "from_pivot": "Translate the following message into English. Reply with the translation only.\n\n{text}",
}


SAMPLING_DEFAULTS = {"max_new_tokens": 128}  # a rewritten request is short


@dataclass
class AugmentFiles:
    data: str = field(metadata={"positional": True, "help": "JSONL file of rows with messages (or prompt/completion)."})
    out: str = field(metadata={"help": "JSONL file: the source rows, then the new ones."})
    only_new: bool = field(default=False, metadata={"help": "Write only the augmented rows."})


@dataclass
class AugmentSettings:
    mode: str = field(default="paraphrase", metadata={"help": "paraphrase | backtranslate."})
    pivot: str = field(default="French", metadata={"help": "backtranslate: the language to go through."})
    copies: int = field(default=1, metadata={"help": "Rewrites per source row."})
    min_ratio: float = field(default=0.3, metadata={"help": "Shortest kept rewrite, as a share of the original's "
                                                            "length in characters."})
    max_ratio: float = field(default=3.0, metadata={"help": "Longest kept rewrite, likewise."})

    def __post_init__(self):
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode: '{self.mode}' is not {' or '.join(MODES)}.")
        if self.copies < 1:
            problems.append("copies: must be >= 1.")
        if not 0 <= self.min_ratio < self.max_ratio:
            problems.append(f"min_ratio {self.min_ratio} and max_ratio {self.max_ratio}: need 0 <= min < max.")
        if problems:
            raise ConfigError(problems, what="augmentation settings")


@dataclass
class AugmentConfig(AugmentSettings):
    """The settings, with sampling and the batch size."""

    sampling: Sampling = field(default_factory=lambda: Sampling(**SAMPLING_DEFAULTS))
    batch_size: int = 16


def rewrite(texts: list[str], backend, cfg: AugmentConfig) -> list[str]:
    """Each text paraphrased, or translated to the pivot language and back, in one batch per call."""
    def ask(template: str, items: list[str]) -> list[str]:
        requests = [[{"role": "user", "content": template.format(text=t, pivot=cfg.pivot)}] for t in items]
        return backend.chat(requests, cfg.sampling)

    if cfg.mode == "paraphrase":
        return ask(PROMPTS["paraphrase"], texts)
    return ask(PROMPTS["from_pivot"], ask(PROMPTS["to_pivot"], texts))


def rejection(original: str, rewritten: str, cfg: AugmentConfig) -> str | None:
    """Why a rewrite is not kept, or None."""
    if not rewritten.strip():
        return "empty"
    if " ".join(rewritten.lower().split()) == " ".join(original.lower().split()):
        return "unchanged"
    ratio = len(rewritten) / max(1, len(original))
    if ratio < cfg.min_ratio:
        return "too short"
    if ratio > cfg.max_ratio:
        return "too long"
    return None


def _slots(row: dict[str, Any], kind: str) -> list[tuple[str, int | None]]:
    """The places in a valid row that get rewritten: ("messages", i) or ("prompt", i) for user turns, ("prompt",
    None) for a text prompt."""
    key = MESSAGES if kind == MESSAGES else "prompt"
    if isinstance(row[key], str):
        return [(key, None)]
    return [(key, i) for i, m in enumerate(row[key]) if m["role"] == "user"]


def _kinds(rows: list[dict], source: str) -> list[str]:
    """Each row's kind (a file may mix messages and prompt/completion rows), after the schema's checks, as training
    makes them; one DataError lists every bad row."""
    kinds, problems = [], []
    for number, row in enumerate(rows, 1):
        try:
            kinds.append(kind_of(row, f"row {number}"))
        except DataError as err:
            problems.append(str(err))
            continue
        if kinds[-1] not in (MESSAGES, PROMPT_COMPLETION):
            problems.append(f"row {number}: {kinds[-1]} rows have no user turn to augment (conversations or "
                            "prompt/completion rows only).")
            continue
        problems += [f"row {number}: {p}" for p in row_problems(row, kinds[-1])]
    raise_problems(source, problems)
    return kinds


def _read(row: dict, slot: tuple[str, int | None]) -> str:
    key, index = slot
    return row[key] if index is None else row[key][index]["content"]


def _write(row: dict, slot: tuple[str, int | None], text: str) -> None:
    key, index = slot
    if index is None:
        row[key] = text
    else:
        row[key][index] = {**row[key][index], "content": text}


def augment_rows(rows: list[dict], backend, cfg: AugmentConfig, source: str = "data") -> tuple[list[dict], Counter]:
    """New rows (cfg.copies per source row at most), and the count of rows rejected by reason."""
    slots = [_slots(row, kind) for row, kind in zip(rows, _kinds(rows, source))]
    new_rows, rejected = [], Counter()
    label = cfg.mode if cfg.mode == "paraphrase" else f"backtranslate:{cfg.pivot}"
    with tqdm(total=len(rows) * cfg.copies, desc=f"augment ({label})", unit="row") as bar:
        for _copy in range(cfg.copies):
            for start in range(0, len(rows), cfg.batch_size):
                batch = list(range(start, min(start + cfg.batch_size, len(rows))))
                places = [(i, slot) for i in batch for slot in slots[i]]
                texts = rewrite([_read(rows[i], slot) for i, slot in places], backend, cfg)
                reasons: dict[int, str] = {}
                copies = {i: json.loads(json.dumps(rows[i])) for i in batch}
                for (i, slot), text in zip(places, texts):
                    reason = rejection(_read(rows[i], slot), text, cfg)
                    if reason:
                        reasons.setdefault(i, reason)
                    _write(copies[i], slot, text.strip())
                for i in batch:
                    if i in reasons:
                        rejected[reasons[i]] += 1
                    else:
                        new_rows.append({**copies[i], "augmentation": label, "augmented_from_row": i + 1})
                bar.update(len(batch))
    return new_rows, rejected


def augment_file(data: Path, out: Path, backend, cfg: AugmentConfig, only_new: bool = False) -> dict[str, Any]:
    """Write `out` (JSONL): the source rows (unless only_new), then the augmented ones. Returns the counts."""
    if data.suffix not in (".jsonl", ".json"):
        raise DataError(f"{data}: augment reads rows from a .jsonl or .json file; save them as JSON lines.")
    rows = load_json_rows(data)
    if not rows:
        raise DataError(f"{data}: no rows to augment (the file is empty).")
    new_rows, rejected = augment_rows(rows, backend, cfg, str(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in ([] if only_new else rows) + new_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {"source_rows": len(rows), "augmented_rows": len(new_rows), "rejected": dict(rejected),
               "written": len(new_rows) + (0 if only_new else len(rows)), "out": str(out)}
    log.info("augment: %d source rows -> %d new (%s rejected: %s)", len(rows), len(new_rows),
             sum(rejected.values()), ", ".join(f"{n} {k}" for k, n in rejected.items()) or "none")
    return summary


def augment_command(files: AugmentFiles, settings: AugmentSettings, sampling: Sampling,
                    backend_options: BackendOptions) -> None:
    cfg = AugmentConfig(**asdict(settings), sampling=sampling, batch_size=backend_options.batch_size)
    summary = augment_file(Path(files.data), Path(files.out), make_backend(backend_options), cfg, files.only_new)
    rejected = ", ".join(f"{n} {k}" for k, n in summary["rejected"].items()) or "none"
    print(f"{summary['source_rows']} source rows -> {summary['augmented_rows']} new rows (rejected: {rejected}); "
          f"wrote {summary['written']} rows to {summary['out']}")
