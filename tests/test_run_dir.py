"""The run directory is the only input of every later stage: moved elsewhere, with its data deleted, it still
evaluates, checks, merges and pushes, with the same numbers."""

import json
import shutil
import subprocess

import pytest
import yaml
from safetensors.torch import load_file

from llmft.cli import run as llmft
from llmft.config import Recipe, TrainingConfig, load_recipe
from llmft.run_dir import read_run
from llmft.train import train
from tests.conftest import LLMFT
from tests.helpers import FIRST_CHAR_METRIC, FakeHub, chat_rows, write_jsonl, write_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A tiny LoRA run with a held-out split, few-shot examples and its own answer extractor."""
    tmp = tmp_path_factory.mktemp("contract")
    data = tmp / "data"
    train_file = write_jsonl(data / "train.jsonl", chat_rows(12))
    metric = data / "first_char.py"  # a local evaluate metric: the run keeps a copy
    metric.write_text(FIRST_CHAR_METRIC)
    out = tmp / "first" / "run"
    # A high learning rate on short, regular answers: the tiny model learns to end its turn (llmft check). float32
    # on every CPU: the trainer evaluates under autocast and `llmft eval` without it, which bf16 would set apart.
    train(load_recipe(write_recipe(tmp / "r.yaml", tiny_model_dir, train_file, out, model={"dtype": "float32"},
                                   training={"max_steps": 40, "learning_rate": 3e-2, "bf16": False},
                                   eval={"num_generate": 2, "few_shot": 1, "max_new_tokens": 4,
                                         "answer_extractor": "last_number",
                                         "metrics": ["exact_match", f"evaluate:{metric}"]})))
    return out, data


def test_a_moved_run_without_its_data_evaluates_checks_merges_and_pushes_the_same(trained, tmp_path, fake_hub,
                                                                                 quiet_env):
    first = tmp_path / "first" / "run"
    shutil.copytree(trained[0], first)
    assert llmft(["eval", str(first), "--baseline", "base"]) == 0
    before = json.loads((first / "eval_results.json").read_text())
    assert llmft(["merge", str(first), "--out", str(tmp_path / "merged-before")]) == 0

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(first, moved)
    shutil.rmtree(first.parent)
    shutil.rmtree(trained[1])  # the training data is gone: nothing may need it now
    (moved / "eval_results.json").unlink()

    assert llmft(["eval", str(moved), "--baseline", "base"]) == 0
    after = json.loads((moved / "eval_results.json").read_text())
    assert after["results"] == pytest.approx(before["results"], rel=1e-6)
    assert "eval_first_char" in after["results"]  # the run's copy of the metric script, its original deleted
    assert after["baseline"] == pytest.approx(before["baseline"], rel=1e-6)
    assert after["samples"] == before["samples"] and len(after["samples"]) == 2
    # `llmft eval RUN` starts from the run's own eval settings.
    assert (after["settings"]["num_generate"], after["settings"]["few_shot"], after["settings"]["answer_extractor"]) \
        == (2, 1, "last_number")
    # The held-out loss equals training's final one: the same rows, tokenized the same way.
    assert after["results"]["eval_loss"] == pytest.approx(read_run(moved).metrics.after["eval_loss"], rel=1e-4)

    assert llmft(["check", str(moved)]) == 0
    assert llmft(["merge", str(moved), "--out", str(tmp_path / "merged-after")]) == 0
    merged = [load_file(tmp_path / name / "model.safetensors") for name in ("merged-before", "merged-after")]
    assert merged[0].keys() == merged[1].keys() and all(merged[0][k].equal(merged[1][k]) for k in merged[0])

    env = {**quiet_env, "HF_ENDPOINT": fake_hub, "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([LLMFT, "push", str(moved), "--repo-id", "org/moved"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    card = FakeHub.files["README.md"].decode()
    assert "eval_exact_match" in card and "(baseline)" in card  # the table comes from eval_results.json
    assert {"adapter_model.safetensors", "run.json", "loss_curve.png"} <= set(FakeHub.files)


def test_the_recipe_reads_back_as_dataclasses_even_where_its_settings_cannot_run(trained, tmp_path):
    """A run trained on a GPU with DeepSpeed and bf16 is still readable on a CPU machine without either."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    values = yaml.safe_load((copy / "recipe.yaml").read_text())
    values["training"].update(use_cpu=False, bf16=True, deepspeed="/nowhere/ds_zero3.json", not_a_key_any_more=1)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(values))
    run = read_run(copy)
    assert isinstance(run.recipe, Recipe) and isinstance(run.recipe.training, TrainingConfig)
    assert run.recipe.training.deepspeed == "/nowhere/ds_zero3.json" and run.recipe.training.bf16
    assert run.recipe.eval.few_shot == 1 and run.recipe.peft.method == "lora"
    assert run.info.launch.global_batch_size == 2 and run.info.stage == "sft"


def test_a_changed_eval_split_is_refused_with_the_fix(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    arrow = next((copy / "data" / "eval").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes() + b"\0")
    from llmft.errors import RunDirError

    with pytest.raises(RunDirError, match="changed since training.*--data FILE"):
        read_run(copy).eval_rows()


@pytest.mark.parametrize("damage, expected", [
    ("adapter_model.safetensors", "adapter_model.safetensors: not a whole safetensors file"),
    ("adapter_config.json", "adapter_config.json: not readable JSON"),
    ("trainer_state.json", "trainer_state.json: not readable JSON"),
    ("eval_samples.jsonl", "eval_samples.jsonl, line 2: not readable JSON"),
    ("run.json bytes", "run.json: not readable JSON ('utf-8' codec"),
    ("recipe.yaml", "recipe.yaml: expected a mapping of key: value, got list"),
])
def test_a_damaged_run_directory_is_named_file_by_file(trained, tmp_path, capfd, damage, expected):
    """A copy cut short or garbled is reported by file, with the fix, by the first stage that reads it."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    name = damage.split()[0]
    path = copy / name
    if name == "recipe.yaml":
        path.write_text("- model\n- data\n")
    elif damage.endswith("bytes"):
        path.write_bytes(path.read_bytes().replace(b'"stage"', b'"st\xe9ge"', 1))
    else:
        path.write_bytes(path.read_bytes()[:-20])  # cut short, as by a copy that did not finish
    capfd.readouterr()
    for command in (["report", str(copy)], ["merge", str(copy), "--out", str(tmp_path / "merged")]):
        code = llmft(command)
        out, err = capfd.readouterr()
        if name == "eval_samples.jsonl" and command[0] == "merge":  # merge does not read the samples
            assert code == 0, err
            continue
        assert code in (1, 2) and expected in err and "Traceback" not in err, (command, err)


def test_overwriting_a_finished_run_leaves_nothing_of_it(tmp_path, tiny_model_dir):
    """A LoRA run overwritten by a full fine-tune kept its adapter files, and merge, check and eval loaded them."""
    rows = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, rows, out, training={"max_steps": 1})
    train(load_recipe(recipe))
    (out / "eval_results.json").write_text("{}")  # as `llmft eval` leaves it
    assert (out / "adapter_model.safetensors").exists()
    train(load_recipe(recipe, ["--method", "full", "--overwrite_output_dir", "true"]))
    assert not (out / "adapter_model.safetensors").exists() and not (out / "eval_results.json").exists()
    assert not read_run(out).is_adapter and (out / "model.safetensors").exists()


def test_a_run_records_its_base_so_later_stages_find_it_from_any_folder(tmp_path, tiny_model_dir, monkeypatch):
    """A relative base path was recorded as written, so merge and eval failed from another folder; a LoRA run on a
    LoRA run's directory failed `llmft check` (its adapter names the merged copy training loaded)."""
    shutil.copytree(tiny_model_dir, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    rows = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    first, second = tmp_path / "first", tmp_path / "second"
    train(load_recipe(write_recipe(tmp_path / "a.yaml", "./base", rows, first, training={"max_steps": 1})))
    assert read_run(first).info.base_model.resolved == str((tmp_path / "base").resolve())
    train(load_recipe(write_recipe(tmp_path / "b.yaml", str(first), rows, second, training={"max_steps": 1})))
    named = json.loads((second / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert read_run(second).info.base_model.resolved == named  # what `llmft check` compares
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert llmft(["merge", str(first), "--out", str(tmp_path / "merged")]) == 0


def test_run_json_names_the_built_datasets_test_split_as_the_eval_rows(tmp_path, tiny_model_dir):
    from llmft.dataset.build import BuildConfig, Source, build

    write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    build(BuildConfig(sources=[Source(path=str(tmp_path / "train.jsonl"))], out=str(tmp_path / "built"),
                      test_fraction=0.25, dedupe=False))
    out = train(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "built", tmp_path / "run",
                                         training={"max_steps": 1})))
    assert read_run(out).info.data["eval"].split == "test/ split of the built dataset"


def test_evaluating_during_training_needs_held_out_data(tmp_path, tiny_model_dir):
    from llmft.errors import ConfigError

    rows = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, rows, tmp_path / "run", data={"eval_fraction": 0},
                          training={"eval_strategy": "steps", "eval_steps": 1, "max_steps": 1})
    with pytest.raises(ConfigError, match="training.eval_strategy: steps evaluates during training, but there is no"):
        train(load_recipe(recipe))
