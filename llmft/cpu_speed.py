"""Training on CPUs without waste: eight places where the libraries' general code, or the allocator, costs a CPU run
a third of its time.

Applied by llmft.train to CPU runs (benchmarks/README.md#a-cpu-with-native-bf16 has the figures):
- adapters_follow_autocast: under bf16 autocast peft copies every LoRA adapter's input to float32 (seven copies per
  decoder layer) only for autocast to cast it back to bf16 for the matmul.
- cheap_lora_dropout: torch's dropout draws one random number per element, which costs a LoRA step a quarter of
  its time; drawing only the dropped elements' positions gives the same dropout from ~p draws per element (p <= 0.1).
- loss_positions_head: TRL's fused LM head scores every position through ~10 float32 passes over each
  (tokens x 32k) tile where Triton is missing; on CPU only the positions with a label go through the 49k-vocabulary
  head, in chunks, their float32 log-softmax worked through in cache-sized slices.
- recomputed_attention: SDPA's CPU flash kernel runs attention's forward and backward 1.5-2x slower than bf16
  matmuls with a float32 softmax; llmft.attention does the latter and recomputes the probabilities in the backward,
  so it keeps no more than SDPA does.
- fused_rms_norms: transformers' RMSNorm is five elementwise passes forward (square, mean, rsqrt, two products) and
  more backward; PyTorch's fused rms_norm computes the same float32 normalisation in one.
- packed_micro_batches: one example per pass (CPU micro-batches) pays each pass's fixed cost per example; a step's
  short examples run packed into one row instead.
- bf16_weights_once_per_step: under bf16 autocast every pass casts every float32 weight to a fresh bf16 copy, and
  its backward casts each bf16 weight gradient to a fresh float32 one before adding it; full fine-tuning on CPU
  micro-batches paid that per example. The copies are made once per optimizer step instead, into the same buffers,
  and their gradients added into the float32 ones as they are.
- freed_pages_kept_within_steps: jemalloc gives a tensor of several MB fresh pages (a page fault and kernel zeroing
  per 4 kB) although the same sizes were freed a moment ago; within a step, freed pages are reused instead.

With micro-batches, token_means_per_step logs each step's entropy and token accuracy as one padded batch of all the
step's examples would.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import types
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

HEAD_CHUNK = 512  # tokens per LM-head chunk: the matmul's rows (full fine-tuning sums one weight gradient per chunk)
HEAD_SLICE_BYTES = 2**21  # float32 rows of one chunk worked on at a time for the softmax: cache-sized
# Above this many bytes of logits kept for the backward (labelled tokens x vocabulary x their element size), each
# chunk is recomputed in the backward instead (activation checkpointing): memory stays flat for long answers and
# large vocabularies, at one more head projection per chunk.
HEAD_KEEP_BYTES = 256 * 2**20


# LoRA adapters under autocast ---------------------------------------------------------------------------------------


def adapters_follow_autocast(model: torch.nn.Module) -> int:
    """Under bf16 autocast, LoRA adapters take their bf16 input as it comes; outside it, as before, float32.

    The adapters' weights stay float32 (autocast casts those small matrices per use; the optimizer updates them in
    float32). Decided per call, since generation and evaluation outside the Trainer run without autocast. Returns
    the number of LoRA layers changed.
    """
    from peft.tuners.lora import LoraLayer

    def cast_outside_autocast(self, x, dtype):
        if x is None or x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(dtype=dtype)

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:  # peft's own switch (cast_input_dtype_enabled) cannot follow autocast per call
        layer._cast_input_dtype = types.MethodType(cast_outside_autocast, layer)
    return len(layers)


# LoRA dropout -------------------------------------------------------------------------------------------------------


class CheapDropout(torch.nn.Module):
    """Dropout with probability p that draws random numbers only for the elements it drops: the same mask
    distribution (each element dropped independently with probability p), scaling and seeding as torch.nn.Dropout.

    Each element is hit a Poisson(-ln(1 - p)) number of times, so it survives with probability exactly 1 - p and
    independently of the others: a Poisson(n x -ln(1 - p)) count of indices drawn uniformly (with repeats) over the
    n elements. At LoRA's usual p = 0.05 that is 0.05 draws per element instead of torch's one, and the input is
    scaled and the dropped elements zeroed in one pass, without a mask tensor. The backward keeps the indices, 8 bytes
    each: less than torch's 1-byte mask up to p = MAX_P (cheap_lora_dropout replaces only those).
    """

    MAX_P = 0.1

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p}: must be in [0, 1)")
        self.p = p
        self.hits_per_element = -math.log1p(-p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        out = (x * (1 / (1 - self.p))).contiguous()  # this call's own tensor, zeroed in place below
        n = out.numel()
        if n == 0:
            return out
        expected = torch.tensor(n * self.hits_per_element, dtype=torch.float64)
        hits = torch.randint(n, (int(torch.poisson(expected)),), device=x.device)
        out.view(-1).index_fill_(0, hits, 0)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"


def cheap_lora_dropout(model: torch.nn.Module) -> int:
    """Replace every LoRA adapter's torch.nn.Dropout of p <= CheapDropout.MAX_P with CheapDropout; the number
    replaced. (LoRA's usual 0.05-0.1; above, the indices would cost the backward more than torch's mask.)"""
    from peft.tuners.lora import LoraLayer

    replaced = 0
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        for name, dropout in layer.lora_dropout.items():
            if isinstance(dropout, torch.nn.Dropout) and 0 < dropout.p <= CheapDropout.MAX_P:
                layer.lora_dropout[name] = CheapDropout(dropout.p)
                replaced += 1
    return replaced


# Attention --------------------------------------------------------------------------------------------------------


def recomputed_attention(model: torch.nn.Module) -> bool:
    """Put llmft.attention in place of transformers' "sdpa" on the model (its bf16 training calls; the others go to
    SDPA as before). True when set; False for other attention implementations and models that cannot switch."""
    from llmft import attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa" or not base._can_set_attn_implementation():
        return False
    attention.register()
    base.set_attn_implementation(attention.NAME)
    return base.config._attn_implementation == attention.NAME


def one_process(trainer) -> bool:
    """Whether the run is one process with no DeepSpeed or FSDP: the levers that change what a pass hands the
    Trainer (gradients from hooks, passes per step, per-pass metrics) hold only there."""
    return trainer.args.world_size == 1 and not trainer.is_deepspeed_enabled and not trainer.is_fsdp_enabled


# Full fine-tuning's bf16 weight copies ---------------------------------------------------------------------------

_optimizer_steps = [0]  # optimizer steps taken in this process: every copy is remade after one
_step_hook = None  # counts them (torch's global hook: any optimizer, however it writes the weights)


def _count_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


def bf16_weights_once_per_step(model: torch.nn.Module) -> int:
    """Under bf16 autocast with gradients on, each float32 torch.nn.Linear of `model` computes with a bf16 copy of its
    weight made once per optimizer step (remade after any optimizer's step, and whenever the weight changes in
    place), whose gradient is added into the weight's float32 gradient. The same arithmetic as autocast's cast per
    call: equal gradients to the bit (a weight shared with an embedding, as tied LM heads are, gets its two
    gradients added in another order). Weights with hooks of their own keep autocast's cast. Returns the number of
    layers changed; drop_bf16_weight_copies frees the copies.

    For one process: the gradient reaches the weight from a hook, where DDP, DeepSpeed and FSDP wait for their own."""
    global _step_hook
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]
    for layer in layers:
        layer.forward = types.MethodType(_linear_with_step_copy, layer)
    if layers and _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_step)
    return len(layers)


def drop_bf16_weight_copies(model: torch.nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop("_llmft_bf16_copy", None)


def _linear_with_step_copy(self, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (weight.requires_grad and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and weight.dtype == torch.float32
            and not _has_hooks(weight)):
        copy = self.__dict__.get("_llmft_bf16_copy")
        if copy is None or copy.weight is not weight:
            copy = self.__dict__["_llmft_bf16_copy"] = _Bf16Copy(weight)
        weight = copy.current()
    return torch.nn.functional.linear(x, weight, self.bias)


def _has_hooks(weight: torch.Tensor) -> bool:
    """Hooks on the weight itself (layer-wise GaLore/APOLLO and LOMO step each weight from one): it must stay in the
    graph, so that they fire."""
    return bool(weight._backward_hooks or weight._post_accumulate_grad_hooks)


class _Bf16Copy:
    """A bf16 copy of a float32 weight, a leaf whose accumulated gradient goes straight into the weight's."""

    def __init__(self, weight: torch.nn.Parameter):
        self.weight = weight
        self.copy = weight.detach().to(torch.bfloat16).requires_grad_()
        self.made_at = (_optimizer_steps[0], weight._version)
        # through a weak reference: the garbage collector does not see a tensor's hooks, so a hook holding this
        # object would keep it, its copy and the weight alive for good
        self.copy.register_post_accumulate_grad_hook(functools.partial(_add_to_weight_grad, weakref.ref(self)))

    def current(self) -> torch.Tensor:
        # an optimizer step may write through .data, which leaves the version counter as it was
        now = (_optimizer_steps[0], self.weight._version)
        if now != self.made_at:
            with torch.no_grad():
                self.copy.copy_(self.weight)
            self.made_at = now
        return self.copy


def _add_to_weight_grad(owner: weakref.ref, copy: torch.Tensor) -> None:
    weight = owner().weight
    if weight.grad is None:
        weight.grad = copy.grad.to(torch.float32)
    else:
        weight.grad.add_(copy.grad)
    copy.grad = None


# RMSNorm ------------------------------------------------------------------------------------------------------------


def fused_rms_norms(model: torch.nn.Module) -> int:
    """Each RMSNorm whose class computes weight * (x / rms(x) in float32, cast back to x's dtype), as Llama's, Qwen's
    and Mistral's do, runs it through torch.nn.functional.rms_norm in float32 (one fused pass, and a fused backward)
    and then the same cast and product. A class qualifies once its own forward gives the fused one's output, dtype
    and every bit, for random weights and inputs in bf16 and float32 (weights and inputs in either); others
    (Gemma's 1 + weight, OLMo's product before the cast, ...) are left as they are. Returns the number changed."""
    verdicts: dict[type, bool] = {}
    changed = 0
    for module in model.modules():
        epsilon = _rms_epsilon(module)
        if epsilon is None:
            continue
        kind = type(module)
        if kind not in verdicts:
            verdicts[kind] = _computes_fused_rms(module, epsilon)
        if verdicts[kind]:
            module.fused_rms_epsilon = epsilon
            module.forward = types.MethodType(_fused_rms_forward, module)
            changed += 1
    return changed


def _rms_epsilon(module: torch.nn.Module) -> float | None:
    weight = getattr(module, "weight", None)
    if (not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.dim() != 1
            or weight.numel() == 0 or weight.device.type == "meta"):  # empty: a ZeRO-3 shard, nothing to check on
        return None
    epsilon = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return epsilon if isinstance(epsilon, float) else None


def _fused_rms_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    return _fused_rms(hidden, self.weight, self.fused_rms_epsilon)


def _fused_rms(hidden: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    normed = torch.nn.functional.rms_norm(hidden.float(), (hidden.shape[-1],), None, epsilon)
    return weight * normed.to(hidden.dtype)


def _computes_fused_rms(module: torch.nn.Module, epsilon: float) -> bool:
    generator = torch.Generator().manual_seed(0)
    size = module.weight.shape[0]
    dtypes = (torch.bfloat16, torch.float32)
    with torch.no_grad():
        for weight_dtype, input_dtype in ((w, x) for w in dtypes for x in dtypes):
            weight = torch.randn(size, generator=generator).to(weight_dtype)
            sample = (torch.randn(2, 3, size, generator=generator) * 3).to(input_dtype)
            try:
                own = torch.func.functional_call(module, {"weight": weight}, (sample,))
                fused = _fused_rms(sample, weight, epsilon)
            except Exception:  # a forward that wants more than the hidden states, weights it cannot swap, ...
                return False
            if own.dtype != fused.dtype or not torch.equal(own, fused):
                return False
    return True


# The LM head on loss positions ---------------------------------------------------------------------------------------


def loss_positions_head(model: torch.nn.Module) -> bool:
    """On CPU, answer TRL's fused-head calls (`model(..., fused_lm_head=True)`) by projecting only the positions
    that carry a label, in chunks of HEAD_CHUNK tokens, through a float32 log-softmax (_TargetScores); other calls,
    other devices and models whose logits are scaled or soft-capped go to TRL's head. True when installed."""
    from trl.trainer.utils import FusedCausalLMOutput

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trl_forward = base.forward
    text = base.config.get_text_config()
    if not isinstance(trl_forward, types.MethodType) or "fused_lm_head" not in trl_forward.__func__.__code__.co_varnames:
        return False  # TRL has not put its fused head on this model
    plain = not any(getattr(text, key, None) not in (None, 1, 1.0) for key in (
        "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    if not plain or getattr(text, "output_router_logits", False):
        return False

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        if not fused_lm_head or head.weight.device.type != "cpu" or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        log_probs, entropy, is_top1 = _score(hidden[mask], head, shift_labels[mask])
        log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x)
                                       for x in (log_probs, entropy, is_top1))
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)

    # TRL's forward carries the model's signature (functools.wraps), which generate() reads: keep it.
    base.forward = types.MethodType(functools.wraps(trl_forward.__func__)(forward), base)
    return True


def _score(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor):
    """Per-token log-probability of the target (with gradient), entropy and whether the target is the argmax."""
    if hidden.shape[0] == 0:  # nothing to learn: a finite zero that still reaches the backbone and the head
        zero = hidden.sum() * 0 + head.weight.sum() * 0
        empty = zero.float().reshape(1)[:0]
        return empty, empty.detach(), empty.detach()
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else head.weight.dtype
    recompute = hidden.shape[0] * head.weight.shape[0] * dtype.itemsize > HEAD_KEEP_BYTES
    parts = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        chunk, target = hidden[start:start + HEAD_CHUNK], targets[start:start + HEAD_CHUNK]
        if recompute:
            parts.append(torch.utils.checkpoint.checkpoint(_score_chunk, chunk, head, target, use_reentrant=False))
        else:
            parts.append(_score_chunk(chunk, head, target))
    return tuple(torch.cat(column) for column in zip(*parts))


def _score_chunk(hidden: torch.Tensor, head: torch.nn.Module, target: torch.Tensor):
    return _TargetScores.apply(head(hidden), target)  # bf16 logits under autocast


class _TargetScores(torch.autograd.Function):
    """From one chunk of logits: the target's float32 log-probability (with gradient), the entropy and whether the
    target is the argmax, worked through HEAD_SLICE_BYTES of float32 rows at a time.

    The arithmetic of `log_softmax(logits.float())`, its gather, entropy and backward, but each slice's float32 copy,
    log-probabilities and exponentials stay in cache: done on whole 128 x 49k chunks, those passes went to memory
    and took longer than the chunk's two matmuls. Saves the logits and one log-sum-exp per row, recomputing the
    probabilities in the backward."""

    @staticmethod
    def forward(ctx, logits, target):
        with torch.autocast("cpu", enabled=False):
            rows = logits.shape[0]
            log_p, entropy, top1, lse = (torch.empty(rows) for _ in range(4))
            for part in _slices(logits):
                z, t = logits[part].to(torch.float32, copy=True), target[part]  # a copy: it is changed in place
                lse[part] = torch.logsumexp(z, -1)
                top1[part] = (z.argmax(-1) == t).float()  # argmax is 5x faster in float32 than in bf16
                z = z.sub_(lse[part, None])
                log_p[part] = z.gather(-1, t[:, None]).squeeze(-1)
                entropy[part] = -(z.exp() * z).sum(-1)
        ctx.save_for_backward(logits, target, lse)
        ctx.mark_non_differentiable(entropy, top1)
        return log_p, entropy, top1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_p, _entropy, _top1):
        logits, target, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        with torch.autocast("cpu", enabled=False):
            for part in _slices(logits):  # d log p_t / d z = onehot(t) - softmax(z), in float32
                g = grad_log_p[part, None]
                probs = logits[part].to(torch.float32, copy=True).sub_(lse[part, None]).exp_()
                grad[part] = probs.mul_(-g).scatter_add_(-1, target[part, None], g)
        return grad, None


def _slices(logits: torch.Tensor):
    step = max(1, HEAD_SLICE_BYTES // (logits.shape[-1] * 4))
    return (slice(start, start + step) for start in range(0, logits.shape[0], step))


# Short examples packed into micro-batches ----------------------------------------------------------------------------

PACKABLE = {"input_ids", "attention_mask", "labels"}  # what SFT's and pretraining's collators give
PACK_TOKENS = 512  # longest packed row (a longer example runs alone): a pass's memory within a 512-token one's


def packed_micro_batches(trainer, max_tokens: int | None) -> bool:
    """With CPU micro-batches (one example per pass, training.cpu_micro_batches), run the examples of each optimizer
    step together, consecutive ones packed into one row of at most PACK_TOKENS tokens (max_length if smaller, the
    step's longest example if larger), position ids restarting per example.

    A pass has a cost of its own (hundreds of small operations per layer): one pass over eight 56-token examples
    took 0.4x the time of eight passes. Rows stay short enough that a pass's memory stays within that of a long
    example; their attention costs little more than the examples' apart (llmft's attention skips, block by block,
    the keys of a row's earlier examples). Examples that fit with no other run alone. The Trainer's
    loss is the sum of the passes' token losses over the step's token count (num_items_in_batch), so the gradients
    are those of the unpacked micro-batches; without that count, or with keys a packed row cannot carry, the
    step's examples run one by one as before. The step's earlier micro-batches wait for its last one (their loss,
    added with the last one's, is logged with the step's). Installed only where a probe shows that a packed row
    computes each example as if alone (models whose attention ignores position ids, or that carry state from token
    to token, would mix examples), in single-process runs (DDP would reduce at every packed pass). True when
    installed."""
    if not one_process(trainer):
        return False
    if not _packing_keeps_examples_apart(trainer.model):
        logging.getLogger(__name__).info("Short examples run one per pass: this model mixes examples packed in a row.")
        return False
    run_pass, fetch, waiting = trainer.training_step, trainer.get_batch_samples, []
    budget = min(max_tokens or PACK_TOKENS, PACK_TOKENS)

    def get_batch_samples(*args, **kwargs):  # a new step: nothing of an interrupted one is left waiting
        waiting.clear()
        return fetch(*args, **kwargs)

    def training_step(model, inputs, num_items_in_batch=None):
        waiting.append(inputs)
        if len(waiting) < trainer.current_gradient_accumulation_steps:
            return torch.zeros(())  # run with the step's last micro-batch
        batches = list(waiting)
        waiting.clear()
        passes = _packed(batches, budget) if num_items_in_batch is not None else batches
        window = trainer.current_gradient_accumulation_steps
        trainer.current_gradient_accumulation_steps = len(passes)  # TRL divides a MoE router loss by it per pass
        try:
            return sum(run_pass(model, batch, num_items_in_batch) for batch in passes)
        finally:
            trainer.current_gradient_accumulation_steps = window

    trainer.get_batch_samples, trainer.training_step = get_batch_samples, training_step
    return True


TOKEN_MEANS = ("entropy", "mean_token_accuracy")  # TRL logs each as its mean over a pass's label tokens


def token_means_per_step(trainer) -> bool:
    """TRL's SFT trainer logs the entropy and token accuracy of each pass, as means over its label tokens, and
    averages them over a step's passes: with CPU micro-batches (one example, or one packed row, per pass) a short
    example would weigh as much as a long one. Each step logs one mean over all its label tokens instead, as one
    padded batch of all the step's examples would. Installed before packed_micro_batches, whose passes it then sees.
    True when installed: in one process (across processes TRL's entries are means over every rank's tokens, and the
    counts here are this rank's) and on trainers that keep TRL's per-pass metrics."""
    from transformers import TrainerCallback

    if not one_process(trainer) or "train" not in getattr(trainer, "_metrics", {}):
        return False
    run_pass, tokens, logged = trainer.training_step, [], {}

    def training_step(model, inputs, num_items_in_batch=None):
        tokens.append(_label_tokens(inputs))
        return run_pass(model, inputs, num_items_in_batch)

    class OneMeanPerStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            tokens.clear()
            logged.update({key: len(trainer._metrics["train"].get(key, [])) for key in TOKEN_MEANS})

        def on_step_end(self, args, state, control, **kwargs):  # before the Trainer logs the step
            _one_mean_per_step(trainer._metrics["train"], logged, tokens)

    trainer.training_step = training_step
    trainer.add_callback(OneMeanPerStep())
    return True


def _one_mean_per_step(metrics: dict, logged: dict, tokens: list[int | None]) -> None:
    """The entries each pass appended since `logged` (the lengths before the step), one per pass, become their mean
    weighted by the passes' label tokens; left as they are otherwise."""
    if None in tokens or sum(tokens) == 0:
        return
    for key, start in logged.items():
        means = metrics.get(key, [])[start:]
        if len(means) == len(tokens):
            metrics[key][start:] = [sum(mean * n for mean, n in zip(means, tokens)) / sum(tokens)]


def _label_tokens(batch: dict) -> int | None:
    labels = batch.get("shift_labels")
    if labels is None and batch.get("labels") is not None:
        labels = batch["labels"][..., 1:]
    return None if labels is None else int((labels != -100).sum())


def _packing_keeps_examples_apart(model) -> bool:
    """Whether an example packed after another in one row (position ids restarting) is computed the same whatever
    that other example is: false for attention that ignores position ids (ALiBi models, some multimodal and
    remote-code models) and for layers that carry state across tokens (Mamba-style hybrids). Rows of equal shape
    run the same arithmetic, so a model that keeps examples apart gives the second example the same logits."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    first, other, second = (torch.randint(3, vocab, (1, n), generator=gen) for n in (6, 6, 9))
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None]
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            one, two = (model(input_ids=torch.cat([before, second], 1), position_ids=positions,
                              use_cache=False).logits[:, 6:].float() for before in (first, other))
    except Exception:  # noqa: BLE001 - a model that cannot take a packed row is not packed
        return False
    finally:
        model.train(training)
    return bool((one - two).abs().max() <= 1e-5 * one.abs().max())


def _packed(batches: list[dict], max_tokens: int | None) -> list[dict]:
    """Consecutive one-example batches grouped up to max_tokens tokens; a group of one is the batch as it came."""
    if any(set(batch) - PACKABLE or batch["input_ids"].shape[0] != 1 for batch in batches):
        return batches
    lengths = [int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].shape[1]
               for batch in batches]
    budget = max(max_tokens or 0, *lengths)
    groups: list[list[int]] = [[]]
    for index, length in enumerate(lengths):
        if groups[-1] and sum(lengths[i] for i in groups[-1]) + length > budget:
            groups.append([])
        groups[-1].append(index)
    return [batches[group[0]] if len(group) == 1 else _pack([batches[i] for i in group]) for group in groups]


def _pack(batches: list[dict]) -> dict:
    ids, labels, positions = [], [], []
    for batch in batches:
        keep = batch["attention_mask"][0].bool() if "attention_mask" in batch else slice(None)
        ids.append(batch["input_ids"][0][keep])
        labels.append(batch["labels"][0][keep].clone())
        labels[-1][0] = -100  # no example is predicted from the one before it
        positions.append(torch.arange(len(ids[-1])))
    return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None]}


# Freed memory within a step -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def freed_pages_kept_within_steps(trainer):
    """Under jemalloc (preloaded by llmft train on CPUs), freed pages stay with the process from each optimizer step's
    start to its end, where each arena gets its own decay time back and the pages are returned to the system.

    A step's micro-batches allocate and free the same large tensors over and over (gradient buffers the size of the
    embedding, LM-head chunks, activations); taking fresh pages for each was a third of a full fine-tuning step.
    Evaluation and generation between steps run with jemalloc's own settings, so their peak memory is unchanged.
    Yields False (nothing done) on any other allocator.
    """
    from transformers import TrainerCallback

    from llmft.hardware import Jemalloc

    jemalloc = Jemalloc.loaded()
    if jemalloc is None:
        yield False
        return
    saved: dict[str, int] = {}
    failed: list[OSError] = []

    def give_back() -> None:
        if saved:
            try:
                jemalloc.set_decays(saved)
                jemalloc.purge()
            except OSError as err:  # an allocator setting never stops a run
                _stop_keeping(failed, err)
            saved.clear()

    class KeepWithinStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            give_back()
            if failed:
                return
            saved.update(jemalloc.decays())  # each arena's own: jemalloc's arena for large blocks has 0
            try:
                jemalloc.set_decays(dict.fromkeys(saved, -1))
            except OSError as err:
                _stop_keeping(failed, err)

        def on_step_end(self, args, state, control, **kwargs):
            give_back()

    callback = KeepWithinStep()
    trainer.add_callback(callback)
    try:
        yield True
    finally:  # also when a step raises
        give_back()
        trainer.remove_callback(callback)


def _stop_keeping(failed: list[OSError], err: OSError) -> None:
    if not failed:
        logging.getLogger(__name__).warning("jemalloc refused a setting (%s): freed pages are no longer kept within "
                                            "steps; training goes on with jemalloc's own settings.", err)
    failed.append(err)
