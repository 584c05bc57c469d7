"""Building a training dataset from raw sources: convert, clean, dedupe, decontaminate, mix, split, write.

Output directory:
  train/, test/        `datasets.save_to_disk` splits with a `messages` column (`test/` only with a test split)
  manifest.json        sources with fingerprints, row counts in/out per step, every drop reason, seed, command
  data_card.md         the same for people
  rejects.jsonl        rows that failed conversion or checks, with the reason (`on_error: skip`)
Rows stream from the sources into Arrow files, so memory does not grow with the size of the input.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets

from llmft.clean import (EvalIndex, NearDuplicateFinder, conversation_problems, conversation_text, exact_key,
                         normalise_messages)
from llmft.data import file_fingerprint
from llmft.formats import CONVERTERS, FORMATS, ColumnMap, RowError, detect_format, from_columns, oasst_flat_to_trees, oasst_paths
from llmft.sources import SourceError, read_source

log = logging.getLogger(__name__)
MAX_LISTED = 20


class BuildError(ValueError):
    """Data that cannot be built as asked, with what to do."""


@dataclass
class Source:
    """One input: a file, folder or Hub dataset id, its format, and how much of it goes into the mix."""

    path: str
    format: str | None = None  # None: detected from the first row
    name: str | None = None  # label in the manifest; defaults to the file name
    split: str = "train"  # Hub datasets only
    fraction: float | None = None  # share of this source's clean rows used in the mix
    count: int | None = None  # or an exact number of rows
    prompt_field: str = "question"  # format: columns
    completion_field: str = "answer"
    system_field: str | None = None
    oasst_best_only: bool = False  # OASST trees: only the best-ranked path instead of every path

    def __post_init__(self):
        self.name = self.name or Path(self.path).name
        problems = []
        if self.format is not None and self.format not in FORMATS:
            problems.append(f"source {self.name}: format '{self.format}' is not one of {', '.join(FORMATS)}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            problems.append(f"source {self.name}: fraction {self.fraction} must be in (0, 1]")
        if self.fraction is not None and self.count is not None:
            problems.append(f"source {self.name}: give fraction or count, not both")
        if problems:
            raise BuildError("\n".join(problems))


@dataclass
class BuildConfig:
    """A whole data build; `llmft data build FILE.yaml` reads one from YAML with these keys."""

    sources: list[Source]
    out: str
    on_error: str = "fail"  # fail: stop and list the bad rows; skip: write them to rejects.jsonl and go on
    normalise: bool = True
    system_prompt: str | None = None  # added to conversations that have no system message
    dedupe: bool = True  # exact duplicates (case and spacing ignored)
    near_dedupe_threshold: float | None = 0.85  # MinHash Jaccard threshold; None turns it off
    decontaminate: list[str] = field(default_factory=list)  # eval sets (files or Hub ids) to keep out of training
    ngram: int = 13
    test_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self.sources = [s if isinstance(s, Source) else Source(**s) for s in self.sources]
        if not self.sources:
            raise BuildError("no sources: give at least one file, folder or Hub dataset id.")
        if self.on_error not in ("fail", "skip"):
            raise BuildError(f"on_error: '{self.on_error}' is not fail or skip.")
        if not 0 <= self.test_fraction < 1:
            raise BuildError(f"test_fraction: {self.test_fraction} must be in [0, 1).")


def load_build_config(path: str, out: str | None = None) -> BuildConfig:
    """A build YAML as a BuildConfig; unknown keys (top level or in a source) name the closest valid key."""
    import difflib

    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BuildError(f"cannot read {path}: {err}") from err
    if not isinstance(raw, dict):
        raise BuildError(f"{path}: a build file is a mapping with 'sources' and 'out'.")
    problems = []

    def check(keys, cls, where):
        valid = {f.name for f in fields(cls)}
        for key in keys:
            if key not in valid:
                close = difflib.get_close_matches(key, sorted(valid), n=1)
                problems.append(f"{path}: unknown key '{where}{key}'." + (f" Did you mean '{close[0]}'?" if close else ""))

    check(raw, BuildConfig, "")
    for i, source in enumerate(raw.get("sources") or []):
        if isinstance(source, dict):
            check(source, Source, f"sources[{i}].")
        else:
            problems.append(f"{path}: sources[{i}] must be a mapping with at least 'path'.")
    if out:
        raw["out"] = out
    if "out" not in raw:
        problems.append(f"{path}: 'out' is missing: the folder the dataset is written to.")
    if problems:
        raise BuildError("\n".join(problems))
    return BuildConfig(**raw)


# Conversion ----------------------------------------------------------------------------------------------------


def convert_rows(source: Source):
    """(where, messages or RowError, raw row) for every conversation of a source."""
    rows = read_source(source.path, source.split)
    fmt = source.format
    if fmt is None:
        first = next(rows, None)
        if first is None:
            return
        where, row = first
        try:
            fmt = detect_format(row) if isinstance(row, dict) else "openai"
        except ValueError as err:
            raise BuildError(f"{source.path}: {err}") from err
        source.format = fmt
        rows = _chain(first, rows)
    if fmt == "oasst":
        yield from _convert_oasst(rows, source)
        return
    columns = ColumnMap(source.prompt_field, source.completion_field, source.system_field)
    convert = (lambda r: from_columns(r, columns)) if fmt == "columns" else CONVERTERS[fmt]
    for where, row in rows:
        if isinstance(row, RowError):
            yield where, row, None
            continue
        try:
            yield where, convert(row), row
        except RowError as err:
            yield where, err, row


def _chain(first, rest):
    yield first
    yield from rest


def _convert_oasst(rows, source: Source):
    """Nested trees convert row by row; flat message rows must be assembled into trees first."""
    rows = list(rows)  # trees span rows: the whole file is needed (OASST exports are modest in size)
    flat = [r for _, r in rows if isinstance(r, dict) and "message_id" in r]
    trees = [(w, r["prompt"]) for w, r in rows if isinstance(r, dict) and isinstance(r.get("prompt"), dict)]
    if flat:
        trees += [(f"{source.name}, tree {i + 1}", t) for i, t in enumerate(oasst_flat_to_trees(flat))]
    for where, error in ((w, r) for w, r in rows if isinstance(r, RowError)):
        yield where, error, None
    for where, tree in trees:
        try:
            for k, path in enumerate(oasst_paths(tree, source.oasst_best_only)):
                yield f"{where}, path {k + 1}", path, None
        except RowError as err:
            yield where, err, tree


# The build -----------------------------------------------------------------------------------------------------


def build(config: BuildConfig, command: str = "") -> dict[str, Any]:
    """Run a build end to end; returns the manifest (also written to the output directory)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"command": command, "seed": config.seed, "config": _config_dict(config),
                                "sources": [], "steps": {}}
    with tempfile.TemporaryDirectory(prefix="llmft-build-") as cache, (out / "rejects.jsonl").open("w") as rejects:
        parts = []
        for source in config.sources:
            ds, stats = _convert_source(source, config, rejects, cache)
            manifest["sources"].append({"name": source.name, "path": source.path, "format": source.format,
                                        "fingerprint": _fingerprint(source), **stats})
            parts.append(ds)
        merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        kept, steps = _filter(merged, config)
        manifest["steps"].update(steps)
        mixed, mix = _mix(kept, config)
        manifest["steps"]["mix"] = mix
        splits = _split(mixed, config)
        for name, split in splits.items():
            target = out / name
            if target.exists():
                shutil.rmtree(target)
            split.save_to_disk(str(target))
        manifest["output"] = {name: {"rows": len(split), "path": str(out / name)} for name, split in splits.items()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    (out / "data_card.md").write_text(data_card(manifest))
    return manifest


def _convert_source(source: Source, config: BuildConfig, rejects, cache: str):
    counts, problems = Counter(), []

    def generate():
        for where, result, raw in convert_rows(source):
            counts["read"] += 1
            if not isinstance(result, RowError):
                messages = normalise_messages(result, config.system_prompt) if config.normalise else result
                found = conversation_problems(messages)
                if not found:
                    counts["kept"] += 1
                    yield {"messages": messages, "source": source.name, "origin": where}
                    continue
                result = RowError(None, "; ".join(found))
            counts[_reason(result)] += 1
            problems.append(f"{where}: {result}")
            rejects.write(json.dumps({"source": source.name, "where": where, "reason": str(result), "row": raw},
                                     default=str) + "\n")

    try:
        ds = datasets.Dataset.from_generator(generate, cache_dir=cache,
                                             features=_features(), split=datasets.Split.TRAIN)
    except SourceError as err:
        raise BuildError(str(err)) from err
    except datasets.exceptions.DatasetGenerationError as err:  # raised inside the generator, wrapped by datasets
        if isinstance(err.__cause__, (BuildError, SourceError)):
            raise BuildError(str(err.__cause__)) from err
        raise BuildError(f"{source.path}: {err.__cause__ or err}") from err
    if problems and config.on_error == "fail":
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise BuildError(f"{source.path}: {len(problems)} row(s) cannot be used:\n  {listed}{more}\n"
                         "Fix them, or pass --on-error skip to leave them out (they go to rejects.jsonl).")
    log.info("%s (%s): %d read, %d kept", source.name, source.format, counts["read"], counts["kept"])
    return ds, {"read": counts.pop("read", 0), "kept": counts.pop("kept", 0), "rejected": dict(counts)}


def _reason(error: RowError) -> str:
    """A row's problem without its positions, so equal problems count together in the manifest."""
    text = str(error).split(";")[0]
    return re.sub(r"\[\d+\]| at column \d+", "", text)


def _features() -> datasets.Features:
    message = {"role": datasets.Value("string"), "content": datasets.Value("string"),
               "tool_calls": datasets.Json(), "tool_call_id": datasets.Value("string"),
               "name": datasets.Value("string")}
    return datasets.Features({"messages": datasets.List(message), "source": datasets.Value("string"),
                              "origin": datasets.Value("string")})


def _filter(ds: datasets.Dataset, config: BuildConfig):
    """Exact duplicates, near duplicates and contaminated rows out, in one pass; counts and examples kept."""
    index = _eval_index(config)
    near = NearDuplicateFinder(config.near_dedupe_threshold) if config.near_dedupe_threshold else None
    first_seen: dict[str, str] = {}
    dropped, pairs, hits = Counter(), [], {}

    def keep(row) -> bool:
        text = conversation_text(row["messages"])
        if config.dedupe:
            key = exact_key(row["messages"])
            if key in first_seen:
                dropped["exact duplicate"] += 1
                pairs.append({"dropped": row["origin"], "kept": first_seen[key], "kind": "exact"})
                return False
            first_seen[key] = row["origin"]
        if near is not None:
            match = near.seen(row["origin"], text)
            if match is not None:
                dropped["near duplicate"] += 1
                pairs.append({"dropped": row["origin"], "kept": match, "kind": "near"})
                return False
        if index is not None:
            found = index.hits(text)
            if found:
                dropped["contaminated"] += 1
                hits[row["origin"]] = sorted(found)
                return False
        return True

    kept = ds.filter(keep, desc="Deduplicating and decontaminating")
    steps = {"dedupe": {"exact": dropped["exact duplicate"], "near": dropped["near duplicate"],
                        "threshold": config.near_dedupe_threshold, "examples": pairs[:MAX_LISTED]},
             "decontaminate": {"dropped": dropped["contaminated"], "ngram": config.ngram,
                               "eval_sets": config.decontaminate,
                               "eval_rows_hit": sorted({e for found in hits.values() for e in found}),
                               "train_rows_dropped": dict(list(hits.items())[:MAX_LISTED])}}
    return kept, steps


def _eval_index(config: BuildConfig) -> EvalIndex | None:
    if not config.decontaminate:
        return None
    index = EvalIndex(config.ngram)
    for spec in config.decontaminate:
        for where, result, _ in convert_rows(Source(spec)):
            if not isinstance(result, RowError):
                index.add(where, conversation_text(result))
    return index


def _mix(ds: datasets.Dataset, config: BuildConfig):
    """Per source, all clean rows or a seeded sample (fraction or count), then shuffled together."""
    rng = random.Random(config.seed)
    by_source: dict[str, list[int]] = {}
    for i, name in enumerate(ds["source"]):
        by_source.setdefault(name, []).append(i)
    chosen, mix = [], {}
    for source in config.sources:
        rows = by_source.get(source.name, [])
        want = len(rows) if source.fraction is None and source.count is None else (
            round(len(rows) * source.fraction) if source.fraction is not None else source.count)
        if want > len(rows):
            raise BuildError(f"source {source.name}: count {want} is more than its {len(rows)} clean rows.")
        picked = rng.sample(rows, want) if want < len(rows) else rows
        mix[source.name] = {"available": len(rows), "used": len(picked)}
        chosen += picked
    rng.shuffle(chosen)
    return ds.select(chosen), mix


def _split(ds: datasets.Dataset, config: BuildConfig) -> dict[str, datasets.Dataset]:
    if len(ds) == 0:
        raise BuildError("no rows left after cleaning; see rejects.jsonl and the counts in manifest.json.")
    if not config.test_fraction:
        return {"train": ds}
    parts = ds.train_test_split(test_size=config.test_fraction, seed=config.seed)
    return {"train": parts["train"], "test": parts["test"]}


def _fingerprint(source: Source) -> dict[str, Any]:
    if Path(source.path).exists():
        return file_fingerprint(source.path)
    return {"hub_dataset": source.path, "split": source.split}


def _config_dict(config: BuildConfig) -> dict[str, Any]:
    return asdict(config)


def data_card(manifest: dict[str, Any]) -> str:
    """The manifest for people: where the data came from and what happened to every row."""
    lines = ["# Dataset card", "", f"Built with: `{manifest['command']}` (seed {manifest['seed']})", "",
             "## Sources", "", "| source | format | sha256 | read | kept | rejected |", "|---|---|---|---|---|---|"]
    for s in manifest["sources"]:
        sha = s["fingerprint"].get("sha256", s["fingerprint"].get("hub_dataset", ""))[:12]
        rejected = sum(s["rejected"].values())
        lines.append(f"| {s['name']} | {s['format']} | {sha} | {s['read']} | {s['kept']} | {rejected} |")
    reasons = Counter()
    for s in manifest["sources"]:
        reasons.update(s["rejected"])
    if reasons:
        lines += ["", "Rejected rows, by reason (details in rejects.jsonl):", ""]
        lines += [f"- {n} x {why}" for why, n in reasons.most_common()]
    steps = manifest["steps"]
    lines += ["", "## Cleaning", "",
              f"- exact duplicates removed: {steps['dedupe']['exact']}",
              f"- near duplicates removed (MinHash Jaccard >= {steps['dedupe']['threshold']}): {steps['dedupe']['near']}",
              f"- contaminated rows removed ({steps['decontaminate']['ngram']}-gram overlap with "
              f"{', '.join(steps['decontaminate']['eval_sets']) or 'no eval sets'}): {steps['decontaminate']['dropped']}"
              f" (eval rows hit: {len(steps['decontaminate']['eval_rows_hit'])})",
              "", "## Mix", "", "| source | available | used |", "|---|---|---|"]
    lines += [f"| {name} | {m['available']} | {m['used']} |" for name, m in steps["mix"].items()]
    lines += ["", "## Output", ""] + [f"- {name}: {o['rows']} rows ({o['path']})" for name, o in manifest["output"].items()]
    return "\n".join(lines) + "\n"
