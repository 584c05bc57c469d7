"""SDPA vs llmft's recomputed attention on whole SmolLM2 training passes, alternated in one process.

    python benchmarks/attention_steps.py [--methods lora full] [--lengths 128 400] [--rounds 8]

Whole runs in separate processes move by 15-30% between runs on small shared hosts, more than the difference
measured here; alternating the two attentions on the same model in one process (ABBA order) compares them under
the same conditions. Each pass: one example of `length` random tokens, forward under bf16 autocast and backward
(LoRA: bf16 frozen weights with llmft's adapter levers; full: float32 weights), as `llmft train` runs a CPU
micro-batch. Prints the median seconds per pass of each attention and their ratio. Needs native bf16 to mean
anything (llmft uses its attention only for bf16 calls).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sft_throughput import hardware_line  # noqa: E402

from llmft import attention, cpu_speed  # noqa: E402
from llmft.config import ModelConfig, PeftSettings  # noqa: E402
from llmft.hardware import preload_allocator  # noqa: E402
from llmft.model import load_model  # noqa: E402


def training_model(method: str):
    settings = PeftSettings(method=method)
    model = load_model(ModelConfig(dtype="bfloat16" if method == "lora" else "float32"), settings)  # with its LoRA
    if method == "lora":
        cpu_speed.adapters_follow_autocast(model)
        cpu_speed.cheap_lora_dropout(model)
    return model.train()


def medians(model, length: int, rounds: int) -> dict[str, float]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))

    def one_pass(implementation: str) -> float:
        base.set_attn_implementation(implementation)
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    names = ("sdpa", attention.NAME)
    for name in names:  # warm-up
        one_pass(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(one_pass(name))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 400])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    preload_allocator(["train"])  # the allocator `llmft train` runs on
    attention.register()
    print(hardware_line() + "\n")
    print("| method | tokens | SDPA s per pass | llmft attention s per pass | speed-up |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        model = training_model(method)
        for length in args.lengths:
            got = medians(model, length, args.rounds)
            sdpa, ours = got["sdpa"], got[attention.NAME]
            print(f"| {method} | {length} | {sdpa:.3f} | {ours:.3f} | {sdpa / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
