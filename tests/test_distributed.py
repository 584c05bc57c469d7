"""Real multi-process training on CPUs (gloo), launched the way users launch it."""

import contextlib
import json
import os
import signal
import subprocess

import pytest

from tests.conftest import ACCELERATE
from tests.helpers import REPO, chat_rows, write_jsonl, write_recipe

pytestmark = pytest.mark.slow


def _run(command: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """subprocess.run for a launcher, which on a timeout is stopped as a user stops it (SIGTERM: torch's launcher
    stops its ranks, each in a session of its own, and kills those that linger) before anything left in its group is
    killed, so a hung launch leaves no ranks behind holding the cores or the rendezvous port; the failure shows the
    launch's last output."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                _, stderr = proc.communicate(timeout=90)
            finally:
                with contextlib.suppress(ProcessLookupError):  # nothing left in the group
                    os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the launch ran past {timeout} s; its last output:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_accelerate_cpu_ddp_config_runs_two_real_processes(tmp_path, tiny_model_dir, quiet_env):
    # 8 training rows, batch 2 per process, one epoch: one process would take 4 steps, two processes take 2.
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                          data={"eval_fraction": 0.0}, training={"max_steps": -1, "num_train_epochs": 1})
    result = _run([ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
                   "-m", "llmft", "train", str(recipe)], quiet_env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    assert run["launch"]["world_size"] == 2
    assert state["global_step"] == 2 and state["epoch"] == 1.0  # the data was split across both ranks
    assert run["trainable_tensors"]["changed"] == run["trainable_tensors"]["total"] > 0
    # Rank 0 alone wrote the run directory and printed the summary.
    assert result.stdout.count("llmft: run finished") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run", "train.jsonl"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_node_config_trains_over_two_machines(tmp_path, tiny_model_dir, quiet_env):
    """accelerate_configs/multi_node.yaml as its header says to run it, once per machine with its --machine_rank:
    here two "machines" on one host, sharing a filesystem like cluster nodes do. The rendezvous, the split of the
    data over both and the one writer of the run directory (global rank 0, not each node's first process) are
    the real ones; what differs on a cluster is only the network in between."""
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                          data={"eval_fraction": 0.0}, training={"max_steps": -1, "num_train_epochs": 1})
    port = str(_free_port())
    logs = tmp_path.parent / f"{tmp_path.name}-logs"  # outside tmp_path, whose contents are checked below
    logs.mkdir()
    nodes = []
    for rank in (0, 1):  # output to files: two pipes read one after the other could fill and block a node
        with open(logs / f"{rank}.out", "w") as stdout, open(logs / f"{rank}.err", "w") as stderr:
            nodes.append(subprocess.Popen(
                [ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / "multi_node.yaml"),
                 "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                 "--num_processes", "2", "-m", "llmft", "train", str(recipe)],
                stdout=stdout, stderr=stderr, env={**quiet_env, "OMP_NUM_THREADS": "1"}))
    try:
        for node in nodes:
            node.wait(timeout=600)
    finally:
        for node in nodes:
            node.kill()
    results = [((logs / f"{r}.out").read_text(), (logs / f"{r}.err").read_text()) for r in (0, 1)]
    assert [node.returncode for node in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    run = json.loads((out / "run.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    assert run["launch"]["world_size"] == 2
    assert state["global_step"] == 2 and state["epoch"] == 1.0  # each machine trained on half the data
    assert run["trainable_tensors"]["changed"] == run["trainable_tensors"]["total"] > 0
    assert [stdout.count("llmft: run finished") for stdout, _ in results] == [1, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run", "train.jsonl"]


@pytest.mark.parametrize("launch", ["cpu_flag", "multi_cpu_config"])
def test_accelerate_cpu_launches_of_two_processes_are_refused_not_run_as_one(tmp_path, tiny_model_dir, quiet_env,
                                                                             launch):
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, tmp_path / "run")
    config = tmp_path / "multi_cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_machines: 1\n"
                      "machine_rank: 0\nnum_processes: 2\nmixed_precision: 'no'\nuse_cpu: true\n")
    how = ["--cpu", "--num_processes", "2"] if launch == "cpu_flag" else ["--config_file", str(config)]
    result = _run([ACCELERATE, "launch", *how, "-m", "llmft", "train", str(recipe)], quiet_env, timeout=300)
    assert result.returncode != 0, result.stderr[-2000:]
    assert "started a single one" in result.stderr and "accelerate_configs/cpu_ddp.yaml" in result.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def _launch(config, recipe, env, *extra):
    return _run([ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / config), "-m", "llmft",
                 "train", str(recipe), *extra], {**env, "OMP_NUM_THREADS": "1"}, timeout=600)


@pytest.mark.parametrize("config,method", [("deepspeed_zero2.yaml", "lora"), ("deepspeed_zero3.yaml", "lora"),
                                           ("deepspeed_zero3.yaml", "full"), ("deepspeed_zero3.yaml", "qlora")])
def test_deepspeed_runs_two_processes_and_saves_complete_weights(tmp_path, tiny_model_dir, quiet_env, config, method):
    """ZeRO over gloo on CPUs. Under ZeRO-3 each process holds a slice of every weight; what is saved must be
    the whole tensors (ZeRO-3 + LoRA saving empty adapters: trl #4416, peft #2892). QLoRA shards its 4-bit base
    because the packed weights are stored in the compute dtype, one dtype for every parameter; it runs in bf16 on
    every host here (the path `dtype: auto` takes where bf16 is native), and its adapter must still be saved in
    fp32, from DeepSpeed's fp32 master weights."""
    from safetensors.torch import load_file

    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out, peft={"method": method},
                          training={"learning_rate": 1e-3 if method == "full" else 1e-2, "global_batch_size": 8})
    result = _launch(config, recipe, quiet_env,
                     *(["--bf16", "true", "--dtype", "bfloat16"] if method == "qlora" else []))
    assert result.returncode == 0, result.stderr[-3000:]
    # 2 per device x 2 processes, so 2 accumulation steps keep the recipe's global batch of 8.
    assert "Global batch 8 = 2 per device x 2 process(es) x 2 accumulation step(s)" in result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["launch"]["world_size"] == 2
    assert run["trainable_tensors"]["changed"] == run["trainable_tensors"]["total"] > 0
    saved = load_file(out / ("model.safetensors" if method == "full" else "adapter_model.safetensors"))
    reference = load_file(tiny_model_dir / "model.safetensors")
    if method == "full":
        assert saved.keys() == reference.keys()
        assert all(saved[k].shape == reference[k].shape for k in saved)
    assert saved and all(t.numel() > 0 for t in saved.values())
    if method == "qlora":
        assert "Method qlora (4-bit base)" in result.stderr and "bf16 compute True" in result.stderr
    if method != "full":
        assert all(t.dtype == __import__("torch").float32 for t in saved.values())  # fp32 adapters
    # What was saved loads as a user would load it, without DeepSpeed, and gives finite logits.
    from llmft.model import load_run_model
    from llmft.run_dir import read_run

    model = load_run_model(read_run(out))
    ids = __import__("torch").tensor([[5, 6, 7, 8]])
    assert model(input_ids=ids).logits.isfinite().all()


def test_fsdp_on_cpus_is_refused_instead_of_running_as_plain_ddp(tmp_path, tiny_model_dir, quiet_env):
    """accelerate turns an FSDP config into unsharded DDP on CPUs without a word; llmft refuses it."""
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, tmp_path / "run")
    result = _launch("fsdp2_qlora.yaml", recipe, quiet_env)
    assert result.returncode != 0
    assert "FSDP needs CUDA GPUs" in result.stderr and "deepspeed_zero3.yaml" in result.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step_with_one_checkpoint(tmp_path, tiny_model_dir, quiet_env):
    """Slurm and Kubernetes signal the launcher; torchrun passes SIGTERM to each rank. The ranks must agree on the
    step to stop at, or the checkpoint would mix steps (or hang, under ZeRO/FSDP)."""
    import signal

    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out, data={"eval_fraction": 0},
                          training={"max_steps": 3000})
    command = [ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu_ddp.yaml"), "-m", "llmft",
               "train", str(recipe)]
    env = {**quiet_env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if "'loss'" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=300)
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "llmft_checkpoint.json").exists(), stderr[-3000:]
    assert (saved[0] / "rng_state_0.pth").exists() and (saved[0] / "rng_state_1.pth").exists()
    assert stderr.count("SIGTERM: stopped at step") == 1  # rank 0 speaks for both
    step = int(saved[0].name.split("-")[1])

    result = _launch("cpu_ddp.yaml", recipe, quiet_env, "--max_steps", str(step + 2))
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"] == str(saved[0]) and run["launch"]["world_size"] == 2
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == step + 2


def test_zero3_generation_metrics_run_on_every_rank_and_finish(tmp_path, tiny_model_dir, quiet_env):
    """Under ZeRO-3 a forward pass needs every rank (each holds a slice of every weight): generation on rank 0
    alone hung for good. Every rank now generates; the run must finish well inside the timeout."""
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                          training={"max_steps": 2, "global_batch_size": 4},
                          eval={"num_generate": 2, "max_new_tokens": 3, "forgetting_check": True})
    result = _run([ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml"),
                   "-m", "llmft", "train", str(recipe)], {**quiet_env, "OMP_NUM_THREADS": "1"},
                  timeout=300)  # a hang fails here (a run takes ~40 s), not in CI's global limit
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((out / "metrics.json").read_text())["after"]
    assert "eval_exact_match" in after and "eval_forgetting_ppl_ratio" in after
    assert (out / "eval_samples.jsonl").exists()


@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_dpo_lora_trains_over_two_processes_and_saves_a_complete_adapter(tmp_path, tiny_model_dir, quiet_env, config):
    """DPO under DDP and ZeRO-2/3: the reference is the model with its adapter disabled, in every process; the
    pair metrics run on every rank under ZeRO-3 (each holds a slice of every weight)."""
    from safetensors.torch import load_file

    from tests.helpers import pair_rows

    train_file = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out, data={"eval_fraction": 0.25},
                          training={"stage": "dpo", "learning_rate": 1e-2, "global_batch_size": 4, "max_steps": 2})
    result = _launch(config, recipe, quiet_env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "dpo" and run["launch"]["world_size"] == 2
    assert run["trainable_tensors"]["changed"] == run["trainable_tensors"]["total"] > 0
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(t.numel() > 0 for t in saved.values()) and not (out / "ref").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "eval_pair_accuracy" in metrics["after"] and "eval_rewards/accuracies" in metrics["after"]
