"""torch.compile vs eager for LoRA/full training passes on the embedded SmolLM2-135M-Instruct, on CPU.

    python benchmarks/cpu_compile.py lora eager
    python benchmarks/cpu_compile.py lora compile      # the whole model, inductor, dynamic shapes: minutes
    python benchmarks/cpu_compile.py lora regional     # each decoder layer, one compiled graph shared by all
    python benchmarks/cpu_compile.py lora regional --dropout 0

llmft's training dtypes for this machine (bf16 autocast and bf16 frozen weights where bf16 is native, else fp32).
Three warm-up micro-batches (where compiling happens), then nine of one example each at LIMA-like lengths
(90-500 tokens) and one optimizer step, timed. Prints the warm-up seconds and the timed tokens/s.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmft.config import ModelConfig, PeftSettings  # noqa: E402
from llmft.hardware import fast_bf16_available  # noqa: E402
from llmft.model import adapters_follow_autocast, load_model  # noqa: E402

LENGTHS = [300, 180, 420, 250, 90, 500, 330, 210, 370, 150, 460, 270]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=["lora", "full"])
    parser.add_argument("mode", choices=["eager", "compile", "regional"])
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(ModelConfig(), PeftSettings(method=args.method, lora_dropout=args.dropout))
    adapters_follow_autocast(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    step = model
    if args.mode == "compile":
        step = torch.compile(model, dynamic=True)
    elif args.mode == "regional":
        for layer in model.get_decoder().layers:
            layer.compile(dynamic=True)
    bf16 = fast_bf16_available()

    def run(n: int) -> None:
        ids = torch.randint(0, 49000, (1, n))
        with torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = step(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()

    started = time.time()
    for n in LENGTHS[:3]:
        run(n)
    print(f"warm-up (compiling) {time.time() - started:.1f} s", flush=True)
    started, tokens = time.time(), 0
    for n in LENGTHS[3:]:
        run(n)
        tokens += n
    opt.step()
    opt.zero_grad()
    print(f"{args.method} {args.mode} (bf16 {bf16}, dropout {args.dropout}): "
          f"{tokens / (time.time() - started):.1f} tokens/s")


if __name__ == "__main__":
    main()
