"""Interrupted runs: a SIGKILLed run resumes to exactly the uninterrupted result; SIGTERM saves and stops cleanly;
half-written checkpoints are never resumed from."""

import json
import logging
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from llmft.checkpoint import MARKER, resume_point
from llmft.config import load_recipe
from llmft.errors import CheckpointError
from llmft.train import train
from tests.conftest import LLMFT
from tests.helpers import REPO, chat_rows, write_jsonl, write_recipe

# Kills its own process (SIGKILL: no handler, no cleanup) at the end of optimizer step KILL_AT.
KILLER = """
import os, signal, sys
from transformers import TrainerCallback
from llmft.config import load_recipe
from llmft.train import train

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

train(load_recipe(sys.argv[1]), callbacks=[Kill()])
"""
KILL_AT = 5


def _recipe(tmp_path, model_dir, name, method):
    """8 optimizer steps of 2 micro-batches of 2 over 20 rows (crossing an epoch), a checkpoint every 2 steps."""
    rows = write_jsonl(tmp_path / "train.jsonl", chat_rows(20))
    training = {"max_steps": 8, "gradient_accumulation_steps": 2, "save_strategy": "steps", "save_steps": 2,
                "learning_rate": 1e-2 if method == "lora" else 1e-3}
    return write_recipe(tmp_path / f"{name}.yaml", model_dir, rows, tmp_path / name, peft={"method": method},
                        data={"eval_fraction": 0}, training=training)


def _history(out):
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: (h["loss"], h["grad_norm"]) for h in log if "loss" in h}


def _weights(out):
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(out / name)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_killed_mid_training_resumes_to_exactly_the_uninterrupted_result(tmp_path, tiny_model_dir, quiet_env,
                                                                              method):
    reference = _recipe(tmp_path, tiny_model_dir, "reference", method)
    train(load_recipe(reference))

    killed = _recipe(tmp_path, tiny_model_dir, "killed", method)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(killed), str(KILL_AT)], cwd=REPO, env=quiet_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    out = tmp_path / "killed"
    assert not (out / "run.json").exists()
    assert (out / "checkpoint-4" / MARKER).exists() and not (out / "checkpoint-6").exists()

    train(load_recipe(killed))  # resume_from_checkpoint: auto (the default)

    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"] == str(out / "checkpoint-4")
    expected, got = _history(tmp_path / "reference"), _history(out)
    assert sorted(got) == list(range(1, 9))
    for step in expected:  # same data order, dropout masks and optimizer state: same losses and gradient norms
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), f"step {step}"
    want, have = _weights(tmp_path / "reference"), _weights(out)
    assert want.keys() == have.keys()
    for name in want:
        assert (want[name] - have[name]).abs().max() < 1e-6, name


def _checkpoint(out, step, complete):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        (folder / MARKER).write_text("{}")
    return folder


def test_auto_resume_picks_the_latest_complete_checkpoint_never_a_half_written_one(tmp_path):
    out = tmp_path / "run"
    assert resume_point(out, "auto", overwrite=False) is None  # nothing there: a fresh start
    _checkpoint(out, 2, complete=True)
    good = _checkpoint(out, 10, complete=True)
    _checkpoint(out, 12, complete=False)  # killed while saving
    assert resume_point(out, "auto", overwrite=False) == str(good)
    assert resume_point(out, True, overwrite=False) == str(good)
    assert resume_point(out, "no", overwrite=False) is None
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resume_point(out, str(tmp_path / "elsewhere"), overwrite=False)
    # Starting over removes the old run's checkpoints, so a later `auto` cannot resume into them.
    assert resume_point(out, "auto", overwrite=True) is None
    assert not list(out.glob("checkpoint-*"))


def test_resuming_a_weights_only_checkpoint_says_it_will_not_be_exact(tmp_path, caplog):
    out = tmp_path / "run"
    weights_only = _checkpoint(out, 4, complete=True)  # training.save_only_model: no optimizer.pt
    with caplog.at_level(logging.WARNING, logger="llmft"):
        assert resume_point(out, "auto", overwrite=False) == str(weights_only)
    assert "holds the weights only" in caplog.text
    caplog.clear()
    (weights_only / "optimizer.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="llmft"):
        resume_point(out, "auto", overwrite=False)
    assert "weights only" not in caplog.text


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_exits_with_a_resume_hint(tmp_path, tiny_model_dir,
                                                                                   quiet_env):
    rows = write_jsonl(tmp_path / "train.jsonl", chat_rows(20))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, rows, out, data={"eval_fraction": 0},
                          training={"max_steps": 2000, "save_strategy": "no"})
    proc = subprocess.Popen([LLMFT, "train", str(recipe)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**quiet_env, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the Trainer prints a dict per logged step once training runs
        if "'loss'" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    saved = [p for p in out.glob("checkpoint-*") if (p / MARKER).exists()]
    assert len(saved) == 1, stderr[-2000:]
    step = int(saved[0].name.split("-")[1])
    assert 0 < step < 2000 and f"SIGTERM: stopped at step {step}" in stderr and "Resume with the same command" in stderr
    assert (saved[0] / "adapter_model.safetensors").exists() and (saved[0] / "optimizer.pt").exists()
    assert not (out / "run.json").exists()  # not a finished run

    # The same command resumes from it (fewer steps here, to finish quickly).
    done = subprocess.run([LLMFT, "train", str(recipe), "--max_steps", str(step + 2)], cwd=tmp_path,
                          capture_output=True, text=True, env=quiet_env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"] == str(saved[0]) and run["trainable_tensors"]["changed"] > 0


def test_resuming_unpickles_nothing(tmp_path, tiny_model_dir):
    """Checkpoints hold pickles (optimizer, RNG states): they load with torch.load(weights_only=True), which never
    runs pickle's class lookup. An audit hook counts every real unpickling of a class in the resumed run."""
    out = tmp_path / "run"
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(10))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                          training={"max_steps": 2, "save_strategy": "steps", "save_steps": 2})
    train(load_recipe(recipe))
    script = f"""
import sys
found = []
sys.addaudithook(lambda event, args: found.append(args) if event == "pickle.find_class" else None)
from llmft.cli import run
code = run(["train", {str(recipe)!r}, "--max_steps", "4", "--overwrite_output_dir", "false"])
print("RESULT", code, found)
"""
    (out / "run.json").unlink()  # a stopped run: resume_from_checkpoint auto picks checkpoint-2 up
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    last = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert last == ["RESULT 0 []"], done.stdout[-1000:] + done.stderr[-2000:]
    assert "Resuming from" in done.stderr
