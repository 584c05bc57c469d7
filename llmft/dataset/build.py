"""Building a training dataset from raw sources: convert, clean, dedupe, decontaminate, mix, split, write.

Output directory:
  train/, test/        `datasets.save_to_disk` splits with a `messages` column (`test/` only with a test split)
  manifest.json        sources with fingerprints, row counts in/out per step, every drop reason, seed, command
  data_card.md         the same for people
  rejects.jsonl        rows that failed conversion or checks, with the reason (`on_error: skip`)
Rows stream from the sources into Arrow files, so memory does not grow with the size of the input.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from llmft.dataset.clean import EvalIndex, NearDuplicateFinder, conversation_text, exact_key, normalise_messages
from llmft.dataset.formats import (CONVERTERS, FORMATS, detect_format, from_columns, from_sharegpt, oasst_deleted,
                                   oasst_flat_to_trees, oasst_paths, trim_to_answer)
from llmft.dataset.sources import read_source
from llmft.errors import ConfigError, DataError, LlmftError
from llmft.parsing import coerce, field_names, field_types, read_yaml_mapping, unknown_keys
from llmft.schema import MAX_LISTED, RowError, clean_tools, conversation_problems, file_fingerprint, tools_problems

log = logging.getLogger(__name__)


# Options: the flags of `llmft data convert` and the keys of a build file are the same fields -------------------


@dataclass
class SourceOptions:
    """How one source is read: its format and, for plain columns, which columns hold what."""

    format: str | None = field(default=None, metadata={"help": f"Input format: {' | '.join(FORMATS)} (default: "
                                                                "detected from the first row)."})
    split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    prompt_field: str = field(default="question", metadata={"help": "format columns: the prompt column."})
    completion_field: str = field(default="answer", metadata={"help": "format columns: the answer column."})
    system_field: str | None = field(default=None, metadata={"help": "format columns: a system prompt column."})
    oasst_best_only: bool = field(default=False, metadata={"help": "OASST: the best-ranked path of each tree only."})
    role_map: list[str] = field(default_factory=list, metadata={
        "metavar": "SPEAKER=ROLE", "help": "ShareGPT: speakers beyond the documented ones (human, gpt, system, "
                                           "observation, function_call...), e.g. bing=assistant."})

    def __post_init__(self):
        problems = []
        if self.format is not None and self.format not in FORMATS:
            problems.append(f"format: '{self.format}' is not one of {', '.join(FORMATS)}.")
        for entry in self.role_map:
            speaker, equals, role = entry.partition("=")
            if not (speaker and equals and role in ("user", "assistant", "system", "tool")):
                problems.append(f"role_map: '{entry}' is not SPEAKER=ROLE with ROLE user, assistant, system or tool.")
        if problems:
            raise ConfigError(problems, what="data source")

    @property
    def roles(self) -> dict[str, str]:
        return dict(entry.split("=", 1) for entry in self.role_map)


@dataclass(kw_only=True)
class Source(SourceOptions):
    """One input of a build file: a file, folder or Hub dataset id, how to read it, and its share of the mix."""

    path: str = field(default="", metadata={"help": "A file, a folder of files, or a Hub dataset id (org/name)."})
    name: str | None = field(default=None, metadata={"help": "Label in the manifest (default: the file name)."})
    fraction: float | None = field(default=None, metadata={"help": "Share of this source's clean rows in the mix."})
    count: int | None = field(default=None, metadata={"help": "Or an exact number of its clean rows."})

    def __post_init__(self):
        super().__post_init__()
        problems = [] if self.path else ["path: missing: give a file, folder or Hub dataset id."]
        if self.fraction is not None and not 0 < self.fraction <= 1:
            problems.append(f"fraction: {self.fraction} must be in (0, 1].")
        if self.fraction is not None and self.count is not None:
            problems.append("fraction and count: give one of them, not both.")
        if self.count is not None and self.count < 1:
            problems.append(f"count: {self.count} must be >= 1.")
        if problems:
            raise ConfigError([f"source {self.label}: {p}" for p in problems], what="data source")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


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


# Conversion ----------------------------------------------------------------------------------------------------


DETECT_WITHIN = 100  # rows read to find the first readable one, whose keys say the format


def source_format(source: Source) -> str | None:
    """The source's format: as given, or detected from its first readable row (a broken first line must not decide
    the format of the good rows after it); None for an empty source."""
    if source.format is not None:
        return source.format
    first = None
    for first in itertools.islice(read_source(source.path, source.split, source.label), DETECT_WITHIN):
        if isinstance(first[1], dict):
            break
    if first is None:
        return None
    if not isinstance(first[1], dict):
        return "openai"  # nothing readable to detect from: the rows are reported as they are
    try:
        return detect_format(first[1])
    except ValueError as err:
        raise DataError(f"{source.path}: {err}") from err


def convert_rows(source: Source, fmt: str | None, notes: Counter | None = None) -> Iterator:
    """(where, messages or RowError, raw row) for every conversation of a source in format `fmt`; `notes` counts
    what conversion changed without rejecting (OASST threads cut after their last answer)."""
    if fmt is None:
        return iter(())
    rows = read_source(source.path, source.split, source.label)
    if fmt == "oasst":
        return _convert_oasst(rows, source, Counter() if notes is None else notes)
    if fmt == "columns":
        convert = lambda r: from_columns(r, source.prompt_field, source.completion_field, source.system_field)  # noqa: E731
    elif fmt == "sharegpt":
        convert = lambda r: from_sharegpt(r, source.roles)  # noqa: E731
    else:
        convert = CONVERTERS[fmt]
    return _convert(rows, convert)


def _convert(rows, convert):
    for where, row in rows:
        if isinstance(row, RowError):
            yield where, row, None
            continue
        try:
            yield where, convert(row), row
        except RowError as err:
            yield where, err, row


def _bad_ids(row: dict) -> str | None:
    """The id field of a flat OASST message that is not an id (a list, an object...), or None."""
    if not isinstance(row["message_id"], (str, int)) or isinstance(row["message_id"], bool):
        return "message_id"
    parent = row.get("parent_id")
    return None if parent is None or isinstance(parent, (str, int)) and not isinstance(parent, bool) else "parent_id"


def _convert_oasst(rows, source: Source, notes: Counter):
    """Nested trees convert row by row; flat message rows are assembled into trees first. Every thread is cut after
    its last assistant reply (real exports end many threads on an unanswered prompter message), and a thread that
    becomes the same as one already taken is not taken twice; `notes` counts both."""
    rows = list(rows)  # trees span rows: the whole file is needed (OASST exports are modest in size)
    flat = [r for _, r in rows if isinstance(r, dict) and "message_id" in r and not _bad_ids(r)]
    trees = [(w, r["prompt"]) for w, r in rows if isinstance(r, dict) and isinstance(r.get("prompt"), dict)]
    for where, row in rows:
        if isinstance(row, RowError):
            yield where, row, None
        elif "message_id" in row and _bad_ids(row):
            yield where, RowError(_bad_ids(row), "must be a string id"), row
        elif "message_id" not in row and not isinstance(row.get("prompt"), dict):
            yield where, RowError(None, "neither an OASST tree (message_tree_id, prompt: {text, role, replies}) nor "
                                        "an OASST message (message_id, parent_id, role, text)"), row
    if flat:
        nested, unplaced = oasst_flat_to_trees(flat)
        trees += [(f"{source.label}, tree {i + 1}", t) for i, t in enumerate(nested)]
        for message_id, problem in unplaced:
            yield f"{source.label}, message {message_id}", problem, None
    seen: set[str] = set()
    for where, tree in trees:
        notes["deleted replies left out"] += oasst_deleted(tree)
        try:
            paths = oasst_paths(tree, source.oasst_best_only)
        except RowError as err:
            yield where, err, tree
            continue
        for k, path in enumerate(paths):
            thread = trim_to_answer(path)
            if thread is None:
                yield f"{where}, path {k + 1}", RowError(None, "no assistant reply in this thread"), None
                continue
            notes["threads cut after their last assistant reply"] += len(thread) < len(path)
            key = json.dumps(thread, sort_keys=True)
            if key in seen:
                notes["threads the same as another once cut"] += 1
                continue
            seen.add(key)
            yield f"{where}, path {k + 1}", thread, None


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
        parts = []
        for source in config.sources:
            fmt, ds, stats = _convert_source(source, config, rejects, cache)
            manifest["sources"].append({"name": source.label, "path": source.path, "format": fmt,
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
    """(format, dataset of the source's valid conversations, counts); bad rows are listed, or skipped and counted."""
    counts, notes, problems = Counter(), Counter(), []
    fmt = source_format(source)

    def generate():
        for where, result, raw in convert_rows(source, fmt, notes):
            counts["read"] += 1
            if not isinstance(result, RowError):
                messages = normalise_messages(result, config.system_prompt) if config.normalise else result
                raw_tools = raw.get("tools") if isinstance(raw, dict) else None
                found = conversation_problems(messages, strict=True) + tools_problems(raw_tools)
                if not found:
                    counts["kept"] += 1
                    yield {"messages": messages, "tools": clean_tools(raw_tools), "source": source.label,
                           "origin": where}
                    continue
                result = RowError(None, "; ".join(found))
            counts[_reason(result)] += 1
            problems.append(f"{where}: {result}")
            rejects.write(json.dumps({"source": source.label, "where": where, "reason": str(result), "row": raw},
                                     default=str) + "\n")

    try:
        ds = datasets.Dataset.from_generator(generate, cache_dir=cache,
                                             features=chat_features(), split=datasets.Split.TRAIN)
    except datasets.exceptions.DatasetGenerationError as err:  # raised inside the generator, wrapped by datasets
        if isinstance(err.__cause__, LlmftError):
            raise err.__cause__ from err
        if isinstance(err.__cause__, OSError):
            raise DataError(f"cannot read {source.path}: {err.__cause__}") from err
        raise  # anything else is a bug in llmft, not bad input: keep its traceback
    except ValueError:  # datasets refuses a generator that yielded nothing
        if counts["kept"]:
            raise
        ds = datasets.Dataset.from_dict({name: [] for name in chat_features()}, features=chat_features())
    if problems and config.on_error == "fail":
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{source.path}: {len(problems)} row(s) cannot be used:\n  {listed}{more}\n"
                        "Fix them, or pass --on-error skip to leave them out (they go to rejects.jsonl).")
    if not counts["read"]:
        raise DataError(f"{source.path}: no rows (the file is empty, or holds no conversation).")
    log.info("%s (%s): %d read, %d kept", source.label, fmt, counts["read"], counts["kept"])
    return fmt, ds, {"read": counts.pop("read", 0), "kept": counts.pop("kept", 0), "rejected": dict(counts),
                     "adjusted": {k: v for k, v in notes.items() if v}}


def _reason(error: RowError) -> str:
    """A row's problem without its positions, so equal problems count together in the manifest."""
    text = str(error).split(";")[0]
    return re.sub(r"\[\d+\]| at column \d+", "", text)


def chat_features() -> datasets.Features:
    """The columns of a built dataset: tool calls and tools as JSON, so that rows keep exactly their own keys."""
    message = {"role": datasets.Value("string"), "content": datasets.Value("string"),
               "tool_calls": datasets.Json(), "tool_call_id": datasets.Value("string"),
               "name": datasets.Value("string"), "reasoning_content": datasets.Value("string")}
    return datasets.Features({"messages": datasets.List(message), "tools": datasets.Json(),
                              "source": datasets.Value("string"), "origin": datasets.Value("string")})


def _filter(ds: datasets.Dataset, config: BuildConfig):
    """Exact duplicates, near duplicates and contaminated rows out, in one pass; counts and examples kept."""
    index, unreadable = _eval_index(config)
    near = NearDuplicateFinder(config.near_threshold) if config.near_threshold and config.dedupe else None
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
                        "threshold": config.near_threshold, "examples": pairs[:MAX_LISTED]},
             "decontaminate": {"dropped": dropped["contaminated"], "ngram": config.ngram,
                               "eval_sets": config.decontaminate,
                               "eval_rows_hit": sorted({e for found in hits.values() for e in found}),
                               "train_rows_dropped": dict(list(hits.items())[:MAX_LISTED]),
                               "unreadable_eval_rows": len(unreadable), "unreadable_examples": unreadable[:MAX_LISTED]}}
    return kept, steps


def _eval_index(config: BuildConfig) -> tuple[EvalIndex | None, list[str]]:
    """The n-grams of every eval set, and the eval rows that could not be read (counted, and warned about: their
    n-grams are not checked)."""
    if not config.decontaminate:
        return None, []
    index, unreadable = EvalIndex(config.ngram), []
    for spec in config.decontaminate:
        source = Source(path=spec)
        for where, result, _ in convert_rows(source, source_format(source)):
            if isinstance(result, RowError):
                unreadable.append(f"{where}: {result}")
            else:
                index.add(where, conversation_text(result))
    if unreadable:
        log.warning("%d eval row(s) could not be read, so training rows are not checked against them (first: %s)",
                    len(unreadable), unreadable[0])
    return index, unreadable


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
        picked = rng.sample(rows, want) if want < len(rows) else rows
        mix[source.label] = {"available": len(rows), "used": len(picked)}
        chosen += picked
    rng.shuffle(chosen)
    return ds.select(chosen), mix


def _split(ds: datasets.Dataset, config: BuildConfig) -> dict[str, datasets.Dataset]:
    if len(ds) == 0:
        raise DataError("no rows left after cleaning; see rejects.jsonl and the counts in manifest.json.")
    if not config.test_fraction:
        return {"train": ds}
    test = math.ceil(config.test_fraction * len(ds))  # how datasets sizes the test split
    if test >= len(ds):
        raise DataError(f"--test-fraction {config.test_fraction} of {len(ds)} clean row(s) leaves no row to train on: "
                        "lower it, or add rows.")
    parts = ds.train_test_split(test_size=config.test_fraction, seed=config.seed)
    return {"train": parts["train"], "test": parts["test"]}


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
