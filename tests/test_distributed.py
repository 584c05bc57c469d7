"""Real multi-process training on this CPU machine, launched the way users launch it."""

import json
import subprocess

import pytest

from tests.conftest import ACCELERATE
from tests.helpers import REPO, chat_rows, write_jsonl, write_recipe

pytestmark = pytest.mark.slow


def test_accelerate_cpu_ddp_config_runs_two_real_processes(tmp_path, tiny_model_dir, quiet_env):
    # 8 training rows, batch 2 per process, one epoch: one process would take 4 steps, two processes take 2.
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                          data={"eval_fraction": 0.0}, training={"max_steps": -1, "num_train_epochs": 1})
    result = subprocess.run(
        [ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
         "-m", "llmft", "train", str(recipe)],
        capture_output=True, text=True, env=quiet_env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    assert run["world_size"] == 2
    assert state["global_step"] == 2 and state["epoch"] == 1.0  # the data was split across both ranks
    assert run["trainable_tensors"]["changed"] == run["trainable_tensors"]["total"] > 0
    # Rank 0 alone wrote the run directory and printed the summary.
    assert result.stdout.count("llmft: run finished") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run", "train.jsonl"]


def test_accelerate_cpu_flag_with_two_processes_is_refused_not_run_as_one(tmp_path, tiny_model_dir, quiet_env):
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, tmp_path / "run")
    result = subprocess.run(
        [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "-m", "llmft", "train", str(recipe)],
        capture_output=True, text=True, env=quiet_env, timeout=300,
    )
    assert result.returncode != 0
    assert "started a single process" in result.stderr and "accelerate_configs/cpu_ddp.yaml" in result.stderr
    assert not (tmp_path / "run" / "run.json").exists()
