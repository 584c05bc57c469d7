"""Raw rows from where users keep data: local JSON, JSONL, CSV and Parquet files or folders, and Hub datasets.

Every reader streams (memory stays flat however large the file) and labels each row with where it came from,
"file.jsonl, line 12", so every later error can name it. A line that is not valid JSON comes out as a
`RowError` in place of its row (the JSON readers are the schema's own), for the caller to skip or stop on.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmft.errors import DataError
from llmft.schema import RowError, data_files, read_json, read_jsonl

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
Row = tuple[str, dict[str, Any] | RowError]


def read_source(spec: str, split: str = "train", label: str | None = None, check_splits: bool = True) -> Iterator[Row]:
    """Rows of a local file or folder, or of a Hub dataset id (`org/name`, split `split`), each with where it came
    from: "LABEL, line 12" for a file (LABEL defaults to its name), "LABEL/sub/file.jsonl, line 12" for a folder's
    files (so two train.jsonl in different subfolders stay apart)."""
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            yield from read_file(path, label)
            return
        files = data_files(sorted(p for p in path.rglob("*") if p.suffix in EXTENSIONS and p.is_file()),
                           path, check_splits)
        if not files:
            raise DataError(f"{spec}: no {', '.join(EXTENSIONS)} files in this folder.")
        for file in files:
            yield from read_file(file, f"{label or path.name}/{file.relative_to(path)}")
    elif spec.count("/") == 1 and not spec.startswith((".", "/")) and Path(spec).suffix not in EXTENSIONS:
        yield from read_hub(spec, split)
    else:
        raise DataError(f"{spec}: no such file or folder (and not a Hub dataset id of the form org/name).")


def read_file(path: Path, name: str | None = None) -> Iterator[Row]:
    """Rows of one file, labelled with `name` (default: the file's name)."""
    readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": _read_csv, ".parquet": _read_parquet,
               ".txt": _read_text}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)}.")
    try:
        yield from readers[path.suffix](path, name)
    except OSError as err:  # no permission, a vanished file, a read error
        raise DataError(f"cannot read {path}: {err.strerror or err}.") from err


def _read_text(path: Path, name: str | None = None) -> Iterator[Row]:
    """A plain-text file is one document: {"text": its content} (raw text for continued pretraining)."""
    try:
        yield name or path.name, {"text": path.read_bytes().decode("utf-8-sig")}
    except UnicodeDecodeError as err:
        yield name or path.name, RowError(None, f"not UTF-8 text (byte {err.start + 1}): save the file as UTF-8")


def _read_csv(path: Path, name: str | None = None) -> Iterator[Row]:
    """Rows by the header's names; a row with more or fewer fields than the header is a RowError, not silently cut
    or padded."""
    csv.field_size_limit(2**31 - 1)  # Python's default, 128 kB a field, refuses long documents
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is not part of the header
        reader = csv.DictReader(f)
        try:
            repeated = sorted({n for n in reader.fieldnames or [] if n and reader.fieldnames.count(n) > 1})
            if repeated:  # DictReader would keep the last column of each name without a word
                raise DataError(f"{path}, line 1: the header names column(s) {', '.join(map(repr, repeated))} more "
                                "than once; rename them so that each column has its own name.")
            for row in reader:
                where = f"{name or path.name}, line {reader.line_num}"
                extra = row.pop(None, None)  # DictReader files surplus fields under the key None
                missing = sum(value is None for value in row.values())  # and fills missing ones with None
                if extra:
                    row = RowError(None, f"{len(extra)} more field(s) than the header's {len(reader.fieldnames)} "
                                         "(an unquoted comma?)")
                elif missing:
                    row = RowError(None, f"{missing} field(s) fewer than the header's {len(reader.fieldnames)}")
                yield where, row
        except UnicodeDecodeError as err:
            raise DataError(f"{path}, after line {reader.line_num}: not UTF-8 text; save the file as UTF-8. (A file "
                            "that cannot be decoded cannot be read past that point, also with --on-error skip.)") from err
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV: {err}") from err


def _read_parquet(path: Path, name: str | None = None) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err}); re-export it, or convert it to JSON lines.") from err
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield f"{name or path.name}, row {number}", row
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: the Parquet file breaks after row {number} ({err}); re-export it.") from err


def read_hub(dataset_id: str, split: str) -> Iterator[Row]:
    """A Hub dataset, streamed through `datasets.load_dataset(..., streaming=True)`."""
    import datasets

    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
        for number, row in enumerate(stream, start=1):
            yield f"{dataset_id}[{split}], row {number}", row
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise DataError(f"{dataset_id}: cannot load this Hub dataset (split '{split}'): {err}") from err
