"""The CPU levers of llmft.cpu_speed one by one, against the code they replace, on SmolLM2-135M's shapes.

    python benchmarks/cpu_levers.py

- LM head + loss for one 436-token example (576 hidden, 49,152 vocabulary, bf16 autocast, forward and backward):
  TRL's fused head (ChunkedLogProbFunction, its torch path for devices without Triton, every position) vs
  llmft's loss_positions_head (PyTorch's log-softmax in 128-token chunks), at 100% and 60% of positions in the loss.
- LoRA dropout on one adapter input (436 x 576 bf16), forward and backward: torch.nn.functional.dropout vs llmft's
  CheapDropout.
- Attention, forward and backward, 9 query / 3 key-value heads of 64, causal, bf16: SDPA's flash kernel vs the
  math kernel vs eager (matmul, softmax, matmul, probabilities kept) vs llmft.attention's RecomputedAttention (the
  same matmuls, the probabilities recomputed in the backward), at 128, 350 and 512 tokens; and on packed rows of
  2 and 5 examples (800 and 1000 tokens, block-causal masks), every block against all keys up to its diagonal vs
  from its first example's start.
- A 113 MB float32 buffer (49,152 x 576, the tied embedding's gradient) zeroed, cast to bf16 and freed again, as the
  allocator does it and, under a preloaded jemalloc (`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`), with
  its decay off as llmft keeps it within a step (freed_pages_kept_within_steps).
Prints milliseconds per call (the best of five timings of five calls each), the CPU flags and the thread count.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sft_throughput import hardware_line  # noqa: E402

from llmft import attention  # noqa: E402
from llmft.attention import RecomputedAttention  # noqa: E402
from llmft.cpu_speed import CheapDropout, _score  # noqa: E402
from llmft.hardware import Jemalloc, allocator_in_use  # noqa: E402

TOKENS, HIDDEN, VOCAB = 436, 576, 49152


def best_ms(fn, calls: int = 5, trials: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def head_rows() -> list[tuple[str, float]]:
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(torch.bfloat16)
    hidden = torch.randn(TOKENS, HIDDEN, dtype=torch.bfloat16)
    targets = torch.randint(0, VOCAB, (TOKENS,))

    def trl() -> None:
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            log_p = _ChunkedLogProbFunction.apply(h, head.weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                  None, 1.0, ("log_probs", "entropy", "is_top1"))[0]
        (-log_p.sum()).backward()

    def llmft(share: float):
        n = int(TOKENS * share)

        def run() -> None:
            h = hidden[:n].clone().requires_grad_()
            with torch.autocast("cpu", torch.bfloat16):
                log_p = _score(h, head, targets[:n])[0]
            (-log_p.sum()).backward()

        return run

    return [("LM head + loss: TRL fused head (every position)", best_ms(trl)),
            ("LM head + loss: llmft, all positions in the loss", best_ms(llmft(1.0))),
            ("LM head + loss: llmft, 60% of positions in the loss", best_ms(llmft(0.6)))]


def dropout_rows() -> list[tuple[str, float]]:
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.ones_like(x)
    cheap = CheapDropout(0.05).train()
    return [("LoRA dropout p=0.05: torch", best_ms(lambda: F.dropout(x, 0.05, True).backward(grad), 50)),
            ("LoRA dropout p=0.05: llmft CheapDropout", best_ms(lambda: cheap(x).backward(grad), 50))]


def attention_rows() -> list[tuple[str, float]]:
    rows = []
    for n in (128, 350, 512):
        q = torch.randn(1, 9, n, 64, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 3, n, 64, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, 3, n, 64, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.full((n, n), float("-inf")).triu(1).to(torch.bfloat16)

        def flash() -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

        def math() -> None:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

        def eager() -> None:
            kk, vv = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
            weights = torch.softmax(((q @ kk.transpose(-1, -2)) * 0.125 + mask).float(), -1).to(q.dtype)
            (weights @ vv).sum().backward()

        def recomputed() -> None:  # llmft.attention: eager's matmuls, SDPA's memory
            RecomputedAttention.apply(q, k, v, None, 0.125, True).sum().backward()

        rows += [(f"attention {n} tokens: SDPA flash", best_ms(flash)), (f"attention {n} tokens: SDPA math", best_ms(math)),
                 (f"attention {n} tokens: eager", best_ms(eager)),
                 (f"attention {n} tokens: llmft recomputed", best_ms(recomputed))]
    return rows + packed_attention_rows()


def packed_attention_rows() -> list[tuple[str, float]]:
    """A packed row's block-causal mask: each block against every key up to its diagonal (as before the key range
    started at the block's first example) vs llmft's attention as it runs."""
    rows = []
    every_key = attention._Grid._first_key
    for lengths in ((420, 380), (300, 200, 150, 250, 100)):
        n = sum(lengths)
        example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        mask = ((example[:, None] == example[None]) & torch.ones(n, n, dtype=torch.bool).tril())[None, None]
        q = torch.randn(1, 9, n, 64, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, 3, n, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

        def run() -> None:
            RecomputedAttention.apply(q, k, v, mask, 0.125, True).sum().backward()

        name = f"attention, a packed row of {'+'.join(map(str, lengths))} tokens: llmft recomputed"
        attention._Grid._first_key = lambda *args: 0
        try:
            rows.append((f"{name}, every key to the diagonal", best_ms(run)))
        finally:
            attention._Grid._first_key = every_key
        rows.append((f"{name}, from the block's first example", best_ms(run)))
    return rows


def allocation_rows() -> list[tuple[str, float]]:
    def buffer() -> None:
        torch.zeros(VOCAB, HIDDEN).to(torch.bfloat16)

    rows = [(f"113 MB buffer, {allocator_in_use()}", best_ms(buffer, 5))]
    jemalloc = Jemalloc.loaded()
    if jemalloc is not None:
        saved = jemalloc.decays()  # as freed_pages_kept_within_steps does within a step: no arena decays
        jemalloc.set_decays(dict.fromkeys(saved, -1))
        rows.append(("113 MB buffer, jemalloc with freed pages kept", best_ms(buffer, 5)))
        jemalloc.set_decays(saved)
    return rows


def main() -> None:
    print(hardware_line() + "\n")
    print("| operation (forward + backward where it has one) | ms per call |")
    print("|---|---|")
    for name, ms in head_rows() + dropout_rows() + attention_rows() + allocation_rows():
        print(f"| {name} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
