"""Which precision should LoRA/full fine-tuning use on this machine? Measures, prints a table.

    python benchmarks/bf16_cpu.py [--steps 6]

1. Matmul throughput (1024x1024, all threads) in fp32, bf16 and fp16.
2. A short LoRA fine-tune of the embedded SmolLM2-135M-Instruct on the demo data through `llmft train`, once per
   precision: fp32 weights; fp32 weights + bf16 autocast; bf16 frozen weights + bf16 autocast. Each run is a
   fresh process (its own peak RSS). A bf16 run is skipped when bf16 matmuls are more than 2x slower than fp32
   (no native bf16: a few steps would take hours), and the table says so.
Reported: non-padding tokens/s, peak RSS, final train loss and eval loss, and the ratio to fp32.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2-135m-instruct" / "lora" / "demo.yaml"
LLMFT = str(Path(sys.executable).parent / "llmft")


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeat: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - start) / 1e9


def train_run(name: str, overrides: list[str], data: dict, steps: int, workdir: Path) -> dict:
    out = workdir / name
    cmd = [LLMFT, "train", str(RECIPE), "--train_data", str(data["train"]), "--eval_data", str(data["eval"]),
           "--output_dir", str(out), "--max_steps", str(steps), "--num_generate", "0", "--baseline", "false",
           "--max_eval_examples", "32", "--logging_steps", "1", *overrides]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = json.loads((out / "run.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    train_metrics = metrics["train"]
    return {"tokens_per_s": logs[-1]["num_tokens"] / train_metrics["train_runtime"],
            "peak_rss_mb": run["hardware"]["peak_rss_mb"], "train_loss": logs[-1]["loss"],
            "eval_loss": metrics["after"]["eval_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    speeds = {name: matmul_gflops(dtype) for name, dtype in
              (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
    print("| matmul 1024^3 | GFLOP/s | vs fp32 |\n|---|---|---|")
    for name, value in speeds.items():
        print(f"| {name} | {value:.1f} | {value / speeds['fp32']:.2f}x |")

    from llmft.dataset.demo import write_demo_data
    from llmft.hardware import fast_bf16_available

    bf16_usable = speeds["bf16"] > speeds["fp32"] / 2
    configs = [("fp32 weights, fp32 compute", ["--dtype", "float32", "--bf16", "false"], True),
               ("fp32 weights, bf16 autocast", ["--dtype", "float32", "--bf16", "true"], bf16_usable),
               ("bf16 frozen weights, bf16 autocast", ["--dtype", "bfloat16", "--bf16", "true"], bf16_usable)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_data(Path(tmp) / "data", train_rows=64, eval_rows=32)
        for name, overrides, runnable in configs:
            result = train_run(name.replace(" ", "_").replace(",", ""), overrides, data, args.steps, Path(tmp)) \
                if runnable else None
            rows.append((name, result))
    base = rows[0][1]["tokens_per_s"]
    print(f"\nLoRA r=16 on SmolLM2-135M, demo data, batch 8, {args.steps} steps, {torch.get_num_threads()} threads; "
          f"llmft's auto default here: {'bf16' if fast_bf16_available() else 'fp32'}")
    print("| precision | tokens/s | vs fp32 | peak RSS MB | train loss | eval loss |\n|---|---|---|---|---|---|")
    for name, r in rows:
        if r is None:
            print(f"| {name} | skipped: bf16 matmul {speeds['bf16'] / speeds['fp32']:.2f}x fp32 here | | | | |")
        else:
            print(f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {r['peak_rss_mb']} "
                  f"| {r['train_loss']:.4f} | {r['eval_loss']:.4f} |")


if __name__ == "__main__":
    main()
