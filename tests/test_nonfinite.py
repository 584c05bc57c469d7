"""NaN/Inf losses: stop naming the step and the examples (keeping the last good checkpoint), or skip the step."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmft.checkpoint import MARKER, NonFiniteError
from llmft.config import load_recipe
from llmft.train import train
from tests.helpers import chat_rows, make_tokenizer, write_jsonl, write_recipe

POISON = "<|begin_of_text|>"  # a special token of the tiny tokenizer that no other row uses
BAD_ROW = 1  # 1-based; with seed 42 and batch 2 it lands in step 3


@pytest.fixture(scope="module")
def poisoned_model_dir(tmp_path_factory):
    """A tiny model whose input embedding of POISON is NaN: any sequence with that token has a NaN loss.
    Untied, so the output layer (and every other sequence) stays finite."""
    path = tmp_path_factory.mktemp("poisoned")
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(POISON)] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _data(tmp_path):
    rows = chat_rows(12)
    rows[BAD_ROW - 1]["messages"][0]["content"] += f" {POISON}"
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_a_nan_loss_stops_training_naming_the_step_and_example(tmp_path, poisoned_model_dir):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", poisoned_model_dir, _data(tmp_path), out, data={"eval_fraction": 0},
                          training={"max_steps": 6, "save_strategy": "steps", "save_steps": 1})
    with pytest.raises(NonFiniteError) as err:
        train(load_recipe(recipe))
    message = str(err.value)
    assert "non-finite loss or gradients at step 3" in message and f"row {BAD_ROW}" in message
    assert "on_nonfinite: skip" in message  # says what to do
    # Steps 1 and 2 were saved and are the last good ones; nothing was saved after the bad step.
    saved = sorted(p.name for p in out.glob("checkpoint-*") if (p / MARKER).exists())
    assert saved == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "run.json").exists()


def test_skip_drops_only_the_bad_steps_and_records_them(tmp_path, poisoned_model_dir):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", poisoned_model_dir, _data(tmp_path), out, data={"eval_fraction": 0},
                          training={"max_steps": 6, "on_nonfinite": "skip"})
    train(load_recipe(recipe))
    run = json.loads((out / "run.json").read_text())
    skipped = run["skipped_nonfinite_steps"]
    assert [s["step"] for s in skipped] == [3] and f"row {BAD_ROW}" in skipped[0]["examples"]
    assert len(skipped[0]["examples"]) == 2  # the bad row and its batch mate
    assert run["trainable_tensors"]["changed"] == run["trainable_tensors"]["total"]
    # The adapter is finite: the NaN step never reached the weights.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora" in n)
