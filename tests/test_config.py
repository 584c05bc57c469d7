"""Recipes: precedence, strict keys with suggestions, every problem at once, and every shipped recipe valid."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from llmft.config import SECTIONS, TrainingConfig, load_recipe
from llmft.errors import ConfigError
from tests.helpers import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = """
data:
  train_data: train.jsonl
training:
  learning_rate: 1e-4
  max_steps: 10
"""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_is_valid_and_headed_by_its_command(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("llmft train" in first or "llmft compare" in first)
    assert str(path.relative_to(REPO)) in first
    assert not recipe.hub.push, "shipped recipes never push by default"


def test_at_least_one_recipe_ships():
    assert RECIPES


def test_precedence_is_cli_over_yaml_over_default(tmp_path):
    path = _recipe(tmp_path, BASE)
    recipe = load_recipe(path)
    assert recipe.training.learning_rate == 1e-4  # YAML's '1e-4' (a string to PyYAML) becomes a float
    assert recipe.training.max_steps == 10
    assert recipe.peft.r == 16  # default
    assert recipe.training.output_dir == "runs/r"  # default from the recipe's name
    recipe = load_recipe(path, ["--learning_rate", "3e-4", "--peft.r", "8", "--training.max_steps=4"])
    assert (recipe.training.learning_rate, recipe.peft.r, recipe.training.max_steps) == (3e-4, 8, 4)


def test_lists_and_booleans_from_yaml_and_cli(tmp_path):
    path = _recipe(tmp_path, BASE + "peft:\n  target_modules: [q_proj, v_proj]\n  use_dora: true\n")
    recipe = load_recipe(path)
    assert recipe.peft.target_modules == ["q_proj", "v_proj"] and recipe.peft.use_dora is True
    recipe = load_recipe(path, ["--target_modules", "all-linear", "--use_dora", "false"])
    assert recipe.peft.target_modules == ["all-linear"] and recipe.peft.use_dora is False


def test_unknown_keys_everywhere_are_reported_together_with_suggestions(tmp_path):
    path = _recipe(tmp_path, BASE + "peft:\n  learning_rate: 1\n  lora_alfa: 4\ntrainng:\n  seed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["--max_step", "3", "--peft.rank", "4"])
    problems = err.value.problems
    assert len(problems) == 5, problems
    text = str(err.value)
    assert "r.yaml" in text
    assert "unknown key 'peft.learning_rate'. It belongs in section 'training'" in text
    assert "unknown key 'peft.lora_alfa'. Did you mean 'lora_alpha'?" in text
    assert "unknown section 'trainng'. Did you mean 'training'?" in text
    assert "unknown option '--max_step'. Did you mean '--max_steps'?" in text
    assert "unknown option '--peft.rank'" in text


def test_bad_values_in_several_sections_are_reported_together(tmp_path):
    path = _recipe(tmp_path, BASE + "peft:\n  method: qlora\n  quant_bits: 3\nmodel:\n  dtype: float16\ndata:\n  overlong: cut\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "peft.quant_bits: 3 is not 4 or 8" in text
    assert "model.dtype: 'float16' is not one of auto, float32, bfloat16" in text
    # the data section replaced BASE's, so train_data is missing too
    assert "data.overlong: 'cut'" in text and "data.train_data is missing" in text


def test_bad_types_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match="--learning_rate.*invalid float value: 'fast'"):
        load_recipe(_recipe(tmp_path, BASE), ["--learning_rate", "fast"])


def test_fp16_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="fp16 is not supported; use bf16"):
        load_recipe(_recipe(tmp_path, BASE), ["--fp16", "true"])


def test_bf16_full_fine_tuning_is_refused_with_what_would_undo_it(tmp_path):
    """bf16 weights for full fine-tuning train with torch-optimi's Kahan-summed AdamW in place of the default AdamW.
    Another optimizer, weight decay (below a bf16 step), gradual unfreezing (per-group step counts) and DeepSpeed
    (its own float32 masters) would undo it: each is reported, all at once, with the way out."""
    from llmft.config import bf16_full_training

    full_bf16 = ["--method", "full", "--dtype", "bfloat16"]
    recipe = load_recipe(_recipe(tmp_path, BASE), full_bf16)
    assert bf16_full_training(recipe.model, recipe.peft)
    auto = load_recipe(_recipe(tmp_path, BASE), ["--method", "full"])
    assert not bf16_full_training(auto.model, auto.peft)  # auto keeps float32 weights for full fine-tuning
    with pytest.raises(ConfigError) as err:
        load_recipe(_recipe(tmp_path, BASE), full_bf16 + ["--optim", "adamw_bnb_8bit", "--weight_decay", "0.1",
                                                          "--unfreeze_every", "10"])
    text = str(err.value)
    assert "adamw_bnb_8bit has no Kahan summation" in text and "Remove training.optim" in text
    assert "training.weight_decay 0.1 would do nothing" in text and "tuning.unfreeze_every is not supported" in text


def test_bf16_full_fine_tuning_under_an_accelerate_deepspeed_launch_is_refused(tmp_path, monkeypatch):
    """`accelerate launch --config_file deepspeed_*.yaml` tells the process through its environment, not the recipe."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed and FSDP keep float32 master weights"):
        load_recipe(_recipe(tmp_path, BASE), ["--method", "full", "--dtype", "bfloat16"])


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_section_keys_never_collide():
    """Flat `--key value` overrides need each key in exactly one section."""
    seen = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in seen, f"'{f.name}' is in both {seen.get(f.name)} and {name}"
            seen[f.name] = name


def test_training_is_trl_sft_config():
    from trl import SFTConfig

    assert issubclass(TrainingConfig, SFTConfig)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, BASE), ["--r", "4"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(yaml.safe_dump(recipe.to_dict()))
    again = load_recipe(saved)
    assert again.to_dict() == {**recipe.to_dict(), "training": {**recipe.to_dict()["training"]}}


def test_trl_settings_that_accept_more_than_their_type_hints_still_load(tmp_path):
    """GRPO's scale_rewards is typed str but takes false (no scaling); fsdp is typed str but takes true: TRL checks
    those, so the recipe's type check leaves TRL's text fields to it (and checks llmft's own and every number)."""
    def recipe(training):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"train_data": "t.jsonl"},
                                        "training": training}))
        return path

    assert load_recipe(recipe({"stage": "grpo", "scale_rewards": False})).training.scale_rewards == "none"
    assert load_recipe(recipe({"num_train_epochs": 2, "gradient_checkpointing": True})).training.activation_checkpointing
    with pytest.raises(ConfigError, match="training.save_strategy: False is not a string. YAML reads an unquoted"):
        load_recipe(recipe({"save_strategy": False}))
    with pytest.raises(ConfigError, match="training.warmup_steps: 'many' is not"):
        load_recipe(recipe({"warmup_steps": "many"}))


def test_the_recipe_is_checked_against_the_stage_the_command_line_gives(tmp_path):
    """`--stage grpo` on an SFT recipe: its SFT-only keys are named (they were dropped silently), and GRPO keys in
    the file are accepted (they were called another stage's)."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"train_data": "t.jsonl"},
                                    "training": {"packing": True}}))
    with pytest.raises(ConfigError, match=r"unknown key 'training.packing'\. It is a setting of training.stage sft"):
        load_recipe(path, ["--stage", "grpo", "--num_generations", "2", "--rewards", "format"])
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"train_data": "t.jsonl"},
                                    "training": {"num_generations": 2, "rewards": ["format"]}}))
    assert load_recipe(path, ["--stage", "grpo"]).training.num_generations == 2


def test_several_trackers_on_the_command_line(tmp_path):
    """report_to takes one name or a list in YAML; the command line took one value only ('unexpected value')."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"train_data": "t.jsonl"}}))
    assert load_recipe(path, ["--report_to", "tensorboard", "mlflow"]).training.report_to == ["tensorboard", "mlflow"]
    assert load_recipe(path, ["--report-to", "tensorboard"]).training.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        load_recipe(path, ["--report_to", "mlflow", "tensorbord"])
