"""torch.compile vs eager for one LoRA/full training pass on the embedded SmolLM2-135M-Instruct, on CPU.

    python benchmarks/cpu_compile.py lora eager
    python benchmarks/cpu_compile.py lora compile      # inductor, dynamic shapes: minutes of compiling first

Three warm-up micro-batches (where compiling happens), then nine of one example each at LIMA-like lengths
(90-500 tokens) and one optimizer step, timed. Prints the warm-up seconds and the timed tokens/s.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmft.config import ModelConfig, PeftSettings  # noqa: E402
from llmft.model import load_model  # noqa: E402

LENGTHS = [300, 180, 420, 250, 90, 500, 330, 210, 370, 150, 460, 270]


def main() -> None:
    method, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = load_model(ModelConfig(dtype="float32"), PeftSettings(method=method))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    step = torch.compile(model, dynamic=True) if mode == "compile" else model

    def run(n: int) -> None:
        ids = torch.randint(0, 49000, (1, n))
        step(input_ids=ids, labels=ids, use_cache=False).loss.backward()

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
    print(f"{method} {mode}: {tokens / (time.time() - started):.1f} tokens/s")


if __name__ == "__main__":
    main()
