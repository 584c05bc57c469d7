"""`llmft estimate` against the peak memory run.json records, on the shipped CPU recipes.

Each recipe trains for a few steps with its own data, evaluation and settings (only max_steps and the output folder
changed), then `llmft estimate` runs on the same recipe and overrides; the table compares the two.

    python benchmarks/estimate_calibration.py [--recipes lora/demo dpo/demo ...] [--steps 5]

Needs the demo data (make demo), and for pretrain/c4 and lora/gsm8k their data folders (docs/rl.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMFT = str(Path(sys.executable).parent / "llmft")
RECIPES = ("lora/demo", "full/low_memory", "qlora/demo", "dpo/demo", "pretrain/c4", "lora/gsm8k")


def measure(recipe: str, steps: int, out: Path) -> dict:
    path = ROOT / "recipes" / "smollm2-135m-instruct" / f"{recipe}.yaml"
    overrides = ["--max_steps", str(steps), "--output_dir", str(out), "--overwrite_output_dir", "true"]
    started = time.time()
    subprocess.run([LLMFT, "train", str(path), *overrides], check=True, cwd=ROOT, capture_output=True)
    measured = json.loads((out / "run.json").read_text())["hardware"]["peak_rss_mb"] / 1024
    shown = subprocess.run([LLMFT, "estimate", str(path), "--json", "true", *overrides], check=True, cwd=ROOT,
                           capture_output=True, text=True).stdout
    estimate = json.loads(shown[shown.index("{"):])
    train = json.loads((out / "metrics.json").read_text())["train"]
    rate = train.get("num_input_tokens_seen", 0) / train["train_runtime"]
    timing = estimate["time"]
    return {"recipe": recipe, "measured_gb": round(measured, 2), "estimate_gb": estimate["memory_gb"]["total"],
            "ratio": round(estimate["memory_gb"]["total"] / measured, 3), "parts": estimate["memory_gb"],
            "tokens_per_second": round(rate, 1),
            "mfu": round(rate * timing["flops_per_token"] / (timing["peak_tflops"] * 1e12), 4) if rate else None,
            "seconds": round(time.time() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(f"CPU flags: avx512_bf16={'avx512_bf16' in flags} amx_bf16={'amx_bf16' in flags}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            rows.append(measure(recipe, args.steps, Path(tmp) / recipe.replace("/", "-")))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| recipe | measured peak (run.json) | llmft estimate | estimate / measured | tokens/s | MFU |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(f"| {r['recipe']} | {r['measured_gb']:.2f} GB | {r['estimate_gb']:.2f} GB | {r['ratio']:.2f} | "
              f"{r['tokens_per_second'] or '-'} | {mfu} |")


if __name__ == "__main__":
    main()
