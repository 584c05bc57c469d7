"""Raw rows from where users keep data: local JSON, JSONL, CSV and Parquet files or folders, and Hub datasets.

Every reader streams (memory stays flat however large the file) and labels each row with where it came from,
"file.jsonl, line 12", so every later error can name it. A line that is not valid JSON comes out as a
`RowError` in place of its row, for the caller to skip or stop on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmft.formats import RowError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
Row = tuple[str, dict[str, Any] | RowError]


class SourceError(ValueError):
    """A source that cannot be read at all (missing, wrong kind of file, unreachable Hub id)."""


def read_source(spec: str, split: str = "train") -> Iterator[Row]:
    """Rows of a local file or folder, or of a Hub dataset id (`org/name`, split `split`), with their labels."""
    path = Path(spec)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in EXTENSIONS) if path.is_dir() else [path]
        if not files:
            raise SourceError(f"{spec}: no {', '.join(EXTENSIONS)} files in this folder.")
        for file in files:
            yield from read_file(file)
    elif spec.count("/") == 1 and not spec.startswith((".", "/")):
        yield from read_hub(spec, split)
    else:
        raise SourceError(f"{spec}: no such file or folder (and not a Hub dataset id of the form org/name).")


def read_file(path: Path) -> Iterator[Row]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise SourceError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)}.")
    yield from readers[path.suffix](path)


def _read_jsonl(path: Path) -> Iterator[Row]:
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


def _read_json(path: Path) -> Iterator[Row]:
    """A JSON array of objects, streamed item by item with ijson (a JSON-lines file named .json works too)."""
    import ijson

    with path.open("rb") as f:
        first = f.read(1024).lstrip()[:1]
    if first == b"{":  # one object per line, as many tools write '.json'
        yield from _read_jsonl(path)
        return
    if first != b"[":
        raise SourceError(f"{path}: expected a JSON array of objects (or one object per line).")
    number = 0
    with path.open("rb") as f:
        try:
            for number, row in enumerate(ijson.items(f, "item", use_float=True), start=1):
                where = f"{path.name}, row {number}"
                yield where, row if isinstance(row, dict) else RowError(None, f"not a JSON object: {type(row).__name__}")
        except ijson.JSONError as err:
            raise SourceError(f"{path}: not valid JSON after row {number}: {err}") from err


def _read_csv(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"{path.name}, line {reader.line_num}", dict(row)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield f"{path.name}, row {number}", row


def read_hub(dataset_id: str, split: str) -> Iterator[Row]:
    """A Hub dataset, streamed through `datasets.load_dataset(..., streaming=True)`."""
    import datasets

    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
        for number, row in enumerate(stream, start=1):
            yield f"{dataset_id}[{split}], row {number}", row
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise SourceError(f"{dataset_id}: cannot load this Hub dataset (split '{split}'): {err}") from err
