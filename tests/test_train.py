"""Training end to end on a tiny random model: weights change, the run directory holds what a user needs."""

import json
import logging
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llmft.config import load_recipe
from llmft.run_dir import missing_files, read_run
from llmft.train import train
from tests.conftest import LLMFT
from tests.helpers import chat_rows, make_tiny_mixtral_dir, make_tiny_model_dir, write_jsonl, write_recipe


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_rows(10))


def _assert_complete(out):
    assert missing_files(out) == []
    run = read_run(out)
    versions = run.info.versions
    assert versions["torch"] and versions["transformers"] and versions["trl"]
    assert run.info.data["train"].sha256 and run.info.stage == "sft"
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert (out / "loss_curve.png").exists()
    # The run's recipe is itself a valid recipe, and reads back as the dataclasses.
    assert load_recipe(out / "recipe.yaml").peft.method == run.recipe.peft.method
    return run


def test_lora_trains_every_adapter_tensor_and_writes_the_run_dir(tmp_path, tiny_model_dir, train_file):
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out))
    train(recipe)
    run = _assert_complete(out)
    checks = run.info.trainable_tensors
    assert checks["total"] > 0 and checks["changed"] == checks["total"], checks
    # Independently of our callback: peft starts every lora_B at zero, so a trained adapter has none left at zero.
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert run.metrics.after["eval_loss"] < run.metrics.before["eval_loss"]
    assert run.info.data["train"].tokenized["rows_in"] == 8  # 10 rows less the 20% eval split
    assert len(run.eval_rows()) == 2  # the held-out rows themselves, saved in the run directory


def test_loss_regression_on_the_tiny_model(tmp_path, tiny_model_dir, train_file):
    """Pinned losses: a change in masking, data order, optimiser or defaults shows up here first."""
    out = tmp_path / "run"
    train(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out), ["--max_steps", "4"]))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [round(h["loss"], 3) for h in history if "loss" in h]
    assert losses == pytest.approx(EXPECTED_LOSSES, abs=2e-3)


# seed 42, lr 1e-2, batch 2 as CPU micro-batches of 1, 4 steps. (Padded batches of 2 give other losses: the LoRA
# dropout masks are drawn per micro-batch; without dropout both agree, see the test below.)
EXPECTED_LOSSES = [5.969, 5.902, 5.849, 5.789]


class PassRecorder(TrainerCallback):
    """The rows of every training forward pass: (batch, length, whether position ids came with it)."""

    def __init__(self):
        self.passes: list[tuple[int, int, bool]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(module, args_, kwargs_):
            if module.training:
                ids = kwargs_["input_ids"]
                self.passes.append((ids.shape[0], ids.shape[1], kwargs_.get("position_ids") is not None))

        model.register_forward_pre_hook(record, with_kwargs=True)


def micro_vs_padded(tmp_path, model_dir, train_file, options, **training):
    """Train with CPU micro-batches (packed where they fit) and with padded batches, same recipe, under bf16
    autocast, no dropout, checking that each run trained its tensors. Returns, keyed "true"/"false": the Trainer's
    log history (one entry per step, then the summary), and the PassRecorder passes."""
    histories, passes = {}, {}
    for micro in ("true", "false"):
        out = tmp_path / micro
        recipe = write_recipe(tmp_path / f"{micro}.yaml", model_dir, train_file, out, training=training)
        recorder = PassRecorder()
        train(load_recipe(recipe, ["--cpu_micro_batches", micro, "--lora_dropout", "0", "--dtype", "float32",
                                   "--bf16", "true", *options]), callbacks=[recorder])
        histories[micro] = json.loads((out / "trainer_state.json").read_text())["log_history"]
        passes[micro] = recorder.passes
        assert read_run(out).info.trainable_tensors["changed"] > 0
    return histories, passes


def logged(histories: dict, key: str) -> dict:
    return {micro: [h[key] for h in history if key in h] for micro, history in histories.items()}


@pytest.mark.parametrize("max_length", [512, 100])
def test_cpu_micro_batches_train_exactly_like_padded_batches(tmp_path, tiny_model_dir, train_file, max_length):
    """A step's examples run in passes of their own, short ones packed into one row up to max_length tokens
    (under bf16 autocast, where llmft's attention takes packed rows), accumulated: the same optimisation as the
    padded batch (token-weighted loss), up to bf16's different orders of summation."""
    histories, passes = micro_vs_padded(tmp_path, tiny_model_dir, train_file,
                                        ["--max_steps", "4", "--max_length", str(max_length)])
    losses = logged(histories, "loss")
    assert losses["true"] == pytest.approx(losses["false"], rel=2e-4)
    assert len(losses["true"]) == 4
    for key in ("entropy", "mean_token_accuracy"):  # one mean over each step's label tokens, as the padded batch's
        assert logged(histories, key)["true"] == pytest.approx(logged(histories, key)["false"], rel=1e-3, abs=1e-4)
    assert all(batch == 2 for batch, _, _ in passes["false"]) and len(passes["false"]) == 4
    assert all(batch == 1 for batch, _, _ in passes["true"])
    if max_length == 512:  # both examples of every step in one packed row
        assert len(passes["true"]) == 4 and all(packed for _, _, packed in passes["true"])
    else:  # examples of 84-85 tokens: two do not fit in 100, so each runs alone
        assert len(passes["true"]) == 8 and not any(packed for _, _, packed in passes["true"])


def test_packed_micro_batches_keep_an_epochs_short_last_step(tmp_path, tiny_model_dir, train_file):
    """8 examples in steps of 3: the last step has 2. Its examples still run (packed), none is left waiting, and the
    losses match the padded batches'."""
    histories, passes = micro_vs_padded(tmp_path, tiny_model_dir, train_file, ["--max_length", "512"],
                                        max_steps=-1, num_train_epochs=1, per_device_train_batch_size=3)
    losses = logged(histories, "loss")
    assert [batch for batch, _, _ in passes["false"]] == [3, 3, 2]
    assert len(passes["true"]) == 3
    assert all(batch == 1 and packed for batch, _, packed in passes["true"])
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=2e-4)


def test_packed_micro_batches_on_a_mixture_of_experts(tmp_path, train_file):
    """A tiny Mixtral whose router loss TRL adds: a step's examples still pack into one row (routing is per token, so
    the probe finds them apart), and the losses, router loss included, match the padded batches'. TRL adds each
    pass's router loss divided by the step's pass count (a mean over the step's passes), which packing sets to the
    packed passes: here each step is one packed row, over the same tokens as the one padded batch."""
    histories, passes = micro_vs_padded(tmp_path, make_tiny_mixtral_dir(tmp_path / "mixtral"), train_file,
                                        ["--max_steps", "3", "--max_length", "512"])
    losses, router = logged(histories, "loss"), logged(histories, "aux_loss")
    assert len(passes["true"]) == 3
    assert all(batch == 1 and packed for batch, _, packed in passes["true"])
    assert len(router["true"]) == 3 and min(router["true"]) > 1  # x 0.02: ~0.04 of a ~6.0 loss
    assert len(losses["true"]) == 3
    # Measured apart by ~3e-5 relative (bf16 sums in another order); the router loss counted over the step's
    # 2 micro-batches instead of its 1 pass would halve its share: 0.02 of ~6, 3e-3 relative.
    assert losses["true"] == pytest.approx(losses["false"], rel=5e-4)


def test_full_fine_tuning_changes_every_weight_it_trains(tmp_path, tiny_model_dir, train_file):
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                                      peft={"method": "full"}), ["--learning_rate", "1e-3"])
    train(recipe)
    run = _assert_complete(out)
    assert run.info.trainable_tensors["changed"] == run.info.trainable_tensors["total"]
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"weights not trained: {unchanged}"


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_full_fine_tuning_under_bf16_autocast_casts_each_weight_once_per_step(
        tmp_path, tiny_model_dir, train_file, caplog, checkpointing):
    """CPU full fine-tuning under bf16 autocast makes its weights' bf16 copies once per optimizer step
    (llmft.cpu_speed.bf16_weights_once_per_step; tests/test_cpu_speed.py compares its gradients with autocast's):
    every weight trains, with activations recomputed or kept, and the loss falls."""
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out, peft={"method": "full"}),
                         ["--learning_rate", "1e-3", "--bf16", "true", "--dtype", "float32",
                          "--activation_checkpointing", checkpointing])
    with caplog.at_level(logging.INFO, logger="llmft"):
        train(recipe)
    assert "bf16 weight copies made once per optimizer step" in caplog.text
    run = _assert_complete(out)
    assert run.info.trainable_tensors["changed"] == run.info.trainable_tensors["total"]
    assert run.metrics.after["eval_loss"] < run.metrics.before["eval_loss"]


def test_a_finished_run_is_not_overwritten(tmp_path, tiny_model_dir, train_file):
    out = tmp_path / "run"
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out, training={"max_steps": 1})
    train(load_recipe(recipe_path))
    result = subprocess.run([LLMFT, "train", str(recipe_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "already holds a finished run" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_commands_and_options():
    top = subprocess.run([LLMFT, "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "train RECIPE" in top.stdout
    sub = subprocess.run([LLMFT, "train", "--help"], capture_output=True, text=True)
    assert sub.returncode == 0
    for option in ("--name_or_path", "--train_data", "--method", "--learning_rate", "--num_generate", "--repo_id"):
        assert option in sub.stdout


def test_bad_recipe_and_bad_data_give_clear_errors_without_traceback(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, bad, tmp_path / "run")
    result = subprocess.run([LLMFT, "train", str(recipe_path), "--lerning_rate", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "Did you mean '--learning_rate'?" in result.stderr
    result = subprocess.run([LLMFT, "train", str(recipe_path), "--eval_fraction", "0"], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "bad.jsonl" in result.stderr and "row 1: messages: no assistant message" in result.stderr
    assert "Traceback" not in result.stderr


def test_bf16_frozen_base_with_autocast_tracks_fp32(tmp_path, tiny_model_dir, train_file):
    """The precision `dtype: auto` picks where bf16 is native: its losses stay close to fp32's."""
    losses = {}
    for name, overrides in (("fp32", ["--dtype", "float32", "--bf16", "false"]),
                            ("bf16", ["--dtype", "bfloat16", "--bf16", "true"])):
        out = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_model_dir, train_file, out)
        train(load_recipe(recipe, ["--max_steps", "4", *overrides]))
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses[name] = [h["loss"] for h in history if "loss" in h]
        adapter = load_file(out / "adapter_model.safetensors")
        assert all(v.dtype == torch.float32 for v in adapter.values()), "adapters stay fp32 on a bf16 base"
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_global_batch_size_derives_accumulation_or_names_the_sizes_that_fit(tmp_path, caplog):
    from llmft.config import TrainingConfig
    from llmft.errors import LaunchError
    from llmft.train import resolve_launch, trainer_args

    args = TrainingConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, global_batch_size=16)
    with caplog.at_level(logging.INFO, logger="llmft"):
        launch = resolve_launch(args)
    assert "Global batch 16 = 4 per device x 1 process(es) x 4 accumulation step(s)" in caplog.text
    # On CPUs each device batch then runs one example at a time: 16 single-example passes per step.
    assert (launch.per_device_train_batch_size, launch.gradient_accumulation_steps) == (1, 16)
    assert launch.global_batch_size == 16 and launch.cpu_micro_batches
    trainer = trainer_args(args, launch)
    assert (trainer.per_device_train_batch_size, trainer.gradient_accumulation_steps) == (1, 16)
    # The recipe's own settings are never changed.
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.global_batch_size) == (4, 1, 16)
    padded = TrainingConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4,
                            global_batch_size=16, cpu_micro_batches=False)
    launch = resolve_launch(padded)
    assert (launch.per_device_train_batch_size, launch.gradient_accumulation_steps) == (4, 4)
    odd = TrainingConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, global_batch_size=6)
    with pytest.raises(LaunchError, match="Per-device sizes that fit: 1, 2, 3, 6"):
        resolve_launch(odd)


def test_rerunning_the_resolved_recipe_derives_the_same_batch(tmp_path, tiny_model_dir, train_file):
    """recipe.yaml holds the batch settings as written, not the accumulation derived from them (global_batch_size
    plus a derived gradient_accumulation_steps would be refused as conflicting); run.json holds the derived ones."""
    out = tmp_path / "run"
    train(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out), ["--global_batch_size", "4"]))
    again = load_recipe(out / "recipe.yaml")
    assert (again.training.global_batch_size, again.training.per_device_train_batch_size,
            again.training.gradient_accumulation_steps) == (4, 2, 1)
    launch = read_run(out).info.launch
    assert (launch.per_device_train_batch_size, launch.gradient_accumulation_steps, launch.global_batch_size) == (1, 4, 4)


def test_training_never_changes_the_recipe(tmp_path, tiny_model_dir, train_file):
    """Derived values (accumulation, CPU micro-batches) live in run.json's launch record, not in the recipe."""
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, tmp_path / "run"),
                         ["--global_batch_size", "4", "--max_steps", "1"])
    before = recipe.to_dict()
    train(recipe)
    assert recipe.to_dict() == before


def test_low_memory_full_fine_tuning_with_8bit_adamw_and_checkpointing(tmp_path, train_file):
    """recipes/.../full/low_memory.yaml's settings: bitsandbytes' 8-bit AdamW (uint8 moments) on CPU, recomputed
    activations; every weight trains and the eval loss falls."""
    from transformers import TrainerCallback

    class OptimizerState(TrainerCallback):
        def on_train_end(self, args, state, control, optimizer=None, **kwargs):
            self.states = [(p.numel(), s["state1"].dtype) for p, s in optimizer.state.items() if "state1" in s]
            inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer  # accelerate wraps it
            self.name = f"{type(inner).__module__}.{type(inner).__name__}"

    # MLP matrices of 32 x 128 = 4096 elements: the smallest that bitsandbytes quantises.
    model_dir = make_tiny_model_dir(tmp_path / "model", intermediate=128)
    seen, out = OptimizerState(), tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model_dir, train_file, out, peft={"method": "full"}),
                         ["--learning_rate", "1e-3", "--optim", "adamw_bnb_8bit", "--activation_checkpointing", "true"])
    train(recipe, callbacks=[seen])
    run = _assert_complete(out)
    assert run.info.trainable_tensors["changed"] == run.info.trainable_tensors["total"]
    assert seen.name.startswith("bitsandbytes.optim"), seen.name
    # bitsandbytes keeps tensors under 4096 elements in fp32, and transformers keeps the embedding (12800 here)
    # in fp32 for stability; the MLP matrices must hold uint8 moments.
    mlp = {dtype for numel, dtype in seen.states if numel == 4096}
    assert mlp == {torch.uint8}, seen.states
    assert run.metrics.after["eval_loss"] < run.metrics.before["eval_loss"]


def test_bf16_full_fine_tuning_trains_with_kahan_summed_adamw(tmp_path, tiny_model_dir, train_file):
    """model.dtype bfloat16 with peft.method full: bf16 weights, gradients and moments, torch-optimi's AdamW with a
    Kahan compensation buffer per weight. The run directory holds bf16 weights; every tensor trains, the norms (1.0,
    where a bf16 step is 2^-7) with their updates still in the buffer; at this learning rate the eval loss lands
    where float32 weights put it."""
    from transformers import TrainerCallback

    class OptimizerState(TrainerCallback):
        def on_train_end(self, args, state, control, optimizer=None, **kwargs):
            inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer  # accelerate wraps it
            self.name = f"{type(inner).__module__}.{type(inner).__name__}"
            self.kahan = [getattr(s.get("kahan_comp"), "dtype", None) for s in inner.state.values()]

    runs = {}
    for dtype in ("bfloat16", "float32"):
        seen, out = OptimizerState(), tmp_path / dtype
        recipe = load_recipe(write_recipe(tmp_path / f"{dtype}.yaml", tiny_model_dir, train_file, out,
                                          peft={"method": "full"}), ["--learning_rate", "5e-4", "--dtype", dtype])
        train(recipe, callbacks=[seen])
        runs[dtype] = (_assert_complete(out), seen, load_file(out / "model.safetensors"))
    run, seen, after = runs["bfloat16"]
    checks = run.info.trainable_tensors
    assert seen.name == "optimi.adamw.AdamW"
    assert seen.kahan == [torch.bfloat16] * checks["total"]  # one bf16 compensation buffer per trained tensor
    assert {w.dtype for w in after.values()} == {torch.bfloat16}
    assert checks["changed"] == checks["total"] and checks["unchanged"] == []
    before = load_file(tiny_model_dir / "model.safetensors")
    not_moved = sorted(k for k in before if torch.equal(before[k].to(torch.bfloat16), after[k]))
    # The norms start at 1.0, where the next bf16 values are 1 - 2^-8 and 1 + 2^-7: three Adam steps of at most the
    # learning rate (5e-4, decaying) add up to less than half of either gap (1.95e-3).
    assert not_moved and all(k.endswith("norm.weight") for k in not_moved), not_moved
    assert not_moved == sorted(checks["below_bf16_step"])
    assert run.metrics.after["eval_loss"] < run.metrics.before["eval_loss"]
    fp32_run, fp32_seen, fp32_after = runs["float32"]
    assert fp32_seen.name.startswith("torch.optim") and {w.dtype for w in fp32_after.values()} == {torch.float32}
    assert run.metrics.after["eval_loss"] == pytest.approx(fp32_run.metrics.after["eval_loss"], rel=0.01)


def test_a_deepspeed_run_is_refused_where_a_killed_build_left_its_lock(tmp_path, tiny_model_dir, train_file,
                                                                      monkeypatch, capfd):
    """A lock left in a DeepSpeed op's build folder by a run killed mid-compile makes every later DeepSpeed run wait
    for ever at model loading, without a word; `llmft train` names the file instead. A fresh lock (another run
    compiling now) and runs without DeepSpeed are left alone."""
    import os
    import time

    from llmft.cli import run
    from llmft.errors import LaunchError
    from llmft.train import STALE_LOCK_S, check_build_locks

    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    check_build_locks("ds.json")  # being built right now: wait for it, as DeepSpeed does
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    check_build_locks(None)  # no DeepSpeed in this run: the lock is not its business
    with pytest.raises(LaunchError, match="delete the file"):
        check_build_locks("ds.json")

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --config_file deepspeed_*` sets
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, tmp_path / "run")
    code = run(["train", str(recipe)])
    text = "".join(capfd.readouterr())
    assert code != 0 and str(lock) in text and "Traceback" not in text, text


def test_no_baseline_eval_where_the_launch_cannot_evaluate_before_training():
    """transformers' evaluation before training fails under DeepSpeed, and under FSDP2, where accelerate shards a model
    only together with its optimizer; both launches need GPUs, so accelerate's own plugin objects stand in their
    state here."""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    from llmft.train import _before_training_blocker

    def trainer(deepspeed=None, fsdp=None):
        return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=deepspeed,
                                                                                   fsdp_plugin=fsdp)))

    assert _before_training_blocker(SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace()))) is None
    assert _before_training_blocker(trainer(fsdp=FullyShardedDataParallelPlugin(fsdp_version=1))) is None
    assert "under FSDP2" in _before_training_blocker(trainer(fsdp=FullyShardedDataParallelPlugin(fsdp_version=2)))
    assert "under DeepSpeed" in _before_training_blocker(trainer(deepspeed=DeepSpeedPlugin(zero_stage=2)))
