"""Full fine-tuning's bf16 weight copies: autocast's cast per pass vs llmft's once per optimizer step, alternated.

    python benchmarks/weight_copies_steps.py [--lengths 400 300 450 200] [--rounds 8]

Two copies of SmolLM2-135M in float32 with llmft's other CPU levers (fused RMSNorm, recomputed bf16 attention, LM
head on loss positions), one of them with llmft.cpu_speed.bf16_weights_once_per_step, each with its own AdamW. One
optimizer step: one pass per example of `lengths` random tokens under bf16 autocast (a CPU micro-batch each),
accumulated, then AdamW's step. The two models' steps alternate in one process (ABBA order), since whole runs in
separate processes move by more than the difference; prints the median seconds per step of each and their ratio.
Needs native bf16 to mean anything (without it llmft trains in float32 and never casts).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sft_throughput import hardware_line  # noqa: E402

from llmft import cpu_speed  # noqa: E402
from llmft.config import ModelConfig, PeftSettings  # noqa: E402
from llmft.hardware import preload_allocator  # noqa: E402
from llmft.model import load_model  # noqa: E402


def full_model():
    model = load_model(ModelConfig(dtype="float32"), PeftSettings(method="full"))
    cpu_speed.fused_rms_norms(model)
    cpu_speed.recomputed_attention(model)
    cpu_speed.loss_positions_head(model)
    return model.train()


def step(model, optimizer, examples) -> float:
    start = time.perf_counter()
    for ids in examples:
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[400, 300, 450, 200])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    preload_allocator(["train"])  # the allocator `llmft train` runs on
    print(hardware_line() + "\n")
    per_pass = full_model()
    once = copy.deepcopy(per_pass)
    cpu_speed.bf16_weights_once_per_step(once)
    runs = {"cast per pass": (per_pass, torch.optim.AdamW(per_pass.parameters(), lr=1e-5)),
            "once per step": (once, torch.optim.AdamW(once.parameters(), lr=1e-5))}
    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, per_pass.config.vocab_size, (1, n), generator=generator) for n in args.lengths]
    for model, optimizer in runs.values():  # warm-up
        step(model, optimizer, examples)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(step(*runs[name], examples))
    tokens = sum(args.lengths)
    print(f"| bf16 weight copies | s per step ({len(args.lengths)} passes, {tokens} tokens) | tokens/s | speed-up |")
    print("|---|---|---|---|")
    base = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.3f} | {tokens / median:.1f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
