"""One source, read and converted: its options, its format (given or detected), and every row it holds as a
conversation, a preference pair or an unpaired answer, or as a RowError saying why it cannot be one.

`convert_rows` yields (where, result or RowError, raw row) for everything a source holds, so the build can count
every row: kept, or rejected with its reason.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmft.dataset.formats import (CONVERTERS, FORMATS, detect_format, from_columns, from_sharegpt, from_text,
                                   oasst_deleted, oasst_flat_to_trees, oasst_paths, trim_to_answer)
from llmft.dataset.preference import (PAIR_FORMATS, PREFERENCE_FORMATS, detect_preference_format, from_hh,
                                      from_kto, from_pairs, from_sharegpt_pairs, from_ultrafeedback, oasst_pairs)
from llmft.dataset.sources import read_source
from llmft.errors import ConfigError, DataError
from llmft.schema import MESSAGES, PREFERENCE, TEXT, UNPAIRED, RowError

ALL_FORMATS = FORMATS + PREFERENCE_FORMATS


def kind_of_format(fmt: str | None) -> str:
    """The kind of rows (llmft.schema) a format gives."""
    return PREFERENCE if fmt in PAIR_FORMATS else UNPAIRED if fmt == "kto" else TEXT if fmt == "text" else MESSAGES


# Options: the flags of `llmft data convert` and a build file's source keys are the same fields -----------------


@dataclass
class SourceOptions:
    """How one source is read: its format and, for plain columns, which columns hold what."""

    format: str | None = field(default=None, metadata={"help": f"Input format: {' | '.join(ALL_FORMATS)} (default: "
                                                                "detected from the first row)."})
    split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    prompt_field: str = field(default="question", metadata={"help": "format columns: the prompt column."})
    completion_field: str = field(default="answer", metadata={"help": "format columns: the answer column."})
    system_field: str | None = field(default=None, metadata={"help": "format columns: a system prompt column."})
    oasst_best_only: bool = field(default=False, metadata={"help": "OASST: the best-ranked path of each tree only."})
    role_map: list[str] = field(default_factory=list, metadata={
        "metavar": "SPEAKER=ROLE", "help": "ShareGPT: speakers beyond the documented ones (human, gpt, system, "
                                           "observation, function_call...), e.g. bing=assistant."})
    pair_margin: float | None = field(default=None, metadata={
        "help": "UltraFeedback: every pair of answers rated at least this far apart (default: best vs worst only)."})

    def __post_init__(self):
        problems = []
        if self.format is not None and self.format not in ALL_FORMATS:
            problems.append(f"format: '{self.format}' is not one of {', '.join(ALL_FORMATS)}.")
        for entry in self.role_map:
            speaker, equals, role = entry.partition("=")
            if not (speaker and equals and role in ("user", "assistant", "system", "tool")):
                problems.append(f"role_map: '{entry}' is not SPEAKER=ROLE with ROLE user, assistant, system or tool.")
        if self.pair_margin is not None and not self.pair_margin > 0:
            problems.append(f"pair_margin: {self.pair_margin} must be > 0.")
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


# Format -------------------------------------------------------------------------------------------------------


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
        return detect_preference_format(first[1]) or detect_format(first[1])
    except ValueError as err:
        raise DataError(f"{source.path}: {err}") from err


# Conversion ---------------------------------------------------------------------------------------------------


def convert_rows(source: Source, fmt: str | None, notes: Counter | None = None) -> Iterator:
    """(where, converted row or RowError, raw row) for everything a source in format `fmt` holds: conversations
    (messages), pairs or unpaired answers (dicts, llmft.dataset.preference); `notes` counts what conversion changed
    or left out without rejecting a row (OASST threads cut after their last answer, trees without ranked replies)."""
    if fmt is None:
        return iter(())
    rows = read_source(source.path, source.split, source.label)
    notes = Counter() if notes is None else notes
    if fmt in ("oasst", "oasst_pairs"):
        return _convert_oasst(rows, source, notes, pairs=fmt == "oasst_pairs")
    if fmt == "ultrafeedback":
        return _convert(rows, lambda r: from_ultrafeedback(r, source.pair_margin), many="pair")
    converters = {**CONVERTERS, "pairs": from_pairs, "hh": from_hh, "kto": from_kto, "text": from_text,
                  "columns": lambda r: from_columns(r, source.prompt_field, source.completion_field,
                                                    source.system_field),
                  "sharegpt": lambda r: from_sharegpt(r, source.roles),
                  "sharegpt_pairs": lambda r: from_sharegpt_pairs(r, source.roles)}
    return _convert(rows, converters[fmt])


def _convert(rows, convert, many: str | None = None):
    """Each raw row converted; with `many`, a row gives a list of results, each labelled '..., {many} K'."""
    for where, row in rows:
        if isinstance(row, RowError):
            yield where, row, None
            continue
        try:
            result = convert(row)
        except RowError as err:
            yield where, err, row
            continue
        if many is None:
            yield where, result, row
        else:
            for k, one in enumerate(result, start=1):
                yield f"{where}, {many} {k}", one, row


def _bad_ids(row: dict) -> str | None:
    """The id field of a flat OASST message that is not an id (a list, an object...), or None."""
    if not isinstance(row["message_id"], (str, int)) or isinstance(row["message_id"], bool):
        return "message_id"
    parent = row.get("parent_id")
    return None if parent is None or isinstance(parent, (str, int)) and not isinstance(parent, bool) else "parent_id"


def _convert_oasst(rows, source: Source, notes: Counter, pairs: bool):
    """Nested trees convert row by row; flat message rows are assembled into trees first. Then each tree gives its
    threads (each cut after its last assistant reply: real exports end many threads on an unanswered prompter
    message; a thread that becomes the same as one already taken is not taken twice) or, with `pairs`, its ranked
    replies as preference pairs; `notes` counts what was cut, repeated, deleted, or had no pair."""
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
            found = oasst_pairs(tree) if pairs else oasst_paths(tree, source.oasst_best_only)
        except RowError as err:
            yield where, err, tree
            continue
        if pairs:
            notes["trees without two differently ranked replies (no pair)"] += not found
            yield from ((f"{where}, pair {k + 1}", pair, None) for k, pair in enumerate(found))
            continue
        for k, path in enumerate(found):
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
