"""Attention for training in bf16 on CPUs: the speed of matmul attention at the memory of flash attention.

On CPU, PyTorch's SDPA (its flash kernel) runs the softmax attention forward and backward 1.5-2x slower than
the same work done as bf16 matmuls (oneDNN) plus a float32 softmax, but matmul ("eager") attention keeps each
layer's attention probabilities for the backward, memory that grows with the square of the length.
`RecomputedAttention` keeps only q, k and v, as flash attention does, and recomputes the probabilities in the
backward, block by block:

- blocks of query positions (rows ordered by position, then query head of a key/value head group, so that a block
  of positions is a block of rows), each against only the keys its causal mask can reach: about half the work of a
  full square at the lengths of chat data; with a mask, from the first key any of the block's queries may attend
  to (in a packed row, the start of the block's first example: 1.3-1.7x faster on rows of 2-5 examples);
- each block small enough (BLOCK_BYTES of bf16 scores) to stay in the CPU's cache between the matmul, the
  softmax and the backward's passes;
- scores in bf16 from the matmul (as eager attention computes them); the softmax computed in float32 by PyTorch's
  bf16 kernel, which rounds once (the bits of eager's float32 softmax cast to bf16 on AVX-512 kernels; on AVX2
  kernels about one value in 10^5 lands one bf16 step away); its backward computed in
  float32 by PyTorch's kernel from the bf16 probabilities (eager keeps them in float32: the scores' gradient has
  1.4-2.5x eager's relative error, 0.2-0.4%, more for sharper softmaxes);
- a plain causal call (no mask: what training without padding makes) masks only the block's own diagonal keys.

llmft.cpu_speed.recomputed_attention puts it on a CPU run's model in place of "sdpa" (benchmarks/README.md has
the figures). It takes the calls of modules in training mode, with or without gradients (so that the reference
log-probabilities of DPO or GRPO, computed without gradients, come from the same arithmetic as the policy's).
Calls it does not cover go to transformers' SDPA attention unchanged: modules in eval mode (evaluation,
generation after training), one-token decoding steps, float32 (SDPA is as fast there), attention dropout,
soft-capping, attention sinks, position biases, paged caches, float, per-head or broadcast masks, a causal call
without a mask over a cache (SDPA aligns that one to the top left), devices other than the CPU.
"""

from __future__ import annotations

import torch

NAME = "llmft_cpu"  # the attn_implementation name it is registered under in transformers
BLOCK_POSITIONS = 128  # query positions per block
BLOCK_BYTES = 2**21  # scores per block: rows x keys x 2 bytes (bf16), cache-sized


def register() -> None:
    """Make NAME a transformers attention implementation, with SDPA's boolean masks (None when plain causal)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: query [B, H, L, D], key and value [B, Hkv, S, D]; returns [B, L, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    if not _covered(module, query, key, value, attention_mask, dropout, dtype, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = RecomputedAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), attention_mask, scale, causal)
    return out, None


def _covered(module, query, key, value, mask, dropout, dtype, kwargs) -> bool:
    unusual = any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks", "position_bias", "cache"))
    length, keys = query.shape[2], key.shape[2]
    if mask is None:  # SDPA's own causal flag: squares only (with more keys than queries it aligns to the top left)
        shape_ok = length == keys
    else:
        shape_ok = (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                    and tuple(mask.shape[2:]) == (length, keys))
    return (getattr(module, "training", False) and length > 1 and keys >= length and shape_ok
            and dtype == torch.bfloat16 and query.device.type == "cpu" and not dropout and not unusual
            and not kwargs.get("output_attentions") and query.shape[1] % key.shape[1] == 0)


class RecomputedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v in transformers' output layout [B, L, H, D], saving q, k, v (and the mask)
    for a backward that recomputes the softmax.

    mask: None (causal or full attention, by `causal`) or bool [B or 1, 1, L, S], True where a query may attend.
    Query heads share key/value heads in groups (GQA). A query that may attend to nothing gets a zero output, as
    with SDPA.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal):
        with torch.autocast("cpu", enabled=False):
            grid = _Grid(q, k, v, mask, causal)
            qr, kr, vr = grid.rows(q), grid.heads(k), grid.heads(v)
            out = torch.empty(*qr.shape[:2], v.shape[-1], dtype=q.dtype)
            for block in grid.blocks():
                probs = grid.probs(qr, kr, block, scale)
                rows, queries, keys = block
                torch.bmm(probs, vr[rows, keys], out=out[rows, queries])
            ctx.save_for_backward(qr, kr, vr, mask)
            ctx.grid, ctx.scale = grid, scale
            return grid.unrows(grid.zero_dead(out))  # the only copy of the output: into [B, L, H, D]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qr, kr, vr, _ = ctx.saved_tensors
        grid, scale = ctx.grid, ctx.scale
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        with torch.autocast("cpu", enabled=False):
            grad_rows = grid.zero_dead(grid.output_rows(grad_out.to(qr.dtype)))
            grad_q = torch.empty_like(qr) if need_q else None
            # float32 sums over the blocks
            grad_k = torch.zeros(kr.shape, dtype=torch.float32) if need_k else None
            grad_v = torch.zeros(vr.shape, dtype=torch.float32) if need_v else None
            for block in grid.blocks():
                rows, queries, keys = block
                probs = grid.probs(qr, kr, block, scale)
                q_b, g_b = qr[rows, queries], grad_rows[rows, queries]
                if need_v:
                    grad_v[rows, keys] += torch.bmm(probs.transpose(1, 2), g_b)
                if not (need_q or need_k):
                    continue
                # softmax backward, dS = P * (dP - rowsum(P * dP)): PyTorch's kernel computes it in float32 from
                # the bf16 operands in one pass (float32 copies of them first cost 5x as long)
                grad_p = torch.bmm(g_b, vr[rows, keys].transpose(1, 2))
                grad_s = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype)
                if need_q:
                    torch.baddbmm(torch.empty((), dtype=qr.dtype), grad_s, kr[rows, keys], beta=0, alpha=scale,
                                  out=grad_q[rows, queries])
                if need_k:
                    grad_k[rows, keys] += torch.bmm(grad_s.transpose(1, 2), q_b)
            if need_k:
                grad_k.mul_(scale)
            return (grid.unrows(grad_q).transpose(1, 2) if need_q else None,
                    grid.unheads(grad_k.to(qr.dtype)) if need_k else None,
                    grid.unheads(grad_v.to(qr.dtype)) if need_v else None, None, None, None)


class _Grid:
    """The layout of one attention call: rows (batch x key/value head) x (position x query head of the group),
    the additive mask and the blocks the work is cut into."""

    def __init__(self, q, k, v, mask, causal: bool):
        self.B, self.H, self.L, self.D = q.shape
        self.Hk, self.S = k.shape[1], k.shape[2]
        self.G = self.H // self.Hk
        self.mask, self.dtype = mask, q.dtype
        offset = self.S - self.L  # keys before the first query (a cache); query i sees keys up to offset + i
        if mask is None:
            self.dead = None
            self.causal = causal and self.L > 1
        else:
            mask = mask[:, 0]
            self.dead = ~mask.any(-1)  # [B|1, L]: queries that may attend to nothing
            self.dead = self.dead if self.dead.any() else None
            self.causal = not mask.triu(offset + 1).any()  # blocks may stop at the diagonal
        self.offset = offset
        self.diagonals: dict[int, torch.Tensor] = {}
        self.first_keys: dict[int, int] = {}  # by block start: read from the mask once, for forward and backward

    # layouts
    def rows(self, x):  # [B, H, L, D] -> [B*Hk, L*G, D], rows ordered (position, query head)
        return x.reshape(self.B, self.Hk, self.G, self.L, -1).transpose(2, 3).reshape(self.B * self.Hk,
                                                                                    self.L * self.G, -1)

    def unrows(self, x):  # [B*Hk, L*G, D] -> [B, L, H, D]
        return x.view(self.B, self.Hk, self.L, self.G, -1).permute(0, 2, 1, 3, 4).reshape(self.B, self.L, self.H, -1)

    def output_rows(self, x):  # [B, L, H, D] -> [B*Hk, L*G, D]
        return x.reshape(self.B, self.L, self.Hk, self.G, -1).transpose(1, 2).reshape(self.B * self.Hk,
                                                                                     self.L * self.G, -1)

    def heads(self, x):  # [B, Hk, S, D] -> [B*Hk, S, D]
        return x.reshape(self.B * self.Hk, self.S, -1)

    def unheads(self, x):
        return x.view(self.B, self.Hk, self.S, -1)

    def zero_dead(self, x):
        """Rows of queries that may attend to nothing: output zero, and no gradient through them (a new tensor: x
        may be a view of the incoming gradient)."""
        if self.dead is None:
            return x
        shape = (-1, self.Hk, self.L, self.G, x.shape[-1])
        return x.reshape(shape).masked_fill(self.dead[:, None, :, None, None], 0).view(x.shape)

    # blocks
    def blocks(self):
        """(rows, query rows, keys) slices: blocks of BLOCK_POSITIONS positions, each against the keys it can
        reach, over as many batch x head rows as fit BLOCK_BYTES of scores."""
        for start in range(0, self.L, BLOCK_POSITIONS):
            stop = min(self.L, start + BLOCK_POSITIONS)
            end = self.offset + stop if self.causal else self.S
            if start not in self.first_keys:
                self.first_keys[start] = self._first_key(start, stop, end)
            begin = self.first_keys[start]
            per_row = (stop - start) * self.G * (end - begin) * self.dtype.itemsize
            step = max(1, BLOCK_BYTES // per_row)
            for first in range(0, self.B * self.Hk, step):
                yield (slice(first, min(self.B * self.Hk, first + step)),
                       slice(start * self.G, stop * self.G), slice(begin, end))

    def _first_key(self, start: int, stop: int, end: int) -> int:
        """The first key any query of positions [start, stop) may attend to, in any batch row (0 without a mask,
        or where none may attend to any): the keys before it would only take -inf scores, zero probabilities (the
        rows of queries that may attend to nothing are zeroed whatever their keys). In a packed row those are the
        keys of the examples before the block's first one."""
        if self.mask is None:
            return 0
        reach = self.mask[:, 0, start:stop, :end].any(1).any(0)  # [keys]
        return int(reach.to(torch.uint8).argmax())  # the first True (0 where none is)

    def probs(self, qr, kr, block, scale):
        """Softmax of one block's scores, in the compute dtype: PyTorch computes a bf16 softmax in float32 and
        rounds once, as eager attention's float32 softmax cast to bf16 does, in 0.7x its time."""
        rows, queries, keys = block
        q_b, k_b = qr[rows, queries], kr[rows, keys].transpose(1, 2)
        if self.mask is not None or not self.causal:
            scores = torch.baddbmm(self._bias(block), q_b, k_b, alpha=scale)
        else:  # causal without a mask: only the keys of the block's own positions need masking
            scores = torch.baddbmm(torch.empty((), dtype=q_b.dtype), q_b, k_b, beta=0, alpha=scale)
            n = queries.stop // self.G - queries.start // self.G
            scores[:, :, keys.stop - n:].add_(self._diagonal(n))
        return torch.softmax(scores, -1)

    def _diagonal(self, n: int) -> torch.Tensor:
        """0 / -inf for n positions against their own n keys: [n * G, n], made once per call and length."""
        if n not in self.diagonals:
            later = torch.ones(n, n, dtype=torch.bool).triu(1).repeat_interleave(self.G, 0)
            self.diagonals[n] = torch.zeros(later.shape, dtype=self.dtype).masked_fill_(later, float("-inf"))
        return self.diagonals[n]

    def _bias(self, block):
        """0 where a query attends to a key, -inf elsewhere: [rows or 1, queries, keys] in the compute dtype."""
        rows, queries, keys = block
        positions = slice(queries.start // self.G, queries.stop // self.G)
        if self.mask is None:  # full attention (a causal call without a mask takes _diagonal instead)
            allowed = torch.ones(1, 1, 1, dtype=torch.bool)
        else:
            allowed = self.mask[:, 0, positions, keys]
            if allowed.shape[0] > 1:
                allowed = allowed[torch.arange(rows.start, rows.stop) // self.Hk]
            if self.dead is not None:  # finite scores for their softmax; their outputs are zeroed
                dead = self.dead[:, positions]
                dead = dead[torch.arange(rows.start, rows.stop) // self.Hk] if dead.shape[0] > 1 else dead
                allowed = allowed | dead[..., None]
        bias = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, float("-inf"))
        n = positions.stop - positions.start
        return bias.unsqueeze(2).expand(-1, n, self.G, -1).reshape(bias.shape[0], n * self.G, -1)
