"""Rows/s of `llmft data convert` and of tokenization with loss masks, on the largest shared data file.

    python benchmarks/data_prep_throughput.py [--file ../shared/data/lima.json [--format alpaca]] [--num-proc 1 2]

The default file is lima.json, the largest conversational file there (3 MB, 1,029 rows, long answers).
Prints one table: conversion alone (read + convert + normalise + checks + exact and near dedupe + write), then
tokenization with the embedded SmolLM2 tokenizer and chat template (llmft.data.prepare_dataset), per num_proc.
"""

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, default=SHARED / "lima.json")
    parser.add_argument("--format", default=None, help="input format (default: detected)")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    path = args.file

    import datasets

    from llmft.config import ModelConfig
    from llmft.data import prepare_dataset
    from llmft.model import load_tokenizer
    from llmft.dataset.build import BuildConfig, Source, build

    datasets.disable_progress_bars()
    datasets.disable_caching()  # each run must tokenize, not reuse the previous run's cache files
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = build(BuildConfig(sources=[Source(path=str(path), format=args.format)], out=f"{tmp}/out"))
        seconds = time.perf_counter() - start
        n = manifest["sources"][0]["read"]
        rows.append(("convert + clean + dedupe + write", 1, n, seconds))
        train = datasets.load_from_disk(f"{tmp}/out/train")
        tokenizer = load_tokenizer(ModelConfig())
        for num_proc in args.num_proc:
            start = time.perf_counter()
            prepare_dataset(train, tokenizer, 2048, "drop", str(path), num_proc=num_proc if num_proc > 1 else None)
            rows.append(("tokenize with loss masks (SmolLM2)", num_proc, len(train), time.perf_counter() - start))
    print(f"file: {path.name} ({path.stat().st_size / 1e6:.1f} MB)\n")
    print("| step | processes | rows | seconds | rows/s |\n|---|---|---|---|---|")
    for step, procs, n, seconds in rows:
        print(f"| {step} | {procs} | {n} | {seconds:.1f} | {n / seconds:.0f} |")


if __name__ == "__main__":
    main()
