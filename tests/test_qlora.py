"""QLoRA for real on the CPU: bitsandbytes 4-bit NF4 and 8-bit bases with trained, unquantised LoRA adapters."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llmft.config import ModelConfig, PeftSettings, load_recipe
from llmft.model import load_model, load_run_model
from llmft.run_dir import read_run
from llmft.run_dir import missing_files
from llmft.train import train
from tests.helpers import chat_rows, write_jsonl, write_recipe

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_every_adapter_tensor_and_saves_it_unquantised(tmp_path, tiny_model_dir, bits):
    out = tmp_path / "run"
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(10))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                                      peft={"method": "qlora", "quant_bits": bits}))
    train(recipe)
    assert missing_files(out) == []
    run = json.loads((out / "run.json").read_text())
    checks = run["trainable_tensors"]
    assert checks["total"] > 0 and checks["changed"] == checks["total"], checks
    adapter = load_file(out / "adapter_model.safetensors")
    # Plain float32 LoRA matrices: no quantisation state, no bf16 (TRL casts QLoRA adapters to bf16; we undo it).
    assert adapter and all(v.dtype == torch.float32 and v.numel() > 0 for v in adapter.values())
    assert all("lora_A" in k or "lora_B" in k for k in adapter)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    # The adapter loads on the unquantised base, as `llmft eval` and `llmft merge` use it.
    model = load_run_model(read_run(out))
    assert not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False)


def test_4bit_base_is_nf4_double_quantised_with_storage_in_the_compute_dtype(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16"), PeftSettings(method="qlora"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    state = layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantisation
    # FSDP/ZeRO-3 can flatten and shard only parameters of one float dtype: storage matches compute.
    assert layer.weight.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16


def test_an_eval_forward_before_training_does_not_cut_the_adapters_gradients(tiny_model_dir, monkeypatch):
    """On CPUs with avx512_bf16, bitsandbytes repacks 4-bit weights for an inference kernel without autograd on the
    first no-grad eval forward, and training afterwards gets grad=None on every adapter (bitsandbytes says only "gemv_4bit: an autograd kernel was not registered"). This
    CPU lacks avx512_bf16, so its detection is patched to say yes: the repacking itself is plain torch and runs."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), PeftSettings(method="qlora"),
                       activation_checkpointing=True)
    ids = torch.randint(0, 300, (2, 12))
    model.eval()
    with torch.no_grad():  # a baseline eval
        model(input_ids=ids)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    for name, param in model.named_parameters():  # lora_B starts at zero, which would leave lora_A's grad at zero
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
