"""Merge, the train/serve check, the model card, the regression gate, and push against a stand-in Hub."""

import json
import shutil
import subprocess

import pytest
import torch

from llmft.config import load_recipe
from llmft.errors import HubError
from llmft.hub import check, gate, model_card
from llmft.merge import merge
from llmft.train import train
from tests.conftest import LLMFT
from tests.helpers import FakeHub, chat_rows, write_jsonl, write_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("hubrun")
    train_file = write_jsonl(tmp / "train.jsonl", chat_rows(12))
    out = tmp / "run"
    # A high learning rate on short, regular answers: the tiny model learns to end its turn.
    train(load_recipe(write_recipe(tmp / "r.yaml", tiny_model_dir, train_file, out,
                                   training={"max_steps": 40, "learning_rate": 3e-2},
                                   hub={"gate_metrics": ["eval_loss"]})))
    return out


def test_merged_model_gives_the_same_logits_as_adapter_on_base(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = merge(run, tmp_path / "merged")
    info = json.loads((run / "run.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(info["base_model"]["resolved"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(run)).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()  # plain transformers
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 64]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, plain(ids).logits, atol=1e-4)
    assert (merged / "chat_template.jinja").exists()


def test_check_passes_then_catches_a_broken_template(run, tmp_path):
    assert check(run)["stopped_at_end_of_turn"] >= 1
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    template = broken / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_end|>", "<|endoftext|>"))
    with pytest.raises(HubError, match="chat template differs from the one used in training"):
        check(broken)


def test_model_card_metadata_parses(run):
    from huggingface_hub import ModelCard

    card = ModelCard(model_card(run, "org/tiny-lora"))
    assert card.data.library_name == "peft" and "llmft" in card.data.tags
    assert "## Training data" in card.text and "learning_rate" in card.text and "sha256" in card.text


def test_gate_refuses_regressions_and_says_which(run, tmp_path):
    gated = tmp_path / "gated"
    shutil.copytree(run, gated)
    # Without eval_results.json the evaluations before and after training decide: the loss went down here.
    assert gate(gated, ["eval_loss"]) == []
    (gated / "eval_results.json").write_text(json.dumps({
        "results": {"eval_loss": 2.0, "eval_exact_match": 0.5}, "baseline": {"eval_loss": 1.5, "eval_exact_match": 0.4}}))
    assert gate(gated, ["eval_loss", "exact_match"]) == ["eval_loss: 2.0000 vs baseline 1.5000"]


def test_push_sends_adapter_tokenizer_and_card_and_never_the_token(run, tmp_path, fake_hub, quiet_env):
    pushed = tmp_path / "pushed"
    shutil.copytree(run, pushed)
    env = {**quiet_env, "HF_ENDPOINT": fake_hub, "HF_TOKEN": "hf_secret_token_123", "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([LLMFT, "push", str(pushed), "--repo-id", "org/tiny", "--gate"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:] + str(FakeHub.requests)
    assert ("POST", "/api/repos/create") in FakeHub.requests
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "README.md", "recipe.yaml", "run.json"):
        assert name in FakeHub.files, sorted(FakeHub.files)
    assert FakeHub.files["adapter_model.safetensors"] == (pushed / "adapter_model.safetensors").read_bytes()
    assert FakeHub.auth == {"Bearer hf_secret_token_123"}
    assert all(b"hf_secret_token_123" not in content for content in FakeHub.files.values())
    # The pushed adapter names its base by Hub id or the path it was given, never llmft's cache.
    pushed_config = json.loads(FakeHub.files["adapter_config.json"])
    assert ".cache/llmft" not in pushed_config["base_model_name_or_path"]
    card = FakeHub.files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card
    # The recipe's gate (eval_loss) refuses a push that eval_results.json shows worse than the baseline.
    (pushed / "eval_results.json").write_text(json.dumps({"results": {"eval_loss": 3.0}, "baseline": {"eval_loss": 2.0}}))
    result = subprocess.run([LLMFT, "push", str(pushed), "--repo-id", "org/tiny"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "regression gate" in result.stderr and "eval_loss: 3.0000 vs baseline 2.0000" in result.stderr


def test_training_pushes_at_the_end_when_the_recipe_says_so(tmp_path, tiny_model_dir, fake_hub, quiet_env):
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, tmp_path / "run",
                          training={"max_steps": 40, "learning_rate": 3e-2},
                          hub={"push": True, "repo_id": "org/from-training", "gate_metrics": ["eval_loss"]})
    env = {**quiet_env, "HF_ENDPOINT": fake_hub, "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([LLMFT, "train", str(recipe)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pushed to org/from-training" in result.stdout
    assert "adapter_model.safetensors" in FakeHub.files and "README.md" in FakeHub.files


def test_push_never_sends_a_pickle_unless_asked(run, tmp_path, fake_hub, quiet_env):
    """A run holds training_args.bin (the Trainer's pickle); a merged folder may hold .bin weights. Neither is
    uploaded unless --allow-pickles asks for the merged folder's."""
    assert (run / "training_args.bin").exists()
    merged = merge(run, tmp_path / "merged")
    (merged / "pytorch_model.bin").write_bytes(b"not really weights")
    env = {**quiet_env, "HF_ENDPOINT": fake_hub, "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "0"}
    for extra, expected in (([], False), (["--allow-pickles"], True)):
        FakeHub.files.clear()
        result = subprocess.run([LLMFT, "push", str(run), "--repo-id", "org/tiny", "--gate", "--merged", str(merged),
                                 *extra], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("pytorch_model.bin" in FakeHub.files) is expected
        assert "training_args.bin" not in FakeHub.files and "model.safetensors" in FakeHub.files
        assert "library_name: transformers" in FakeHub.files["README.md"].decode()


def test_push_of_a_full_fine_tune_sends_its_weights_and_follows_hub_private(tmp_path, tiny_model_dir, fake_hub,
                                                                            quiet_env):
    """A full run holds no adapter: its safetensors weights and config go up, with a card that loads them with
    transformers. The recipe's hub.private decides the repository's visibility unless --public says otherwise."""
    from huggingface_hub import ModelCard

    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    out = tmp_path / "run"
    train(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out, peft={"method": "full"},
                                   training={"max_steps": 40, "learning_rate": 3e-3}, hub={"private": False})))
    env = {**quiet_env, "HF_ENDPOINT": fake_hub, "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "0"}
    for extra, visibility in (([], "public"), (["--public", "false"], "private"), (["--public"], "public")):
        FakeHub.files.clear()
        result = subprocess.run([LLMFT, "push", str(out), "--repo-id", "org/full", "--gate", *extra],
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert FakeHub.created[-1]["visibility"] == visibility, (extra, FakeHub.created[-1])
    assert FakeHub.files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert {"config.json", "generation_config.json", "tokenizer.json", "run.json"} <= set(FakeHub.files)
    assert "adapter_config.json" not in FakeHub.files and "training_args.bin" not in FakeHub.files
    card = ModelCard(FakeHub.files["README.md"].decode())
    assert card.data.library_name == "transformers" and "AutoModelForCausalLM.from_pretrained" in card.text


def _gguf_folder(run, folder, template=None):
    """A folder as llmft export leaves it, its GGUF written by the gguf library with the run's metadata (llama.cpp's
    converter refuses the tests' tiny tokenizer; the real export is pushed in tests/test_export.py)."""
    import gguf

    from llmft.config import ModelConfig
    from llmft.export import write_modelfile
    from llmft.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(run)))
    folder.mkdir()
    path = folder / "run-q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_chat_template(template or tokenizer.chat_template)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    write_modelfile(path, run)
    return folder


def test_push_gguf_sends_the_files_and_modelfile_with_a_card_that_says_so(run, tmp_path, fake_hub, quiet_env):
    from huggingface_hub import ModelCard

    folder = _gguf_folder(run, tmp_path / "gguf")
    env = {**quiet_env, "HF_ENDPOINT": fake_hub, "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([LLMFT, "push", str(run), "--repo-id", "org/tiny-gguf", "--gate", "--gguf", str(folder)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert FakeHub.files["run-q8_0.gguf"] == (folder / "run-q8_0.gguf").read_bytes()
    assert FakeHub.files["Modelfile"] == (folder / "Modelfile").read_bytes()
    assert "run.json" in FakeHub.files and "recipe.yaml" in FakeHub.files
    assert "adapter_model.safetensors" not in FakeHub.files and "training_args.bin" not in FakeHub.files
    card = ModelCard(FakeHub.files["README.md"].decode())
    assert card.data.library_name == "gguf" and {"gguf", "llama.cpp", "ollama"} <= set(card.data.tags)
    assert "| `run-q8_0.gguf` | Q8_0 |" in card.text and "ollama create NAME -f Modelfile" in card.text


def test_check_gguf_catches_a_file_without_the_trained_template_or_stop(run, tmp_path):
    folder = _gguf_folder(run, tmp_path / "gguf")
    assert check(run, gguf=folder)["files"] == {"run-q8_0.gguf": "Q8_0"}
    other = _gguf_folder(run, tmp_path / "other", template="{{ messages[0]['content'] }}")
    modelfile = other / "Modelfile"
    modelfile.write_text(modelfile.read_text().replace("PARAMETER stop", "PARAMETER top_k"))
    with pytest.raises(HubError) as err:
        check(run, gguf=other)
    assert "run-q8_0.gguf: its chat template differs" in str(err.value) and "PARAMETER stop" in str(err.value)
    (other / "broken.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(HubError, match="broken.gguf: not a readable GGUF file"):
        check(run, gguf=other)
    with pytest.raises(HubError, match="no .gguf file"):
        check(run, gguf=tmp_path)


def test_cards_name_the_library_of_each_artifact(run, tmp_path):
    from huggingface_hub import ModelCard

    adapter = ModelCard(model_card(run, "org/a"))
    merged = ModelCard(model_card(run, "org/m", merged=tmp_path))
    assert adapter.data.library_name == "peft" and "AutoPeftModelForCausalLM" in adapter.text
    assert merged.data.library_name == "transformers" and "merged" in merged.data.tags
    assert "transformers alone loads it" in merged.text
