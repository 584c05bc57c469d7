"""llmft merge, shard by shard: the same tensors as peft's merge_and_unload (plain LoRA, rsLoRA, DoRA, LoRA on the
embeddings), the base's shard layout, the dtype asked for, refusals by name, and a peak memory of about one shard."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from llmft.config import load_recipe
from llmft.errors import HubError
from llmft.merge import merge
from llmft.model import load_run_model
from llmft.run_dir import read_run
from llmft.train import train
from tests.conftest import LLMFT
from tests.helpers import chat_rows, make_tokenizer, write_jsonl, write_recipe


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    """A tiny random Llama saved in many small shards, untied head (so the head is its own tensor)."""
    path = tmp_path_factory.mktemp("sharded-base")
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="40KB")
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def _run(tmp_path, base, **peft):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    recipe = write_recipe(tmp_path / "r.yaml", base, data, tmp_path / "run",
                          peft={"method": "lora", "r": 4, "lora_alpha": 16, **peft},
                          training={"max_steps": 3, "learning_rate": 5e-2})
    return train(load_recipe(recipe))


def _peft_merged(run_path):
    return {k: v.float() for k, v in load_run_model(read_run(run_path)).merge_and_unload().state_dict().items()}


def _merged(folder):
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True},
                                     {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}],
                         ids=["lora", "rslora", "dora", "embeddings"])
def test_the_shard_merge_equals_peft_merge_and_unload(tmp_path, sharded_base, variant):
    run = _run(tmp_path, sharded_base, **variant)
    out = merge(run, tmp_path / "merged")
    ours, theirs = _merged(out), _peft_merged(run)
    assert set(ours) == set(theirs)
    base = _merged(sharded_base)
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert changed, "the adapter changed nothing: the test would prove nothing"
    for name in ours:
        assert torch.allclose(ours[name].float(), theirs[name], atol=1e-6, rtol=1e-5), name
    # The base's layout, loadable by plain transformers, with the run's tokenizer and template.
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in sharded_base.glob("*.safetensors"))
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == json.loads(
        (sharded_base / "model.safetensors.index.json").read_text())["weight_map"]
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()
    LlamaForCausalLM.from_pretrained(out)


def test_dtype_default_is_the_bases_and_can_be_chosen(tmp_path, sharded_base):
    run = _run(tmp_path, sharded_base)
    assert {t.dtype for t in _merged(merge(run, tmp_path / "auto")).values()} == {torch.float32}
    out = tmp_path / "bf16"
    result = subprocess.run([LLMFT, "merge", str(run), "--out", str(out), "--dtype", "bfloat16"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert {t.dtype for t in _merged(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_checkpoint_that_names_its_tensors_unlike_the_model_is_merged_in_memory(tmp_path):
    """GPT-2's published checkpoints hold its body without the "transformer." prefix the model's names have, so the
    shard-by-shard merge finds no tensor to change: peft merges the whole model in memory instead."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    base = tmp_path / "gpt2-like"
    tokenizer = make_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(base)  # the body alone: h.0.attn.c_attn.weight, not transformer.h.0...
    tokenizer.save_pretrained(base)
    assert not any(k.startswith("transformer.") for k in load_file(base / "model.safetensors"))
    run = _run(tmp_path, base)
    out = merge(run, tmp_path / "merged")
    theirs = _peft_merged(run)
    ours = GPT2LMHeadModel.from_pretrained(out).state_dict()
    assert all(torch.allclose(ours[k].float(), theirs[k], atol=1e-6) for k in theirs)
    assert (out / "llmft_merge.json").exists()


def test_a_merge_replaces_only_an_earlier_merge(tmp_path, sharded_base):
    """The output folder is replaced whole: an earlier merge may be, the run itself or a folder of other files may
    not (merging into the run directory would delete it)."""
    run = _run(tmp_path, sharded_base)
    out = merge(run, tmp_path / "merged")
    assert merge(run, out) == out  # again, over its own earlier output
    for refused in (run, run.parent):
        with pytest.raises(HubError, match="is the run directory or holds it"):
            merge(run, refused)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(HubError, match="already holds files that are not an earlier llmft merge"):
        merge(run, notes)
    assert (notes / "todo.txt").read_text() == "mine" and (run / "adapter_model.safetensors").exists()


def test_what_it_cannot_merge_is_refused_by_name(tmp_path, sharded_base):
    run = _run(tmp_path, sharded_base)
    copy = tmp_path / "patterned"
    shutil.copytree(run, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 8}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(HubError, match="rank_pattern"):
        merge(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    result = subprocess.run([LLMFT, "merge", str(copy), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "rank_pattern" in result.stderr


# Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current resident size, so the peak is the merge's.
MEASURE = r"""
import json, sys
from pathlib import Path
from llmft import merge
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
run, out, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
import llmft.model, peft, transformers  # imported before the measurement starts
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
if how == "shards":
    merge.merge(run, out)
else:
    merge.merge_in_memory(merge.read_run(run), out, "float32")
print(json.dumps({"before_kb": before, "peak_kb": status("VmHWM")}))
"""


@pytest.mark.slow
def test_peak_memory_is_about_one_shard_not_the_model(tmp_path):
    """A 0.4 GB base in 50 MB shards merges in a few shards' worth of memory; peft's whole-model merge needs more
    than the model."""
    base = tmp_path / "base"
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base, max_shard_size="50MB")
    tokenizer.save_pretrained(base)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert size > 350e6
    run = _run(tmp_path, base)
    grew = {}
    for how in ("shards", "in-memory"):  # peft's whole-model merge beside it: the measurement can tell them apart
        result = subprocess.run([sys.executable, "-c", MEASURE, str(run), str(tmp_path / how), how],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        grew[how] = (measured["peak_kb"] - measured["before_kb"]) * 1024
    largest = max(p.stat().st_size for p in base.glob("*.safetensors"))
    assert grew["in-memory"] > size, grew
    # A shard read, its merged tensors and their serialised bytes: a few shards' worth, whatever the model's size.
    assert grew["shards"] < 6 * largest < 0.8 * size, f"the shard merge grew the process by " \
                                                      f"{grew['shards'] / 1e6:.0f} MB ({largest / 1e6:.0f} MB shards)"
