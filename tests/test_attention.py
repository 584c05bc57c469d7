"""llmft.attention: the recomputed attention gives softmax attention's output and gradients for every mask a decoder
gets (causal, padding on either side, a cache before the queries, full or arbitrary masks, grouped key/value heads),
block by block; on a model it takes bf16 training calls and leaves every other call to SDPA; a bf16 CPU run uses it."""

import pytest
import torch
from transformers import TrainerCallback

from llmft import attention
from llmft.attention import RecomputedAttention
from llmft.config import ModelConfig, PeftSettings
from llmft.cpu_speed import recomputed_attention
from llmft.model import load_model
from tests.helpers import chat_rows, write_jsonl, write_recipe


def reference(q, k, v, allowed):
    """Softmax attention in float64, written out; a query allowed nothing outputs zero (as SDPA does)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0)
    return probs @ v


def padding(batch, length, side, missing):
    keep = torch.ones(batch, length, dtype=torch.bool)
    if side == "right":
        keep[-1, length - missing:] = False
    else:
        keep[0, :missing] = False
    return keep


def packed(*rows):
    """Block-causal masks [B, 1, L, L] of rows packing examples of the given lengths: each attends to its own."""
    masks = []
    for lengths in rows:
        example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        masks.append((example[:, None] == example[None]) & torch.ones(len(example), len(example)).tril().bool())
    return torch.stack(masks)[:, None]


MASKS = {  # name: (queries L, keys S, mask for RecomputedAttention or None, causal flag)
    "causal": lambda: (40, 40, None, True),
    "causal after a cache": lambda: (33, 50, None, True),
    "one query after a cache": lambda: (1, 20, None, True),
    "full": lambda: (40, 40, None, False),
    "right padding": lambda: (40, 40, (torch.ones(40, 40, dtype=torch.bool).tril()
                                       & padding(2, 40, "right", 13)[:, None])[:, None], True),
    "left padding": lambda: (40, 40, (torch.ones(40, 40, dtype=torch.bool).tril()
                                      & padding(2, 40, "left", 10)[:, None])[:, None], True),
    "padding after a cache": lambda: (40, 52, (torch.ones(40, 52, dtype=torch.bool).tril(12)
                                               & padding(2, 52, "right", 9)[:, None])[:, None], True),
    "arbitrary": lambda: (40, 40, torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0)) > 0.3, True),
    "packed rows": lambda: (40, 40, packed([9, 14, 17], [12, 28]), True),
}


@pytest.mark.parametrize("blocks", ["many small blocks", "default blocks"])
@pytest.mark.parametrize("name", list(MASKS))
def test_output_and_gradients_match_softmax_attention(name, blocks, monkeypatch):
    if blocks == "many small blocks":  # 16 positions, up to 3 of the 4 batch x head rows: blocks start mid-batch
        monkeypatch.setattr(attention, "BLOCK_POSITIONS", 16)
        monkeypatch.setattr(attention, "BLOCK_BYTES", 3 * 16 * 3 * 40 * 4)
    length, keys, mask, causal = MASKS[name]()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, heads, n, 8, generator=gen) for heads, n in ((6, length), (2, keys), (2, keys)))
    if mask is None:
        allowed = torch.ones(length, keys, dtype=torch.bool)
        allowed = allowed.tril(keys - length) if causal else allowed
    else:
        allowed = mask
    grad_out = torch.randn(2, 6, length, 8, generator=gen)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = RecomputedAttention.apply(*leaves, mask, 8 ** -0.5, causal).transpose(1, 2)  # from [B, L, H, D]
    out.backward(grad_out)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    expected = reference(*ref_leaves, allowed)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
    if name == "left padding":  # queries that may attend to nothing: zero output, and they pass no gradient
        assert out[0, :, :10].abs().max() == 0
    if name == "packed rows" and blocks == "many small blocks":  # blocks skip the keys of earlier examples
        grid = attention._Grid(q, k, v, mask, causal)
        firsts = sorted({(queries.start // 3, keys.start) for _, queries, keys in grid.blocks()})
        assert firsts == [(0, 0), (16, 9), (32, 12)]  # the earliest example start of any batch row in the block


@pytest.mark.parametrize("case", ["causal", "causal after a cache", "right padding"])
def test_bf16_inputs_and_values_narrower_than_keys(case, monkeypatch):
    """The dtype training runs in (bf16 in, softmax and its backward computed in float32 from bf16, float32 sums
    over blocks, bf16 out and gradients) and a value width of its own, against float64, over several blocks of
    positions: the plain causal call (the one training makes) masks only each block's diagonal."""
    monkeypatch.setattr(attention, "BLOCK_POSITIONS", 16)
    monkeypatch.setattr(attention, "BLOCK_BYTES", 3 * 16 * 3 * 50 * 2)  # up to 3 of the 4 batch x head rows
    gen = torch.Generator().manual_seed(3)
    length, keys = (50, 50) if case != "causal after a cache" else (37, 50)
    q, k, v = torch.randn(2, 6, length, 8, generator=gen), torch.randn(2, 2, keys, 8, generator=gen), torch.randn(
        2, 2, keys, 5, generator=gen)
    allowed = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
    mask = (allowed & padding(2, keys, "right", 7)[:, None])[:, None] if case == "right padding" else None
    grad_out = torch.randn(2, 6, length, 5, generator=gen)
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out = RecomputedAttention.apply(*leaves, mask, 8 ** -0.5, True).transpose(1, 2)
    out.backward(grad_out.to(torch.bfloat16))
    ref_leaves = [x.to(torch.bfloat16).double().requires_grad_() for x in (q, k, v)]
    expected = reference(*ref_leaves, allowed if mask is None else mask)
    expected.backward(grad_out.to(torch.bfloat16).double())
    assert out.dtype == torch.bfloat16 and out.shape == (2, 6, length, 5)
    torch.testing.assert_close(out.double(), expected, rtol=0.02, atol=0.02)
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0.03, atol=0.03)


def test_a_bf16_softmax_rounds_a_float32_softmax_once():
    """What the forward relies on to match eager attention's arithmetic with PyTorch's bf16 softmax kernel: the
    float32 softmax cast to bf16, bit for bit on AVX-512 kernels; on AVX2 kernels about one value in 10^5 lands one
    bf16 step away."""
    gen = torch.Generator().manual_seed(5)
    scores = (torch.randn(3, 200, 333, generator=gen) * 6).to(torch.bfloat16)
    scores[:, :, 150:] = scores[:, :, 150:].masked_fill(torch.rand(3, 200, 183, generator=gen) > 0.5, float("-inf"))
    ours, eager = torch.softmax(scores, -1), torch.softmax(scores, -1, dtype=torch.float32).to(torch.bfloat16)
    differ = ours != eager
    assert differ.sum() <= ours.numel() // 10_000
    step = eager.float().abs() * 2**-7  # one bf16 step (8 bits of mantissa) at most
    assert ((ours.float() - eager.float()).abs() <= step)[differ].all()


class Training(torch.nn.Module):
    is_causal, num_key_value_groups = True, 3  # an attention module as transformers' attention functions see it


@pytest.mark.parametrize("case", ["no mask over a cache", "a mask broadcast over queries", "a decoding step",
                                  "eval mode", "float32"])
def test_calls_it_does_not_cover_are_sdpas_own(case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(4)
    length = {"no mask over a cache": 3, "a decoding step": 1}.get(case, 140)  # > one block of positions
    q = torch.randn(2, 6, length, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 150, 8, generator=gen, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, 1, 1, 150, dtype=torch.bool) if case == "a mask broadcast over queries" else None
    module = Training().train(case != "eval mode")
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours, _ = attention.attention_forward(module, q, k, v, mask)
        sdpa, _ = sdpa_attention_forward(module, q, k, v, mask)
    assert torch.equal(ours, sdpa)
    assert ours.grad_fn is not None and "RecomputedAttention" not in type(ours.grad_fn).__name__


def _tiny(tiny_model_dir, implementation="sdpa"):
    torch.manual_seed(0)
    config = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", attn_implementation=implementation)
    return load_model(config, PeftSettings(method="full")).train()


def _batch(vocab):
    ids = torch.randint(3, vocab, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 21:] = 0  # right padding
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _step(model, ids, mask, labels, bf16):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss, torch.cat([p.grad.flatten() for p in model.parameters()])


def _graph_names(tensor):
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [next_fn for next_fn, _ in node.next_functions]
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_on_a_model_bf16_training_calls_take_it_and_stay_as_close_to_float32_as_sdpa(tiny_model_dir, checkpointing):
    model = _tiny(tiny_model_dir)
    if checkpointing:  # the forward recomputed in the backward takes it too
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, labels = _batch(model.config.vocab_size)
    _, exact = _step(model, ids, mask, labels, bf16=False)
    sdpa_loss, sdpa = _step(model, ids, mask, labels, bf16=True)
    assert "RecomputedAttentionBackward" not in _graph_names(sdpa_loss)
    assert recomputed_attention(model) and model.config._attn_implementation == attention.NAME
    ours_loss, ours = _step(model, ids, mask, labels, bf16=True)
    assert "RecomputedAttentionBackward" in _graph_names(ours_loss)
    assert ours_loss.item() == pytest.approx(sdpa_loss.item(), abs=2e-3)
    error, sdpa_error = (ours - exact).norm() / exact.norm(), (sdpa - exact).norm() / exact.norm()
    assert error < 1.5 * sdpa_error + 1e-3, (error, sdpa_error)  # bf16 rounding, no worse than SDPA's


def test_float32_and_eval_mode_calls_are_sdpas_own_and_reference_passes_match_the_policy(tiny_model_dir):
    model, plain = _tiny(tiny_model_dir), _tiny(tiny_model_dir)
    assert recomputed_attention(model)
    ids, mask, labels = _batch(model.config.vocab_size)
    loss, grads = _step(model, ids, mask, labels, bf16=False)
    plain_loss, plain_grads = _step(plain, ids, mask, labels, bf16=False)
    assert torch.equal(loss, plain_loss) and torch.equal(grads, plain_grads)
    # In training mode a pass without gradients (DPO's or GRPO's reference log-probs) computes what the policy's
    # pass computes, bit for bit; SDPA's differs by bf16 rounding.
    with torch.autocast("cpu", torch.bfloat16):
        policy = model(input_ids=ids, attention_mask=mask).logits
        with torch.no_grad():
            reference_pass = model(input_ids=ids, attention_mask=mask).logits
            sdpa = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(reference_pass, policy.detach()) and not torch.equal(reference_pass, sdpa)
    model.eval(), plain.eval()  # evaluation and generation after training
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           plain(input_ids=ids, attention_mask=mask).logits)
    out = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain.generate(ids[:1, :8], max_new_tokens=4, do_sample=False))


def test_models_on_other_attention_implementations_are_left_alone(tiny_model_dir):
    model = _tiny(tiny_model_dir, "eager")
    assert not recomputed_attention(model) and model.config._attn_implementation == "eager"


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_rows(10))


class SeenAttention(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.implementation = model.config._attn_implementation


@pytest.mark.parametrize("setting,expected", [("auto", attention.NAME), ("sdpa", "sdpa")])
def test_a_bf16_cpu_run_trains_with_it_unless_the_recipe_names_an_attention(tmp_path, tiny_model_dir, train_file,
                                                                            setting, expected):
    from llmft.config import load_recipe
    from llmft.run_dir import missing_files, read_run
    from llmft.train import train

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out, peft={"method": "full"},
                          model={"attn_implementation": setting})
    seen = SeenAttention()
    train(load_recipe(recipe, ["--max_steps", "2", "--bf16", "true"]), callbacks=[seen])
    assert seen.implementation == expected
    tensors = read_run(out).info.trainable_tensors
    assert tensors["changed"] == tensors["total"] > 0 and missing_files(out) == []
    saved = [path.read_text() for path in out.rglob("*.json")]  # config.json, run.json, trainer state...
    assert any('"model_type"' in text for text in saved)
    assert not any(attention.NAME in text for text in saved)  # what later stages load names no llmft attention
