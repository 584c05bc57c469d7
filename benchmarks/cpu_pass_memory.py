"""Resident memory of one forward + backward pass (500 tokens) on the embedded SmolLM2-135M-Instruct, on CPU.

    python benchmarks/cpu_pass_memory.py lora none     # or: lora ckpt, full none, full ckpt
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/cpu_pass_memory.py lora none

Prints VmRSS (resident now) and VmHWM (peak) in MB before the pass, after the forward and after the backward.
Comparing a run under glibc's default allocator with one where every tensor over 64 KiB is mmapped (and so
returned to the OS when freed) shows how much of the peak is freed memory glibc keeps. Linux only.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmft.config import ModelConfig, PeftSettings  # noqa: E402
from llmft.model import load_model  # noqa: E402


def memory(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit("needs Linux's /proc/self/status")


def show(when: str) -> None:
    print(f"{when:15} VmRSS {memory('VmRSS'):7.0f} MB   VmHWM {memory('VmHWM'):7.0f} MB", flush=True)


def main() -> None:
    method, checkpointing = sys.argv[1], sys.argv[2] == "ckpt"
    model = load_model(ModelConfig(dtype="float32"), PeftSettings(method=method))
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0)  # page the (memory-mapped) weights in, so they count before the pass
    ids = torch.randint(0, 49000, (1, 500))
    show("start")
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    show("after forward")
    loss.backward()
    show("after backward")


if __name__ == "__main__":
    main()
