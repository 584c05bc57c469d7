"""Building a training dataset from raw sources: convert, clean, dedupe, decontaminate, mix, split, write.

Output directory:
  train/, test/        `datasets.save_to_disk` splits (`test/` only with a test split): a `messages` column for
                       conversations; prompt/chosen/rejected for preference pairs; prompt/completion/label for KTO
  manifest.json        sources with fingerprints, row counts in/out per step, every drop reason, seed, command
  data_card.md         the same for people
  rejects.jsonl        rows that failed conversion or checks, with the reason (`on_error: skip`)
Rows stream from the sources into Arrow files, so memory does not grow with the size of the input.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from llmft.dataset.clean import (EvalIndex, NearDuplicateFinder, conversation_text, exact_key, group_keys,
                                 held_out_groups)
from llmft.dataset.convert import Source, SourceOptions, convert_rows, kind_of_format, source_format
from llmft.dataset.kinds import KINDS, RowKind
from llmft.errors import ConfigError, DataError, LlmftError
from llmft.parsing import coerce, field_names, field_types, read_yaml_mapping, unknown_keys
from llmft.schema import MAX_LISTED, MESSAGES, RowError, file_fingerprint

__all__ = ["BuildConfig", "BuildOptions", "Source", "SourceOptions", "build", "chat_features", "data_card"]

log = logging.getLogger(__name__)


# Options: the flags of `llmft data convert` and the keys of a build file are the same fields -------------------


@dataclass
class BuildOptions:
    """Where a build goes and how rows are checked, cleaned and split."""

    out: str | None = field(default=None, metadata={"help": "Output directory (train/, test/, manifest.json, "
                                                            "data_card.md, rejects.jsonl)."})
    on_error: str = field(default="fail", metadata={"help": "Bad rows: stop and list them (fail), or write them to "
                                                            "rejects.jsonl and go on (skip)."})
    normalise: bool = field(default=True, metadata={"help": "NFC, no zero-width characters, trimmed lines "
                                                            "(--no-normalise keeps text as is)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Add this system message where a "
                                                                       "conversation has none."})
    dedupe: bool = field(default=True, metadata={"help": "Drop duplicates: exact ones (case and spacing ignored), "
                                                         "and near ones (--near-dedupe). --no-dedupe keeps both."})
    near_dedupe_threshold: float | str | None = field(
        default="0.85", metadata={"aliases": ["--near-dedupe"],
                                  "help": "MinHash Jaccard threshold for near duplicates, or off."})
    decontaminate: list[str] = field(default_factory=list, metadata={
        "nargs": "*", "metavar": "EVAL", "help": "Eval sets (files or Hub ids) whose n-grams training rows must not share."})
    ngram: int = field(default=13, metadata={"help": "n-gram size for decontamination, in words."})
    test_fraction: float = field(default=0.0, metadata={"help": "Share of rows held out as test/."})
    seed: int = field(default=0, metadata={"help": "Seed of the mix and the split."})

    def __post_init__(self):
        problems = []
        if self.on_error not in ("fail", "skip"):
            problems.append(f"on_error: '{self.on_error}' is not fail or skip.")
        if not 0 <= self.test_fraction < 1:
            problems.append(f"test_fraction: {self.test_fraction} must be in [0, 1).")
        if self.ngram < 1:
            problems.append(f"ngram: {self.ngram} must be >= 1.")
        try:
            threshold = self.near_threshold
        except ValueError:
            problems.append(f"near_dedupe_threshold: '{self.near_dedupe_threshold}' is not a number or off.")
        else:
            if threshold is not None and not 0 < threshold <= 1:
                problems.append(f"near_dedupe_threshold: {threshold} must be in (0, 1], or off.")
        if problems:
            raise ConfigError(problems, what="build settings")

    @property
    def near_threshold(self) -> float | None:
        """The near-duplicate threshold as a number; None when near dedupe is off."""
        value = self.near_dedupe_threshold
        return None if value is None or str(value).lower() in ("off", "none") else float(value)


@dataclass
class BuildConfig(BuildOptions):
    """A whole build: the keys of a build file (`llmft data build FILE.yaml`)."""

    sources: list[Source] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        problems = [] if self.sources else ["sources: none given: list at least one file, folder or Hub id."]
        labels = Counter(source.label for source in self.sources)
        problems += [f"sources: {n} sources are labelled '{label}': give each a distinct name (name: ...), so that "
                     "rows and the mix can say which source they come from." for label, n in labels.items() if n > 1]
        if not self.out:
            problems.append("out: missing: the folder the dataset is written to.")
        if problems:
            raise ConfigError(problems, what="build settings")


@dataclass
class ConvertOptions:
    """The sources of `llmft data convert` (the other flags are SourceOptions and BuildOptions)."""

    sources: list[str] = field(metadata={"positional": True, "metavar": "SOURCE",
                                         "help": "Files, folders or Hub dataset ids (org/name)."})


@dataclass
class BuildFileOptions:
    config: str = field(metadata={"positional": True, "help": "Build YAML file (see data_prep/builds/)."})
    out: str | None = field(default=None, metadata={"help": "Output directory (overrides the file's)."})


def convert_command(sources: ConvertOptions, source: SourceOptions, options: BuildOptions, command: str) -> None:
    """`llmft data convert`: every source read the same way, one dataset out."""
    if not options.out:
        raise ConfigError(["--out: missing: the folder the dataset is written to."], what="the options of llmft data convert")
    read = dataclasses.asdict(source)
    names = Counter(Path(p).name for p in sources.sources)  # two a/train.jsonl, b/train.jsonl: label by path
    config = BuildConfig(**dataclasses.asdict(options), sources=[
        Source(**read, path=p, name=p if names[Path(p).name] > 1 else None) for p in sources.sources])
    _print_outputs(build(config, command))


def build_command(options: BuildFileOptions, command: str) -> None:
    """`llmft data build FILE.yaml`."""
    _print_outputs(build(load_build_config(options.config, options.out), command))


def _print_outputs(manifest: dict[str, Any]) -> None:
    """What happened to the rows (every drop counted), then where the splits went."""
    sources, steps = manifest["sources"], manifest["steps"]
    rejected = sum(sum(s["rejected"].values()) for s in sources)
    adjusted = Counter()
    for s in sources:
        adjusted.update(s["adjusted"])
    lines = [f"{sum(s['read'] for s in sources)} rows read from {len(sources)} source(s); "
             f"{rejected} rejected" + (" (reasons in rejects.jsonl and manifest.json)" if rejected else ""),
             f"duplicates dropped: {steps['dedupe']['exact']} exact, {steps['dedupe']['near']} near; "
             f"contaminated rows dropped: {steps['decontaminate']['dropped']}"]
    lines += [f"{n} {what}" for what, n in adjusted.items()]
    unreadable = steps["decontaminate"]["unreadable_eval_rows"]
    if unreadable:
        lines.append(f"{unreadable} eval row(s) could not be read, so training rows are not checked against them "
                     f"(first: {steps['decontaminate']['unreadable_examples'][0]})")
    unused = sum(m["available"] - m["used"] for m in steps["mix"].values())
    if unused:
        lines.append(f"{unused} clean rows left out by the mix (fraction/count)")
    lines += [f"{name}: {output['rows']} rows -> {output['path']}" for name, output in manifest["output"].items()]
    print("\n".join(lines))


def load_build_config(path: str, out: str | None = None) -> BuildConfig:
    """A build YAML as a BuildConfig; every unknown key (top level or in a source) names the closest valid key."""
    raw = read_yaml_mapping(path, "build file")
    problems = unknown_keys(raw, field_names(BuildConfig), f"{path}: ")
    settings, wrong = coerce({k: v for k, v in raw.items() if k != "sources"}, field_types([BuildOptions]), f"{path}: ")
    problems += wrong
    sources = raw.get("sources") or []
    if not isinstance(sources, list):
        problems.append(f"{path}: sources must be a list of mappings, each with at least 'path'.")
        sources = []
    built = []
    for i, source in enumerate(sources):
        if not isinstance(source, dict):
            problems.append(f"{path}: sources[{i}] must be a mapping with at least 'path'.")
            continue
        where = f"{path}: sources[{i}]: "
        problems += unknown_keys(source, field_names(Source), where)
        values, wrong = coerce({k: v for k, v in source.items() if k in field_names(Source)}, field_types([Source]),
                               where)
        problems += wrong
        if not wrong:
            built += _construct(Source, values, problems)
    if problems:
        raise ConfigError(problems, source=path, what="build file")
    values = {k: v for k, v in settings.items() if k in field_names(BuildOptions)}
    config = _construct(BuildConfig, {**values, "sources": built, **({"out": out} if out else {})}, problems)
    if problems:
        raise ConfigError(problems, source=path, what="build file")
    return config[0]


def _construct(cls: type, values: dict[str, Any], problems: list[str]) -> list[Any]:
    """[an instance], or [] with its validation problems added to `problems`."""
    try:
        return [cls(**values)]
    except ConfigError as err:
        problems.extend(err.problems)
        return []


# The build -----------------------------------------------------------------------------------------------------


def build(config: BuildConfig, command: str = "") -> dict[str, Any]:
    """Run a build end to end; returns the manifest (also written to the output directory)."""
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where the folder should be, no permission, read-only disk
        raise DataError(f"cannot make the output folder {out}: {err.strerror or err}. Choose another --out.") from err
    manifest: dict[str, Any] = {"command": command, "seed": config.seed, "config": dataclasses.asdict(config),
                                "sources": [], "steps": {}}
    with tempfile.TemporaryDirectory(prefix="llmft-build-") as cache, (out / "rejects.jsonl").open("w") as rejects:
        formats = {source.label: source_format(source) for source in config.sources}
        kind = _one_kind(formats)
        manifest["kind"] = kind.name
        parts = []
        for source in config.sources:
            ds, stats = _convert_source(source, formats[source.label], kind, config, rejects, cache)
            manifest["sources"].append({"name": source.label, "path": source.path, "format": formats[source.label],
                                        "fingerprint": _fingerprint(source), **stats})
            parts.append(ds)
        merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        kept, steps = _filter(merged, kind, config)
        manifest["steps"].update(steps)
        mixed, mix = _mix(kept, config)
        manifest["steps"]["mix"] = mix
        try:
            splits = _split(mixed, kind, config)
        except DataError:  # the counts say why nothing is left
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            raise
        for name in ("train", "test"):  # an earlier build's test/ must not outlive a build without one
            if (out / name).exists():
                shutil.rmtree(out / name)
        for name, split in splits.items():
            split.save_to_disk(str(out / name))
        manifest["output"] = {name: {"rows": len(split), "path": str(out / name)} for name, split in splits.items()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    (out / "data_card.md").write_text(data_card(manifest))
    return manifest


def _one_kind(formats: dict[str, str | None]) -> RowKind:
    """The one kind of row all sources give: a build writes conversations, pairs or unpaired answers, not a mix."""
    kinds = {label: kind_of_format(fmt) for label, fmt in formats.items() if fmt is not None}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{label}: {KINDS[kind].label}s ({formats[label]})" for label, kind in kinds.items())
        raise DataError(f"the sources give different kinds of rows ({listed}). Build each kind into its own dataset.")
    return KINDS[next(iter(kinds.values()), MESSAGES)]


def _convert_source(source: Source, fmt: str | None, kind: RowKind, config: BuildConfig, rejects, cache: str):
    """(dataset of the source's valid rows, counts); bad rows are listed, or skipped and counted."""
    counts, notes, problems = Counter(), Counter(), []

    def generate():
        for where, result, raw in convert_rows(source, fmt, notes):
            counts["read"] += 1
            if not isinstance(result, RowError):
                row = kind.record(result, raw, config.system_prompt, config.normalise)
                found = kind.problems(row)
                if not found:
                    counts["kept"] += 1
                    yield {**kind.stored(row), "source": source.label, "origin": where}
                    continue
                result = RowError(None, "; ".join(found))
            counts[_reason(result)] += 1
            problems.append(f"{where}: {result}")
            rejects.write(json.dumps({"source": source.label, "where": where, "reason": str(result), "row": raw},
                                     default=str) + "\n")

    features = kind.features()
    try:
        ds = datasets.Dataset.from_generator(generate, cache_dir=cache, features=features, split=datasets.Split.TRAIN)
    except datasets.exceptions.DatasetGenerationError as err:  # raised inside the generator, wrapped by datasets
        if isinstance(err.__cause__, LlmftError):
            raise err.__cause__ from err
        if isinstance(err.__cause__, OSError):
            raise DataError(f"cannot read {source.path}: {err.__cause__}") from err
        raise  # anything else is a bug in llmft, not bad input: keep its traceback
    except ValueError:  # datasets refuses a generator that yielded nothing
        if counts["kept"]:
            raise
        ds = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    if problems and config.on_error == "fail":
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{source.path}: {len(problems)} row(s) cannot be used:\n  {listed}{more}\n"
                        "Fix them, or pass --on-error skip to leave them out (they go to rejects.jsonl).")
    if not counts["read"]:
        raise DataError(f"{source.path}: no rows (the file is empty, or holds no {kind.label}).")
    log.info("%s (%s): %d read, %d kept", source.label, fmt, counts["read"], counts["kept"])
    return ds, {"read": counts.pop("read", 0), "kept": counts.pop("kept", 0), "rejected": dict(counts),
                "adjusted": {k: v for k, v in notes.items() if v}}


def _reason(error: RowError) -> str:
    """A row's problem without its positions, so equal problems count together in the manifest."""
    text = str(error).split(";")[0]
    return re.sub(r"\[\d+\]| at column \d+", "", text)


def chat_features() -> datasets.Features:
    """The columns of a built conversation dataset: tool calls and tools as JSON, so rows keep exactly their keys."""
    return KINDS[MESSAGES].features()


def _filter(ds: datasets.Dataset, kind: RowKind, config: BuildConfig):
    """Exact duplicates, near duplicates and contaminated rows out, in one pass; counts and examples kept.

    Duplicates are judged on the kind's key messages: a pair's prompt (pairs of one prompt in two sources would
    teach the same preference twice, and could land on both sides of the split), and the whole of anything else.
    The several pairs one row gives (UltraFeedback with a margin) share their prompt on purpose and are kept."""
    index, unreadable = _eval_index(config)
    near = NearDuplicateFinder(config.near_threshold) if config.near_threshold and config.dedupe else None
    first_seen: dict[str, str] = {}
    dropped, pairs, hits = Counter(), [], {}

    def keep(row) -> bool:
        key_messages = kind.key_messages(row)
        if config.dedupe:
            key = exact_key(key_messages)
            if key in first_seen and _row_of(first_seen[key]) != _row_of(row["origin"]):
                dropped["exact duplicate"] += 1
                pairs.append({"dropped": row["origin"], "kept": first_seen[key], "kind": "exact"})
                return False
            if key in first_seen:
                return _contamination_free(row)
            first_seen[key] = row["origin"]
        if near is not None:
            match = near.seen(row["origin"], conversation_text(key_messages))
            if match is not None:
                dropped["near duplicate"] += 1
                pairs.append({"dropped": row["origin"], "kept": match, "kind": "near"})
                return False
        return _contamination_free(row)

    def _contamination_free(row) -> bool:
        found = index.hits(conversation_text(kind.all_messages(row))) if index is not None else None
        if found:
            dropped["contaminated"] += 1
            hits[row["origin"]] = sorted(found)
            return False
        return True

    kept = ds.filter(keep, desc="Deduplicating and decontaminating")
    steps = {"dedupe": {"exact": dropped["exact duplicate"], "near": dropped["near duplicate"],
                        "threshold": config.near_threshold, "examples": pairs[:MAX_LISTED]},
             "decontaminate": {"dropped": dropped["contaminated"], "ngram": config.ngram,
                               "eval_sets": config.decontaminate,
                               "eval_rows_hit": sorted({e for found in hits.values() for e in found}),
                               "train_rows_dropped": dict(list(hits.items())[:MAX_LISTED]),
                               "unreadable_eval_rows": len(unreadable), "unreadable_examples": unreadable[:MAX_LISTED]}}
    return kept, steps


def _row_of(origin: str) -> str:
    """The raw row an origin came from: '..., line 3, pair 2' -> '..., line 3'."""
    return re.sub(r", pair \d+$", "", origin)


def _eval_index(config: BuildConfig) -> tuple[EvalIndex | None, list[str]]:
    """The n-grams of every eval set, and the eval rows that could not be read (counted, and warned about: their
    n-grams are not checked)."""
    if not config.decontaminate:
        return None, []
    index, unreadable = EvalIndex(config.ngram), []
    for spec in config.decontaminate:
        for where, row in _eval_rows(spec):
            if isinstance(row, RowError):
                unreadable.append(f"{where}: {row}")
            else:  # any shape of eval row (GSM8K's question/answer, text, messages, pairs): all of its text
                index.add(where, eval_text(row))
    if unreadable:
        log.warning("%d eval row(s) could not be read, so training rows are not checked against them (first: %s)",
                    len(unreadable), unreadable[0])
    return index, unreadable


def _eval_rows(spec: str):
    """(where, row) of an eval set: a file or folder (every split in it), a dataset llmft or save_to_disk wrote
    (its test/ split where it has one), or a Hub id (its test split; ID:SPLIT for another)."""
    from llmft.dataset.sources import read_source
    from llmft.schema import is_saved_dataset

    path = Path(spec)
    if path.is_dir() and is_saved_dataset(path):
        folder = next((path / s for s in ("test", "train") if (path / s).is_dir()), path)
        rows = datasets.load_from_disk(str(folder))
        yield from ((f"{spec}, row {i + 1}", row) for i, row in enumerate(rows))
        return
    hub_id, colon, split = spec.rpartition(":")
    if colon and not path.exists() and hub_id.count("/") == 1:
        yield from read_source(hub_id, split=split)
        return
    yield from read_source(spec, split="test", check_splits=False)


# Fields of an eval row that label it rather than hold its text
NOT_TEXT = {"role", "from", "id", "type", "name", "tool_call_id", "split"}


def eval_text(value: Any) -> str:
    """Every text an eval row holds, whatever its format (system prompts left out: shared by many rows, they are
    not what a benchmark asks)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(filter(None, map(eval_text, value)))
    if isinstance(value, dict) and value.get("role") != "system" and value.get("from") != "system":
        return "\n".join(filter(None, (eval_text(v) for k, v in value.items() if k not in NOT_TEXT)))
    return ""


def _mix(ds: datasets.Dataset, config: BuildConfig):
    """Per source, all clean rows or a seeded sample (fraction or count), then shuffled together."""
    rng = random.Random(config.seed)
    by_source: dict[str, list[int]] = {}
    for i, name in enumerate(ds["source"]):
        by_source.setdefault(name, []).append(i)
    chosen, mix = [], {}
    for source in config.sources:
        rows = by_source.get(source.label, [])
        want = len(rows) if source.fraction is None and source.count is None else (
            round(len(rows) * source.fraction) if source.fraction is not None else source.count)
        if want > len(rows):
            raise DataError(f"source {source.label}: count {want} is more than its {len(rows)} clean rows.")
        if want == 0 and rows:
            log.warning("source %s: fraction %s of its %d clean rows rounds to none of them", source.label,
                        source.fraction, len(rows))
        picked = rng.sample(rows, want) if want < len(rows) else rows
        mix[source.label] = {"available": len(rows), "used": len(picked)}
        chosen += picked
    rng.shuffle(chosen)
    return ds.select(chosen), mix


def _split(ds: datasets.Dataset, kind: RowKind, config: BuildConfig) -> dict[str, datasets.Dataset]:
    """train/ and test/, with all rows of one prompt on the same side (pairs from one UltraFeedback row, KTO
    answers to one prompt): held-out rows must be prompts training never saw."""
    if len(ds) == 0:
        raise DataError("no rows left after cleaning and mixing; see rejects.jsonl and the counts in manifest.json "
                        "(steps.mix: the rows each source had and gave).")
    if not config.test_fraction:
        return {"train": ds}
    test = held_out_groups(group_keys(ds), config.test_fraction, config.seed)
    if len(test) >= len(ds):
        raise DataError(f"--test-fraction {config.test_fraction} of {len(ds)} clean row(s) leaves no row to train on: "
                        "lower it, or add rows.")
    chosen = set(test)
    return {"train": ds.select([i for i in range(len(ds)) if i not in chosen]), "test": ds.select(test)}


def _fingerprint(source: Source) -> dict[str, Any]:
    if Path(source.path).exists():
        return file_fingerprint(source.path)
    return {"hub_dataset": source.path, "split": source.split}


def data_card(manifest: dict[str, Any]) -> str:
    """The manifest for people: where the data came from and what happened to every row."""
    lines = ["# Dataset card", "", f"Built with: `{manifest['command']}` (seed {manifest['seed']})", "",
             "## Sources", "", "| source | format | sha256 | read | kept | rejected |", "|---|---|---|---|---|---|"]
    for s in manifest["sources"]:
        sha = s["fingerprint"].get("sha256", s["fingerprint"].get("hub_dataset", ""))[:12]
        rejected = sum(s["rejected"].values())
        lines.append(f"| {s['name']} | {s['format']} | {sha} | {s['read']} | {s['kept']} | {rejected} |")
    reasons, adjusted = Counter(), Counter()
    for s in manifest["sources"]:
        reasons.update(s["rejected"])
        adjusted.update(s.get("adjusted", {}))
    if adjusted:
        lines += ["", "Changed on the way in:", ""] + [f"- {n} x {what}" for what, n in adjusted.most_common()]
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
