"""training.report_to: TensorBoard, MLflow and Trackio record offline into local folders, and llmft's own metrics
(generation metrics, the forgetting check, tokens/s, memory) reach them beside the Trainer's loss. Each tracker's
scalars are read back with that tracker's own reader."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import LLMFT
from tests.helpers import chat_rows, write_jsonl, write_recipe

pytest.importorskip("tensorboard", reason="the tracking extra is not installed (pip install -e .[tracking])")
pytest.importorskip("mlflow", reason="the tracking extra is not installed (pip install -e .[tracking])")
pytest.importorskip("trackio", reason="the tracking extra is not installed (pip install -e .[tracking])")

# Runs in a child process with the same environment: Trackio reads TRACKIO_DIR when it is imported.
READ_BACK = r"""
import glob, json, sys
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trackio.sqlite_storage import SQLiteStorage

out = {}
events = EventAccumulator(glob.glob(sys.argv[1] + "/runs/*")[0]); events.Reload()
out["tensorboard"] = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
client = MlflowClient()
runs = client.search_runs([client.get_experiment_by_name("llmft-test").experiment_id])
out["mlflow_runs"] = len(runs)
run = runs[0]
out["mlflow"] = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                 for key in run.data.metrics}
project = SQLiteStorage.get_projects()[0]
out["trackio_runs"] = len(SQLiteStorage.get_runs(project))
logs = SQLiteStorage.get_logs(project, SQLiteStorage.get_runs(project)[0])
out["trackio"] = {key: [(row["step"], row[key]) for row in logs if key in row]
                  for key in {k for row in logs for k in row} - {"step", "timestamp"}}
print(json.dumps(out))
"""


def test_trackers_record_offline_and_read_back(tmp_path, tiny_model_dir):
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                          training={"max_steps": 4, "report_to": ["tensorboard", "mlflow", "trackio"],
                                    "eval_strategy": "steps", "eval_steps": 2, "logging_steps": 1},
                          eval={"num_generate": 2, "max_new_tokens": 3, "forgetting_check": True})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_EXPERIMENT_NAME": "llmft-test", "TRACKIO_DIR": str(tmp_path / "trackio"),
           "HF_HUB_OFFLINE": "1", "DISABLE_MLFLOW_INTEGRATION": "FALSE"}
    result = subprocess.run([LLMFT, "train", str(recipe)], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tok/s" in result.stderr and "ETA" in result.stderr and " GB" in result.stderr  # the progress line
    read = subprocess.run([sys.executable, "-c", READ_BACK, str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    logged = json.loads(read.stdout.strip().splitlines()[-1])
    assert logged.pop("mlflow_runs") == logged.pop("trackio_runs") == 1  # one llmft run, one tracker run
    names = {  # each tracker's name for the same values: TensorBoard splits train/ and eval/ itself
        "tensorboard": ("train/loss", "train/tokens_per_second", "train/memory_gb", "eval/loss", "eval/exact_match",
                        "eval/general_ppl", "eval/forgetting_ppl_ratio"),
        "mlflow": ("loss", "tokens_per_second", "memory_gb", "eval_loss", "eval_exact_match", "eval_general_ppl",
                   "eval_forgetting_ppl_ratio"),
        "trackio": ("train/loss", "train/tokens_per_second", "train/memory_gb", "eval/loss", "eval/exact_match",
                    "eval/general_ppl", "eval/forgetting_ppl_ratio"),
    }
    state = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [(h["step"], h["loss"]) for h in state if "loss" in h]
    for tracker, keys in names.items():
        scalars = logged[tracker]
        missing = [k for k in keys if k not in scalars]
        assert not missing, f"{tracker} lacks {missing}; it has {sorted(scalars)}"
        assert [round(v, 4) for _, v in scalars[keys[0]]] == [round(v, 4) for _, v in losses], tracker
        assert all(v > 0 for _, v in scalars[keys[1]]), tracker  # tokens/s
        assert len(scalars[keys[4]]) >= 2, tracker  # exact match at steps 2 and 4 (and the final evaluation)
