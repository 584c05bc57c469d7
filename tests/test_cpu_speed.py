"""llmft.cpu_speed: each CPU lever computes what the code it replaces computes (same loss, gradients, metrics and
dropout statistics), and a CPU training run uses them."""

import copy
import gc
import weakref

import pytest
import torch

from llmft.config import ModelConfig, PeftSettings
from llmft.cpu_speed import (CheapDropout, adapters_follow_autocast, bf16_weights_once_per_step, cheap_lora_dropout,
                             drop_bf16_weight_copies, fused_rms_norms, loss_positions_head)
from llmft.model import add_lora, load_model


@pytest.fixture
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"), PeftSettings(method="full"))


def _batch(vocab: int):
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt
    labels[1, :20] = -100  # mostly prompt
    return ids, labels


def _fused(model, ids, labels):
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=torch.tensor(17))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out, grads


@pytest.mark.parametrize("recompute", [False, True])
def test_the_loss_positions_head_gives_trl_fused_heads_loss_gradients_and_metrics(tiny, recompute, monkeypatch):
    import inspect

    from trl.trainer.utils import add_fused_lm_head

    monkeypatch.setattr("llmft.cpu_speed.HEAD_CHUNK", 7)  # several chunks, the last one short
    if recompute:  # long answers x large vocabularies: each chunk recomputed in the backward
        monkeypatch.setattr("llmft.cpu_speed.HEAD_KEEP_BYTES", 0)
    add_fused_lm_head(tiny, outputs=("log_probs", "entropy", "is_top1"))
    ids, labels = _batch(tiny.config.vocab_size)
    theirs, their_grads = _fused(tiny, ids, labels)
    assert loss_positions_head(tiny)
    assert "logits_to_keep" in inspect.signature(tiny.forward).parameters  # generate() reads the model's signature
    ours, our_grads = _fused(tiny, ids, labels)
    torch.testing.assert_close(ours.loss, theirs.loss)
    for field in ("log_probs", "entropy", "label_mask"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field).to(getattr(ours, field).dtype))
    assert torch.equal(ours.is_top1.bool(), theirs.is_top1.bool())
    assert their_grads.keys() == our_grads.keys() and len(our_grads) > 5
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6)
    # A batch with nothing to learn: a finite zero that still reaches the weights (as TRL's head gives).
    nothing = tiny(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    nothing.loss.backward()
    assert nothing.loss.item() == 0 and tiny.lm_head.weight.grad is not None
    tiny.zero_grad()
    # Without fused_lm_head (generation, plain evaluation) the model's own forward answers.
    plain = tiny(input_ids=ids, labels=torch.where(labels == -100, -100, ids))
    assert plain.logits.shape == (2, 24, tiny.config.vocab_size)


def test_the_loss_positions_head_stays_off_models_without_trls_head(tiny):
    assert not loss_positions_head(tiny)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_scores_in_slices_are_log_softmaxs_and_leave_the_logits_as_they_were(dtype, monkeypatch):
    """The LM head's scoring, slice by slice (3 rows of a 10-row chunk at a time here), against log_softmax over
    the whole chunk in float32: log-probabilities, entropy, top-1 and the logits' gradient."""
    from llmft.cpu_speed import _TargetScores

    monkeypatch.setattr("llmft.cpu_speed.HEAD_SLICE_BYTES", 3 * 1000 * 4)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(10, 1000, generator=gen) * 4).to(dtype)
    target, weights = torch.randint(0, 1000, (10,), generator=gen), torch.randn(10, generator=gen)
    kept = logits.clone()
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    log_p, entropy, top1 = _TargetScores.apply(ours, target)
    (log_p * weights).sum().backward()
    full = torch.log_softmax(theirs.float(), -1)
    want = full.gather(-1, target[:, None]).squeeze(-1)
    (want * weights).sum().backward()
    assert torch.equal(ours.detach(), kept) and log_p.dtype == torch.float32
    torch.testing.assert_close(log_p, want.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1).detach(), rtol=0, atol=1e-4)
    assert torch.equal(top1.bool(), full.argmax(-1) == target)
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_a_batch_without_labels_still_reaches_an_untied_head():
    from llmft.cpu_speed import _score

    head, hidden = torch.nn.Linear(8, 32, bias=False), torch.randn(0, 8, requires_grad=True)
    log_p, entropy, top1 = _score(hidden, head, torch.zeros(0, dtype=torch.long))
    (-log_p.sum()).backward()
    assert log_p.shape == (0,) and head.weight.grad is not None and not head.weight.grad.any()


def test_cheap_dropout_drops_at_rate_p_and_scales_like_torch():
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    for p in (0.05, 0.1, 0.5):
        y = CheapDropout(p).train()(x)
        kept = (y != 0).float().mean().item()
        assert abs(kept - (1 - p)) < 0.002, (p, kept)
        assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))
        assert abs(y.mean().item() - 1) < 0.005  # the expectation is kept, as torch.nn.Dropout keeps it
        dropped = (y == 0).view(-1, 2)  # independent elements: a pair is dropped together with probability p^2
        together = dropped.all(-1).float().mean().item()
        assert abs(together - p * p) < 5 * (p * p * (1 - p * p) / len(dropped)) ** 0.5, (p, together)  # 5 sigma
    # Masks differ between calls.
    a, b = CheapDropout(0.5).train()(x[:4096]), CheapDropout(0.5).train()(x[:4096])
    assert not torch.equal(a, b) and 1800 < int((a != 0).sum()) < 2300
    assert torch.equal(CheapDropout(0.5).eval()(x), x)
    # Any layout and size: a transposed input keeps its shape and values, an empty one passes through.
    transposed = torch.arange(1.0, 2049.0).view(64, 32).t()
    y = CheapDropout(0.1).train()(transposed)
    assert y.shape == (32, 64) and torch.equal(y[y != 0], (transposed * (1 / 0.9))[y != 0])
    assert CheapDropout(0.1).train()(torch.ones(0, 8)).shape == (0, 8)
    # Seeded like torch: the same seed gives the same mask; the gradient flows through the kept elements only.
    torch.manual_seed(3)
    leaf = torch.randn(64, 32, requires_grad=True)
    y = CheapDropout(0.2).train()(leaf)
    y.sum().backward()
    torch.manual_seed(3)
    torch.randn(64, 32)
    again = CheapDropout(0.2).train()(leaf.detach())
    assert torch.equal(y.detach(), again)
    assert torch.equal(leaf.grad, (y != 0).float() / 0.8)


def test_lora_adapters_take_bf16_inputs_under_autocast_and_float32_outside(tiny):
    model = add_lora(copy.deepcopy(tiny).to(torch.bfloat16), PeftSettings(method="lora", lora_dropout=0.1))
    ids = torch.randint(3, model.config.vocab_size, (1, 16))
    model.eval()
    with torch.autocast("cpu", torch.bfloat16):
        before = model(input_ids=ids).logits
    plain = model(input_ids=ids).logits
    assert adapters_follow_autocast(model) > 0 and cheap_lora_dropout(model) > 0
    with torch.autocast("cpu", torch.bfloat16):
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after.float(), before.float(), rtol=0.02, atol=0.02)  # bf16 rounding of the input only
    assert torch.equal(model(input_ids=ids).logits, plain)  # outside autocast: peft's float32 path, unchanged
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert any(isinstance(m, CheapDropout) for m in model.modules())
    model.train()
    with torch.autocast("cpu", torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters)


class _SgdThroughData(torch.optim.Optimizer):
    """An optimizer that writes its update through .data, as some do: the weights' version counters stay put."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.data.add_(param.grad, alpha=-group["lr"])


@pytest.mark.parametrize("optimizer,checkpointing", [("fused adamw", False), ("through .data", False),
                                                     ("fused adamw", True)])  # neither moves the version counters
def test_bf16_weight_copies_made_once_per_step_train_as_autocasts_casts_per_call(tiny, optimizer, checkpointing):
    """Two micro-batches, an optimizer step, two more, another step: the first gradients equal autocast's to the bit
    (the tied embedding's within float32 rounding), then the second and the weights, so each copy follows its weight
    after a step however the step wrote it; also with activations recomputed in the backward."""
    plain = copy.deepcopy(tiny).train()
    once = copy.deepcopy(tiny).train()
    if checkpointing:
        for model in (plain, once):
            model.gradient_checkpointing_enable({"use_reentrant": False})
    layers = bf16_weights_once_per_step(once)
    assert layers == 2 * 7 + 1  # q, k, v, o, gate, up, down per decoder layer, and the LM head
    ids = torch.randint(3, tiny.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    make = {"fused adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),  # the Trainer's default
            "through .data": lambda params: _SgdThroughData(params, lr=1.0)}[optimizer]
    optimizers = [make(model.parameters()) for model in (plain, once)]
    head_copies = []  # the LM head's copy after each pass: (its buffer, when it was made)
    for step in range(2):
        grads = []
        for model, opt in zip((plain, once), optimizers):
            for row in ids[2 * step:2 * step + 2]:
                with torch.autocast("cpu", torch.bfloat16):
                    model(input_ids=row[None], labels=row[None]).loss.backward()
                if model is once:
                    head_copies.append((once.lm_head._llmft_bf16_copy.copy.data_ptr(),
                                        once.lm_head._llmft_bf16_copy.made_at))
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
            model.zero_grad(set_to_none=True)
        assert grads[0].keys() == grads[1].keys()
        for name, grad in grads[0].items():
            assert grads[1][name].dtype == torch.float32
            if step == 0 and name != "model.embed_tokens.weight":
                assert torch.equal(grads[1][name], grad), name
            # the tied embedding's two gradients are added in another order: float32 rounding, which AdamW carries on
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-8, msg=f"step {step}, {name}")
        for (name, a), b in zip(plain.named_parameters(), once.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8, msg=f"step {step}, {name}")
    assert not torch.equal(once.lm_head.weight, tiny.lm_head.weight)  # it trained
    (buffer, made), same_step, (next_buffer, remade), next_same_step = head_copies
    assert same_step == (buffer, made) and next_same_step == (next_buffer, remade)  # once per step
    assert next_buffer == buffer and remade != made  # remade after the optimizer step, into the same buffer
    grads = []
    for model in (plain, once):  # a weight written in place between passes, not by an optimizer (as loading does)
        for scale in (1, -2):
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight.mul_(scale)
            with torch.autocast("cpu", torch.bfloat16):
                model(input_ids=ids[:1], labels=ids[:1]).loss.backward()
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad)
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)
    copies = [m for m in once.modules() if "_llmft_bf16_copy" in m.__dict__]
    assert len(copies) == layers
    assert all(m._llmft_bf16_copy.copy.grad is None for m in copies)  # each gradient went to its weight
    once.eval()
    with torch.no_grad():
        torch.testing.assert_close(once(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    kept = weakref.ref(copies[0]._llmft_bf16_copy), weakref.ref(copies[0]._llmft_bf16_copy.copy)
    drop_bf16_weight_copies(once)
    assert not any("_llmft_bf16_copy" in m.__dict__ for m in once.modules())
    del copies
    gc.collect()
    assert kept[0]() is None and kept[1]() is None  # freed: nothing (a gradient hook) holds them


def test_weights_with_hooks_of_their_own_keep_autocasts_cast(tiny):
    """Layer-wise GaLore/APOLLO and LOMO step each weight from a hook on it: such a weight must stay in the graph."""
    model = copy.deepcopy(tiny).train()
    bf16_weights_once_per_step(model)
    fired = []
    model.lm_head.weight.register_post_accumulate_grad_hook(lambda weight: fired.append(weight.grad is not None))
    ids = torch.randint(3, tiny.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert fired == [True] and "_llmft_bf16_copy" not in model.lm_head.__dict__
    assert "_llmft_bf16_copy" in model.model.layers[0].mlp.up_proj.__dict__  # the others have their copies


@pytest.mark.parametrize("setup", ["float32", "float32 weights under autocast", "bf16 weights under autocast"])
def test_fused_rms_norms_give_the_same_outputs_and_gradients(tiny, setup):
    autocast = setup != "float32"
    plain = copy.deepcopy(tiny).to(torch.bfloat16 if setup.startswith("bf16") else torch.float32).train()
    with torch.no_grad():  # trained-looking norm weights (they start at ones, where many forms agree)
        for name, param in plain.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    fused = copy.deepcopy(plain)
    assert fused_rms_norms(fused) == 2 * 2 + 1  # two per decoder layer and the final one
    ids = torch.randint(3, tiny.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (plain, fused):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            hidden = model.model(input_ids=ids).last_hidden_state
        hidden.float().square().mean().backward()
        results.append((hidden, {n: p.grad for n, p in model.named_parameters()}))
    (hidden, grads), (fused_hidden, fused_grads) = results
    assert fused_hidden.dtype == hidden.dtype and torch.equal(fused_hidden, hidden)  # the forward to the bit
    tolerance = {"rtol": 0.02, "atol": 1e-3} if autocast else {"rtol": 1e-5, "atol": 1e-7}
    for name in grads:  # the backward in another order of the same arithmetic
        torch.testing.assert_close(fused_grads[name], grads[name], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norms_that_compute_something_else_are_left_alone(dtype):
    """Gemma: weight * (1 + ...) in float32; OLMo 2: the product before the cast; Helium: a float32 weight product;
    Gemma 3n: the product in float32. All agree with Llama's form at their initial weights."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm
    from transformers.models.helium.modeling_helium import HeliumRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    for kind in (GemmaRMSNorm, Olmo2RMSNorm, HeliumRMSNorm, Gemma3nRMSNorm):
        assert fused_rms_norms(torch.nn.Sequential(kind(8)).to(dtype)) == 0, kind.__name__


def test_training_starts_again_with_jemalloc_or_tcmalloc_where_installed(tmp_path, tiny_model_dir, quiet_env):
    """`llmft train` re-runs itself with the allocator preloaded (llmft.hardware.preload_allocator) and records it;
    LLMFT_ALLOCATOR=system keeps glibc's."""
    import json
    import subprocess
    from pathlib import Path

    from llmft.hardware import allocator_library
    from tests.conftest import LLMFT
    from tests.helpers import chat_rows, write_jsonl, write_recipe

    from llmft.hardware import GPU_DEVICES

    library = allocator_library()
    if any(Path(device).exists() for device in GPU_DEVICES):
        pytest.skip("a GPU machine: llmft keeps the system allocator there")
    if library is None:
        pytest.skip("neither jemalloc nor tcmalloc is installed (apt-get install libjemalloc2)")
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out, training={"max_steps": 1},
                          eval={"num_generate": 0, "baseline": False})
    done = subprocess.run([LLMFT, "train", str(recipe)], capture_output=True, text=True, env=quiet_env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["hardware"]["allocator"] == library
    assert ("jemalloc keeps freed pages within each step" in done.stderr) == ("jemalloc" in library)


# Run under a preloaded jemalloc: a tiny Trainer's steps with freed_pages_kept_within_steps, recording every arena's
# decay times inside each step and between steps; a 16 MB block in each step reaches jemalloc's arena for large blocks.
KEEP_WITHIN_STEP = """
import json, sys
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from llmft.config import ModelConfig, PeftSettings
from llmft.cpu_speed import freed_pages_kept_within_steps
from llmft.hardware import Jemalloc
from llmft.model import load_model

jemalloc = Jemalloc.loaded()
torch.zeros(4 * 2**20).add_(1)  # the arena for large blocks exists before training, with its own decay
seen = {"before": jemalloc.decays(), "in_step": [], "between_steps": []}

class Record(TrainerCallback):
    def on_substep_end(self, args, state, control, **kwargs):
        torch.zeros(4 * 2**20).add_(1)
        seen["in_step"].append(jemalloc.decays())

    def on_log(self, args, state, control, **kwargs):  # after on_step_end
        seen["between_steps"].append(jemalloc.decays())

model = load_model(ModelConfig(name_or_path=sys.argv[1], dtype="float32"), PeftSettings(method="full"))
ids = torch.randint(3, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
args = TrainingArguments(output_dir=sys.argv[2], use_cpu=True, per_device_train_batch_size=1,
                         gradient_accumulation_steps=2, max_steps=2, logging_steps=1, save_strategy="no",
                         report_to="none")
trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                  callbacks=[Record()])
with freed_pages_kept_within_steps(trainer) as kept:
    assert kept
    trainer.train()
seen["after"] = jemalloc.decays()
print(json.dumps(seen))
"""


def test_jemalloc_keeps_freed_pages_within_a_step_and_its_decay_between_steps(tmp_path, tiny_model_dir, quiet_env):
    """Inside a step no arena returns freed pages (decay -1: reused instead of faulted in again); at its end each
    arena has its own decay time back (jemalloc's arena for large blocks: 0, the others 10 s by default) and the
    pages are purged, for evaluation, generation and what follows training."""
    import json
    import os
    import subprocess
    import sys

    from llmft.hardware import Jemalloc, allocator_library

    if "jemalloc" not in os.environ.get("LD_PRELOAD", ""):
        assert Jemalloc.loaded() is None  # glibc's malloc: nothing to set
    library = allocator_library()
    if library is None or "jemalloc" not in library:
        pytest.skip("jemalloc is not installed (apt-get install libjemalloc2)")
    script = tmp_path / "keep.py"
    script.write_text(KEEP_WITHIN_STEP)
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "out")],
                          capture_output=True, text=True, env={**quiet_env, "LD_PRELOAD": library})
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    before = seen["before"]
    dirty = {name: ms for name, ms in before.items() if name.endswith("dirty_decay_ms")}
    assert len(set(dirty.values())) > 1, before  # arenas with their own decay times, each to be given back
    assert len(seen["in_step"]) == 2  # the first micro-batch of each of the 2 steps (the second ends the step)
    for in_step in seen["in_step"]:
        assert all(in_step[name] == -1 for name in before), in_step
    for between in [*seen["between_steps"], seen["after"]]:
        assert {name: between[name] for name in before} == before
    assert len(seen["between_steps"]) >= 2


def test_the_allocator_is_left_alone_when_asked_or_preloaded_already(monkeypatch):
    """Each of these returns instead of starting the command again (an exec would end this test process)."""
    from llmft.hardware import allocator_in_use, preload_allocator

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("LLMFT_ALLOCATOR", "system")
    assert preload_allocator(["train", "recipe.yaml"]) is None and allocator_in_use() == "system malloc"
    monkeypatch.delenv("LLMFT_ALLOCATOR")
    assert preload_allocator(["data", "convert", "x.json"]) is None  # only training and evaluation
    monkeypatch.setenv("LD_PRELOAD", "/opt/mine/libmymalloc.so")
    assert preload_allocator(["train", "recipe.yaml"]) is None
    assert allocator_in_use() == "LD_PRELOAD=/opt/mine/libmymalloc.so"


def _one_example(length: int, first: int) -> dict:
    """A one-example batch as the SFT collator gives it with CPU micro-batches."""
    ids = torch.arange(first, first + length)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_a_steps_examples_are_packed_in_order_up_to_the_budget_and_no_example_predicts_the_next():
    from llmft.cpu_speed import _packed

    batches = [_one_example(3, 10), _one_example(4, 20), _one_example(6, 30), _one_example(2, 40)]
    first, second = _packed(batches, 8)  # 3 + 4 fit in 8; 6 starts a row of its own, and 2 joins it
    assert first["input_ids"].tolist() == [[10, 11, 12, 20, 21, 22, 23]]
    assert first["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert first["labels"].tolist() == [[-100, 11, 12, -100, 21, 22, 23]]
    assert "attention_mask" not in first and second["input_ids"].tolist() == [[30, 31, 32, 33, 34, 35, 40, 41]]
    assert batches[0]["labels"].tolist() == [[10, 11, 12]]  # the collator's batches are left as they were
    # A group of one is the batch as it came; an example over the budget raises it to its own length.
    long, short = _one_example(9, 0), _one_example(3, 50)
    alone = _packed([long, short], 8)
    assert len(alone) == 2 and alone[0] is long and alone[1] is short
    assert _packed([_one_example(3, 0), _one_example(9, 0), _one_example(5, 0)], None)[0]["input_ids"].shape == (1, 3)
    # Keys a packed row cannot carry, or batches of several rows: the examples run one by one.
    odd = dict(_one_example(3, 0), completion_mask=torch.ones(1, 3))
    plain = _one_example(3, 5)
    assert _packed([odd, plain], 8) == [odd, plain]
    wide = {key: torch.cat([value, value]) for key, value in plain.items()}
    assert _packed([wide, plain], 8) == [wide, plain]


def test_a_step_logs_one_entropy_and_accuracy_over_all_its_label_tokens():
    """TRL appends each pass's mean over its label tokens; a step of several passes (its examples apart or packed)
    logs one mean over all the step's label tokens, as a padded batch of the same examples does."""
    from llmft.cpu_speed import _label_tokens, _one_mean_per_step

    passes = [{"labels": torch.tensor([[-100, 5, 6, 7]])},  # 3 label tokens once shifted
              {"labels": torch.tensor([[-100, -100, 9, -100]])},  # 1
              {"labels": torch.tensor([[4, 4]]), "shift_labels": torch.tensor([[-100, -100]])}]  # none
    tokens = [_label_tokens(batch) for batch in passes]
    assert tokens == [3, 1, 0] and _label_tokens({"input_ids": torch.tensor([[1, 2]])}) is None
    metrics = {"entropy": [9.0, 2.0, 4.0, 7.0], "mean_token_accuracy": [0.5, 1.0, 0.0, 0.0], "num_tokens": [10]}
    _one_mean_per_step(metrics, {"entropy": 1, "mean_token_accuracy": 1}, tokens)  # the earlier step's entry stays
    assert metrics == {"entropy": [9.0, pytest.approx((2.0 * 3 + 4.0) / 4)], "mean_token_accuracy": [0.5, 0.75],
                       "num_tokens": [10]}
    untouched = {"entropy": [1.0, 2.0]}
    _one_mean_per_step(untouched, {"entropy": 0}, [0, 0])  # no label tokens in the step: TRL's zeros stay
    _one_mean_per_step(untouched, {"entropy": 1}, [3, 1])  # not one entry per pass: left as logged
    _one_mean_per_step(untouched, {"entropy": 0}, [3, None])  # a pass without labels: no weights to use
    assert untouched == {"entropy": [1.0, 2.0]}


def test_trls_trainer_with_micro_batches_logs_each_steps_token_weighted_entropy(tiny, tiny_model_dir, tmp_path):
    """TRL's SFT trainer, one example per pass and two passes per step (a long and a short example): each step logs
    the mean of its two passes' entropies weighted by their label tokens, not their plain mean."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from llmft.cpu_speed import token_means_per_step

    class Seen(TrainerCallback):  # added before llmft's callback, so it sees each pass's entry
        def __init__(self):
            self.trainer, self.per_pass = None, []

        def on_step_end(self, args, state, control, **kwargs):
            self.per_pass.append(list(self.trainer._metrics["train"]["entropy"]))

    seen = Seen()
    rows = [{"input_ids": list(range(3, 43))}, {"input_ids": list(range(50, 56))}] * 2  # 39 and 5 label tokens
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                     max_steps=2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                     learning_rate=1e-2, train_sampling_strategy="sequential")  # long, short; long, short
    trainer = SFTTrainer(model=copy.deepcopy(tiny), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), callbacks=[seen])
    seen.trainer = trainer
    assert token_means_per_step(trainer)
    trainer.train()
    logged = [h["entropy"] for h in trainer.state.log_history if "entropy" in h and "loss" in h]
    assert len(logged) == 2 and all(len(entries) == 2 for entries in seen.per_pass)
    for (long, short), value in zip(seen.per_pass, logged):
        weighted, plain = (39 * long + 5 * short) / 44, (long + short) / 2
        assert abs(weighted - plain) > 1e-5  # the two means differ enough for the check to mean something
        assert value == pytest.approx(weighted, rel=1e-6)


def test_packing_is_used_only_on_models_that_keep_packed_examples_apart(tiny):
    """Llama-style attention separates examples by their restarting position ids; Bloom's ALiBi attention does
    not look at position ids, so a packed row would let one example attend to the one before it."""
    from transformers import BloomConfig, BloomForCausalLM

    from llmft.cpu_speed import _packing_keeps_examples_apart

    tiny.train()
    assert _packing_keeps_examples_apart(tiny) and tiny.training  # and the probe gives the mode back
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).train()
    assert not _packing_keeps_examples_apart(bloom) and bloom.training
