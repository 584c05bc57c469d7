"""`llmft train RECIPE`: a recipe to a run directory, for every training stage (llmft.stages), top to bottom."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from transformers import TrainerCallback, set_seed

from llmft import report, run_dir, tuning
from llmft.checkpoint import CheckpointMarker, NonFiniteGuard, Preemption, resume_point
from llmft.config import Recipe, bf16_full_training, tracker_problems
from llmft.data import built_splits, load_splits
from llmft.errors import ConfigError, LaunchError, Preempted
from llmft.evaluation import (GenerationEvalCallback, PairEvalCallback, PerplexityCallback, eval_items,
                              held_out_pairs, load_metrics, samples)
from llmft.hardware import tune_allocator
from llmft.masking import masking_for
from llmft.model import load_model, load_tokenizer, restore_adapter_dtype, weights_dtype, weights_path
from llmft.progress import LiveProgress
from llmft.run_dir import BaseModelRecord, DataRecord, Launch, Metrics, RunInfo
from llmft.schema import MESSAGES, TEXT, file_fingerprint
from llmft.stages import STAGES

log = logging.getLogger(__name__)


def train(recipe: Recipe, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Run one recipe end to end; returns the run directory. `callbacks` are added to the Trainer's own."""
    started, stage = time.time(), STAGES[recipe.training.stage]
    tune_allocator()
    check_launch(recipe.training.world_size)
    check_build_locks(recipe.training.deepspeed)
    loaded_metrics = load_metrics(recipe.eval.metrics) if recipe.eval.num_generate else {}  # fail before loading
    trackers = tracker_problems(recipe.training.report_to, available=True)
    if trackers:
        raise ConfigError(trackers, source=recipe.source)
    launch = resolve_launch(recipe.training, stage.micro_batches)
    args = trainer_args(recipe.training, launch, stage.counts_tokens)  # a copy: the recipe is never changed
    out = Path(args.output_dir)
    run_dir.check_writable(out, args.overwrite_output_dir)
    with args.main_process_first(desc="finding a checkpoint"):  # rank 0 may remove an overwritten run's files
        if args.overwrite_output_dir:
            run_dir.clear_finished_run(out)
        resume = resume_point(out, args.resume_from_checkpoint, args.overwrite_output_dir)
    set_seed(args.seed)

    # Load the tokenizer and the data ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(recipe.model, args.trust_remote_code)
    how = masking_for(tokenizer)
    log.info("Loss masks for this chat template: %s", how.describe())
    data = recipe.data
    train_rows, eval_rows = load_splits(data.train_data, data.eval_data, data.eval_fraction, args.seed,
                                        data.max_train_examples, data.max_eval_examples)
    if eval_rows is None and args.eval_strategy != "no":
        raise ConfigError([f"training.eval_strategy: {args.eval_strategy.value} evaluates during training, but "
                           "there is no held-out data: set data.eval_fraction or data.eval_data, or eval_strategy: no."],
                          source=recipe.source)
    with args.main_process_first(desc="tokenizing"):
        train_ds, train_report = stage.prepare(train_rows, tokenizer, recipe, data.train_data)
        eval_ds, eval_report = (None, None) if eval_rows is None else stage.prepare(
            eval_rows, tokenizer, recipe, data.eval_data or data.train_data, split="eval")
    log.info(train_report.summary("train"))
    if eval_report:
        log.info(eval_report.summary("eval"))

    # Load the model ---------------------------------------------------------------------------------------------
    model = load_model(recipe.model, recipe.peft, args.trust_remote_code,
                       activation_checkpointing=bool(args.activation_checkpointing), head=stage.head)
    if stage.head == "sequence_classification":  # the score is read at the last token that is not padding
        model.config.pad_token_id = tokenizer.pad_token_id
    frozen = tuning.apply_freezing(model, recipe.tuning)
    if frozen:
        log.info("Frozen by tuning.freeze_*: %s", "; ".join(frozen))
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    quant = f" ({recipe.peft.quant_bits}-bit base)" if recipe.peft.method == "qlora" else ""
    log.info("Method %s%s: %s of %s parameters trainable (%.2f%%); weights %s, bf16 compute %s",
             recipe.peft.method, quant, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
             weights_dtype(recipe.model, recipe.peft), args.bf16)

    # Initialise the stage's trainer, with llmft's callbacks ------------------------------------------------------
    weight_check, preemption = WeightChangeCheck(), Preemption()
    progress = LiveProgress(train_report.tokens / max(1, train_report.examples) * launch.global_batch_size)
    guard = NonFiniteGuard(args.on_nonfinite, train_ds)
    shots = train_rows.select(range(min(recipe.eval.few_shot, len(train_rows)))) if recipe.eval.few_shot else None
    language_model = stage.head == "causal_lm"  # a reward model scores answers; it does not write any
    generates = language_model and stage.rows != TEXT  # raw text holds no question to answer
    evaluation = GenerationEvalCallback(tokenizer, eval_items(eval_rows, recipe.eval, shots) if generates else [],
                                        recipe.eval, out, loaded_metrics, recipe.data.reasoning,
                                        forgetting=language_model)
    callbacks = [progress, weight_check, evaluation, CheckpointMarker(), preemption, guard, *tuning_callbacks(model, recipe),
                 *([PerplexityCallback()] if stage.rows == TEXT else []),
                 *pair_callbacks(stage, eval_rows, tokenizer, recipe), *(callbacks or [])]
    if recipe.eval.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(recipe.eval.early_stopping_patience, recipe.eval.early_stopping_threshold))
    trainer = stage.trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                    processing_class=tokenizer, callbacks=callbacks)
    for callback in callbacks:
        if isinstance(callback, (GenerationEvalCallback, PairEvalCallback)):
            callback.trainer = trainer  # they log through it
    guard.attach(trainer)
    if trainer.is_deepspeed_enabled and trainer.is_world_process_zero():
        log.info("training.on_nonfinite does not apply under DeepSpeed: the engine holds the gradients and steps "
                 "itself, skipping steps that overflow (its log says OVERFLOW).")
    progress.attach(trainer)
    _pin_tensorboard_dir(trainer, out)
    end_tracker_runs = _defer_tracker_ends(trainer)
    check_sharding(trainer)
    tuning.check_launch(recipe.tuning, args.world_size, trainer.accelerator)
    restore_adapter_dtype(trainer.model, recipe.peft, weights_dtype(recipe.model, recipe.peft))
    if bf16_full_training(recipe.model, recipe.peft):
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:  # launched with a config the recipe cannot see
            raise LaunchError("model.dtype: bfloat16 with peft.method: full: DeepSpeed and FSDP keep float32 master "
                              "weights of their own; use model.dtype: auto.")
        trainer.optimizer_cls_and_kwargs = kahan_adamw(args)
    if args.use_cpu:
        bf16_attention = recipe.model.attn_implementation == "auto" and (
            args.bf16 or weights_dtype(recipe.model, recipe.peft) == torch.bfloat16)
        cpu_speed(trainer, stage.name, recipe.peft.method, bool(args.bf16), bf16_attention, launch.cpu_micro_batches)
    groups = None
    if recipe.tuning.custom_param_groups:  # the Trainer builds its optimizer over these instead of its two groups
        trainer.optimizer, groups = tuning.build_optimizer(trainer, recipe.tuning)
        if trainer.is_world_process_zero():
            tuning.log_groups(groups)
    else:
        tuning.check_optimizer(trainer)  # an optimizer whose package is missing: said now, not mid-launch

    # Evaluate before training: loss, and the generation metrics and forgetting check of the eval hook -----------
    metrics = Metrics()
    before_gen = None
    blocker = _before_training_blocker(trainer)
    if eval_ds is not None and recipe.eval.baseline:
        if blocker:
            log.info(f"Skipping the evaluation before training {blocker}. Compare afterwards with: "
                     "llmft eval RUN_DIR --baseline BASE_MODEL")
        else:
            metrics.before = trainer.evaluate()
            before_gen = evaluation.last
    if not blocker:
        evaluation.measure_base(trainer)  # before a resumed checkpoint's weights load (done by the evaluation above)

    # Train (from the latest complete checkpoint, when resuming) ----------------------------------------------------
    with cpu_step_levers(trainer):
        metrics.train = trainer.train(resume_from_checkpoint=resume).metrics
    if preemption.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
        end_tracker_runs()
        _end_process_group()
        raise Preempted(preemption.message(out, recipe.source), preemption.received)

    # Evaluate after training ------------------------------------------------------------------------------------
    if eval_ds is not None:
        metrics.after = trainer.evaluate()
    after_gen = evaluation.last
    end_tracker_runs()

    # Save the model, tokenizer and everything later stages need --------------------------------------------------
    trainer.save_model(str(out))
    save_adapter_fp32(trainer, out)
    if trainer.is_world_process_zero():
        trainer.save_state()
        eval_record = None
        if eval_rows is not None:
            saved, saved_sha = run_dir.save_rows(out, run_dir.EVAL_SPLIT, eval_rows)
            eval_record = DataRecord(**file_fingerprint(data.eval_data or data.train_data),
                                     tokenized=eval_report.to_dict(), saved=saved, saved_sha256=saved_sha,
                                     split=_eval_split(data))
        few_shot_record = None
        if shots is not None:
            saved, saved_sha = run_dir.save_rows(out, run_dir.FEW_SHOT_SPLIT, shots)
            few_shot_record = DataRecord(**file_fingerprint(data.train_data), saved=saved, saved_sha256=saved_sha,
                                         split=f"the first {len(shots)} training rows")
        run_dir.save_metric_scripts(out, recipe.eval.metrics)
        run_dir.save_manifest(out, data.train_data)
        info = RunInfo(
            stage=stage.name,
            base_model=BaseModelRecord(recipe.model.name_or_path, recipe.model.revision,
                                       weights_path(recipe.model.name_or_path), recipe.model.init),
            data={"train": DataRecord(**file_fingerprint(data.train_data), tokenized=train_report.to_dict()),
                  "eval": eval_record, "few_shot": few_shot_record,
                  **({"replay": DataRecord(**file_fingerprint(data.replay_data))} if data.replay_data else {})},
            launch=launch, chat_template_sha256=run_dir.template_hash(tokenizer.chat_template), masking=how.record(),
            end_of_turn_token=tokenizer.eos_token, trainable_parameters=trainable, total_parameters=total,
            trainable_tensors=weight_check.report, frozen=frozen, param_groups=groups, resumed_from=resume,
            skipped_nonfinite_steps=guard.skipped, seconds=round(time.time() - started, 1))
        run_dir.write_run(out, recipe, info, metrics)
        run_dir.write_loss_curve(out)
        run_dir.write_reward_curve(out)
        final = samples(evaluation.items, after_gen, before_gen) if after_gen else []
        if final:
            run_dir.write_jsonl(out / run_dir.SAMPLES_FILE, final)
        report.refresh(out)
        print(_summary(out, metrics, final, recipe.eval.show_samples))
        if recipe.hub.push:  # the main process alone pushes
            from llmft.hub import push

            print(f"Pushed to {recipe.hub.repo_id}: "
                  f"{push(out, recipe.hub.repo_id, recipe.hub.private, gate_metrics=recipe.hub.gate_metrics)}")
    _end_process_group()
    return out


def cpu_speed(trainer, stage: str, method: str, bf16: bool, bf16_attention: bool, micro_batches: bool) -> None:
    """llmft.cpu_speed's levers for a CPU run: the LM head on loss positions (SFT and pretraining, whose trainer asks
    TRL's fused head for log-probs), full fine-tuning's bf16 weight copies once per optimizer step (one process),
    LoRA adapters in bf16 under autocast, LoRA dropout drawing only the positions
    it drops, RMSNorm in PyTorch's fused kernel, bf16 attention as matmuls recomputed in the backward (bf16 runs
    with model.attn_implementation: auto), a step's short examples packed into one pass (SFT and pretraining with
    CPU micro-batches on that attention; the levers that live for the training loop: cpu_step_levers). With CPU
    micro-batches in SFT and pretraining, each step logs one entropy and token accuracy over all its label tokens."""
    from llmft import cpu_speed as levers

    model, done = trainer.model, []
    if stage in ("sft", "pretrain") and levers.loss_positions_head(model):
        done.append("LM head on loss positions")
    if method == "lora" and bf16 and levers.adapters_follow_autocast(model):
        done.append("bf16 adapter inputs under autocast")
    if method == "full" and bf16 and levers.one_process(trainer) and levers.bf16_weights_once_per_step(model):
        done.append("bf16 weight copies made once per optimizer step")
    if method in ("lora", "qlora") and levers.cheap_lora_dropout(model):
        done.append("cheap LoRA dropout")
    if levers.fused_rms_norms(model):
        done.append("fused RMSNorm")
    attention = bf16_attention and levers.recomputed_attention(model)
    if attention:
        done.append("bf16 matmul attention recomputed in the backward")
    if micro_batches and stage in ("sft", "pretrain"):  # the metrics a padded batch logs
        levers.token_means_per_step(trainer)
    # packed rows need a mask; llmft's attention keeps it cheap (measured there only)
    if (micro_batches and attention and stage in ("sft", "pretrain")
            and levers.packed_micro_batches(trainer, getattr(trainer.args, "max_length", None))):
        done.append("short examples of a step packed into one pass")
    if done:
        log.info("CPU speed: %s", ", ".join(done))


@contextlib.contextmanager
def cpu_step_levers(trainer):
    """The CPU lever that lives as long as the training loop: jemalloc's freed pages reused within each optimizer
    step (llmft.cpu_speed.freed_pages_kept_within_steps); at its end, full fine-tuning's bf16 weight copies go."""
    from llmft import cpu_speed as levers

    if not trainer.args.use_cpu:
        yield
        return
    try:
        with levers.freed_pages_kept_within_steps(trainer) as kept:
            if kept:
                log.info("CPU speed: jemalloc keeps freed pages within each step")
            yield
    finally:
        levers.drop_bf16_weight_copies(trainer.model)


def kahan_adamw(args) -> tuple[type, dict]:
    """torch-optimi's AdamW with the Trainer's AdamW settings, for bf16 weights (config.bf16_full_training): AdamW's
    update, summed into each weight with a bf16 compensation buffer, so that updates smaller than the weight's bf16
    rounding step add up instead of vanishing (optimi picks its foreach or Triton kernels)."""
    from optimi import AdamW

    log.info("Full fine-tuning in bf16 weights: AdamW with Kahan summation (torch-optimi)")
    return AdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                   "weight_decay": args.weight_decay, "kahan_sum": True}


def save_adapter_fp32(trainer, out: Path) -> None:
    """Under DeepSpeed an adapter trains in the compute dtype (ZeRO keeps one dtype for every parameter), with fp32
    master copies in the optimizer: write those, so the adapter is fp32 as in every other launch, instead of the
    bf16 copy the Trainer saved. Collective under ZeRO-3 (each rank holds a slice): every rank calls it."""
    if not (trainer.is_deepspeed_enabled and hasattr(trainer.model, "peft_config")):
        return
    from deepspeed.utils import safe_get_full_fp32_param
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    masters = {}
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            if full is not None:
                masters[name] = full.detach().float().cpu()
    if not trainer.is_world_process_zero() or not masters:
        return
    path = out / "adapter_model.safetensors"
    adapter = {k: v.contiguous() for k, v in get_peft_model_state_dict(trainer.model, state_dict=masters).items()}
    if adapter.keys() != load_file(path).keys():  # not what peft wrote: keep peft's file rather than guess
        log.warning("Kept the adapter as the Trainer saved it (%s): its fp32 master weights name other tensors.",
                    next(iter(load_file(path).values())).dtype)
        return
    save_file(adapter, str(path), metadata={"format": "pt"})


def pair_callbacks(stage, eval_rows, tokenizer, recipe: Recipe) -> list[TrainerCallback]:
    """The held-out pair metrics of a preference or reward run whose eval rows are pairs (see PairEvalCallback)."""
    if stage.rows == MESSAGES or eval_rows is None:
        return []
    pairs = held_out_pairs(eval_rows, tokenizer, recipe.training.max_length, recipe.data.overlong,
                           recipe.data.reasoning)
    return [] if pairs is None else [PairEvalCallback(pairs, reward_model=stage.head == "sequence_classification")]


def tuning_callbacks(model, recipe: Recipe) -> list[TrainerCallback]:
    """Gradual unfreezing and L2-SP, when the recipe asks for them (after the weight check: see GradualUnfreezing)."""
    found = []
    if recipe.tuning.gradual:
        found.append(tuning.GradualUnfreezing(model, recipe.tuning))
    if recipe.tuning.l2sp_alpha:
        found.append(tuning.L2SP(model, recipe.tuning.l2sp_alpha))
    return found


def _pin_tensorboard_dir(trainer, out: Path) -> None:
    """TensorBoard's folder fixed now: transformers picks it at train begin, so the evaluation before training
    would open a writer in ./runs of the working directory and the training curves would follow it there."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(out / default_logdir())


def _defer_tracker_ends(trainer):
    """MLflow and Trackio end their run when training ends, so the evaluation after training would open a second
    run: their end is held back until llmft's last evaluation (the returned call), one tracker run per llmft run."""
    from transformers.integrations import MLflowCallback
    from transformers.integrations.integration_utils import TrackioCallback

    ends = []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, (MLflowCallback, TrackioCallback)):
            ends.append(callback.on_train_end)
            callback.on_train_end = lambda *args, **kwargs: None

    def end() -> None:
        for on_train_end in ends:
            on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
        ends.clear()

    return end


def _eval_split(data) -> str:
    """Where the held-out rows came from, in load_splits' order."""
    if data.eval_data:
        return "eval_data"
    built = built_splits(data.train_data)
    return "test/ split of the built dataset" if built and built[1] is not None else f"eval_fraction {data.eval_fraction}"


def _before_training_blocker(trainer) -> str | None:
    """Why the model cannot be evaluated before training here (DeepSpeed, FSDP2), or None; `llmft eval` gives the
    baseline after."""
    state = trainer.accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        return ("under DeepSpeed: transformers refuses it with ZeRO-1/2, and with ZeRO-3 it leaves the engine "
                "unprepared for training")
    if getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None) == 2:
        return ("under FSDP2: transformers' evaluation would shard the model alone, which accelerate refuses "
                "(FSDP2 shards a model together with its optimizer)")
    return None


def _end_process_group() -> None:
    """Wait for rank 0's writing, then tear the process group down: left to interpreter exit, gloo's threads are
    destroyed while running and a rank can abort ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a rank of a multi-process launch without the interpreter's teardown.

    DDP keeps its gloo process group alive in C++ after destroy_process_group (nothing in Python holds it any more),
    so the group's worker threads outlive the run. One of them freeing a tensor while the interpreter is torn down
    takes the GIL and aborts the rank (SIGABRT, "terminate called without an active exception"); the launcher then
    reports the finished run as failed and stops the other ranks, possibly mid-write. What a normal exit does
    first still runs: waiting for non-daemon threads and executor jobs (uploads), then the exit handlers (logging,
    trackers); unreachable objects are collected, so files whose objects are gone are closed. Only the teardown
    that races those threads is skipped.
    """
    with contextlib.suppress(Exception):  # a private function of CPython's: joining threads is not worth a crash
        threading._shutdown()
    atexit._run_exitfuncs()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def check_launch(world_size: int) -> None:
    """Refuse the one silent trap of multi-process CPU launches.

    `accelerate launch --cpu --num_processes N`, and a config file with `distributed_type: MULTI_CPU`, start ONE
    process whatever N is (accelerate's simple launcher), so the user would get a single-process run while
    believing in N. The launcher's own command line (and the config file it names) is the only place N survives,
    so read it from the parent process.
    """
    if world_size > 1:
        return
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux: nothing to read, nothing to check
        return
    requested = 1
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        requested = _launcher_flag(parent, "num_processes", 1)
    config = _launcher_flag(parent, "config_file", None)
    if config is not None:
        requested = max(requested, _multi_cpu_processes(config))
    if requested > 1:
        raise LaunchError(
            f"accelerate launch asked for {requested} CPU processes (--cpu, or a MULTI_CPU config file) and started a "
            "single one (accelerate runs CPU jobs through its one-process launcher). For real multi-process training on CPUs use:\n"
            "  accelerate launch --config_file accelerate_configs/cpu_ddp.yaml -m llmft train RECIPE\n"
            f"  or: torchrun --nproc_per_node {requested} -m llmft train RECIPE"
        )


STALE_LOCK_S = 15 * 60  # DeepSpeed's JIT builds (shm_comm, cpu_adam) take a minute or two on a laptop


def check_build_locks(deepspeed_config: str | None, now: float | None = None) -> None:
    """Refuse a DeepSpeed run that would wait for ever on a build lock left by a killed run.

    DeepSpeed compiles its CPU ops (shm_comm, cpu_adam) on first use with torch.utils.cpp_extension, which holds a
    `lock` file in the op's build folder and makes every other process wait, silently and without end, while that
    file exists. A run killed mid-build leaves it behind, and every later DeepSpeed run then hangs at model
    loading. A lock older than STALE_LOCK_S is named with what to do.
    """
    if not deepspeed_config and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    now = time.time() if now is None else now
    stale = []
    for lock in _build_root().glob("*/lock"):
        with contextlib.suppress(OSError):  # released meanwhile: nothing to report
            if now - lock.stat().st_mtime > STALE_LOCK_S:
                stale.append(lock)
    if stale:
        raise LaunchError(
            "DeepSpeed would wait for ever on a build lock left by an interrupted build of its ops (a run killed while "
            f"compiling): {', '.join(map(str, stale))}. No build takes {STALE_LOCK_S // 60} minutes: delete the "
            "file(s) unless another run is compiling right now, then launch again."
        )


def _build_root() -> Path:
    """Where torch.utils.cpp_extension builds this interpreter's ops (its _get_build_directory, without creating
    anything): $TORCH_EXTENSIONS_DIR, or <cache>/torch_extensions/py<version>_<cpu|cuXYZ|rocmXYZ>."""
    from torch.utils.cpp_extension import get_default_build_root

    if (root := os.environ.get("TORCH_EXTENSIONS_DIR")) is not None:
        return Path(root)
    if torch.version.hip is not None:
        device = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        device = "cu" + torch.version.cuda.replace(".", "")
    else:
        device = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{device}"


def _launcher_flag(argv: list[str], name: str, default):
    """The value of --name (or --name-with-dashes) on a launcher's command line: an int where it is a number."""
    for i, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if flag in (f"--{name}", f"--{name.replace('_', '-')}"):
            value = value if equals else (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else value or default
    return default


def _multi_cpu_processes(config: str) -> int:
    """num_processes of an accelerate config file whose distributed_type is MULTI_CPU (the one-process route)."""
    import yaml

    try:
        values = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 1
    if not isinstance(values, dict) or values.get("distributed_type") != "MULTI_CPU":
        return 1
    processes = values.get("num_processes", 1)
    return processes if isinstance(processes, int) else 1


def check_sharding(trainer) -> None:
    """Refuse an FSDP launch that accelerate quietly turned into plain DDP (it does so on CPUs)."""
    from accelerate import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if asked and trainer.accelerator.distributed_type != DistributedType.FSDP:
        raise LaunchError(
            f"An FSDP config was launched, but accelerate set up {trainer.accelerator.distributed_type.value} instead "
            "(FSDP needs CUDA GPUs; on CPUs accelerate falls back to unsharded DDP without a word). On CPUs use "
            "accelerate_configs/cpu_ddp.yaml, or deepspeed_zero3.yaml to shard."
        )


def resolve_launch(args, micro_batches: bool = True) -> Launch:
    """The batch arithmetic of this launch: gradient accumulation from training.global_batch_size and the process
    count (when set), and on CPUs (training.cpu_micro_batches, where the stage allows: KTO's KL term needs whole
    batches) each device batch run one example per pass."""
    world, per_device, accumulation = args.world_size, args.per_device_train_batch_size, args.gradient_accumulation_steps
    per_step = per_device * world
    if args.global_batch_size is not None:
        if args.global_batch_size % per_step:
            fits = [b for b in range(1, args.global_batch_size + 1) if args.global_batch_size % (b * world) == 0]
            raise LaunchError(
                f"training.global_batch_size {args.global_batch_size} is not a multiple of per_device_train_batch_size "
                f"{per_device} x {world} process(es). Per-device sizes that fit: "
                f"{', '.join(map(str, fits)) or 'none: change global_batch_size'}."
            )
        accumulation = args.global_batch_size // per_step
    hint = "" if args.global_batch_size else " (set training.global_batch_size to keep it across process counts)"
    log.info("Global batch %d = %d per device x %d process(es) x %d accumulation step(s)%s",
             per_step * accumulation, per_device, world, accumulation, hint)
    micro = bool(micro_batches and args.use_cpu and args.cpu_micro_batches and not getattr(args, "packing", False)
                 and per_device > 1)
    if micro:
        # Padded batches cost the padding, and a padding mask sends attention to PyTorch's slow masked path; one
        # example per pass needs neither. The Trainer divides by the step's token count, so the loss is unchanged.
        log.info("CPU micro-batches: each device batch of %d runs as single examples, accumulated (short ones "
                 "packed into one pass where the model allows; training.cpu_micro_batches: false to turn off)",
                 per_device)
    return Launch(world_size=world, per_device_train_batch_size=1 if micro else per_device,
                  per_device_eval_batch_size=1 if micro else args.per_device_eval_batch_size,
                  gradient_accumulation_steps=accumulation * per_device if micro else accumulation,
                  global_batch_size=per_step * accumulation, cpu_micro_batches=micro)


def trainer_args(training, launch: Launch, counts_tokens: bool = False):
    """The Trainer's arguments: a copy of the recipe's training section with the launch's batch values (and the
    Trainer's count of the tokens trained on, for the progress line, the logs and the report, where it can count).

    A copy built anew (not the recipe's object changed), so TrainingArguments derives everything from these values
    again, DeepSpeed's "auto" batch sizes included.
    """
    return dataclasses.replace(
        training, global_batch_size=None, per_device_train_batch_size=launch.per_device_train_batch_size,
        per_device_eval_batch_size=launch.per_device_eval_batch_size,
        gradient_accumulation_steps=launch.gradient_accumulation_steps,
        include_num_input_tokens_seen="non_padding" if counts_tokens else training.include_num_input_tokens_seen)


class WeightChangeCheck(TrainerCallback):
    """Fingerprints every trainable tensor at the start and end of training and reports those that never changed.

    A run can finish with adapters that got no gradient at all (e.g. a 4-bit model that ran an eval forward
    first), which only shows as a warning deep in the logs. Two float64 numbers per tensor cost nothing.
    """

    def __init__(self):
        self.start: dict[str, tuple[float, float]] = {}
        self.report: dict[str, Any] = {}

    @staticmethod
    def _fingerprints(model) -> dict[str, tuple[float, float]]:
        prints = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                with torch.no_grad(), _whole(param) as whole:
                    prints[name] = (whole.double().sum().item(), whole.double().norm().item())
        return prints

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = self._fingerprints(model)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        end = self._fingerprints(model)
        same = {n for n, fp in end.items() if self.start.get(n) == fp}
        held = same & _held_by_kahan(model, optimizer)
        unchanged = sorted(same - held)
        self.report = {"total": len(end), "changed": len(end) - len(unchanged), "unchanged": unchanged[:20]}
        if held:  # trained: their updates add up in the compensation buffer until they reach a bf16 step
            self.report["below_bf16_step"] = sorted(held)[:20]
            log.info("%d of %d trainable tensors have moved less than their bf16 rounding step so far (first: %s); "
                     "their updates add up in AdamW's Kahan compensation buffer.", len(held), len(end), min(held))
        if unchanged and state.global_step > 0:
            log.warning("%d of %d trainable tensors did not change in training (first: %s): no gradient reached "
                        "them, or the run was too short (LoRA A matrices first move on the step after B does).",
                        len(unchanged), len(end), unchanged[0])


def _held_by_kahan(model, optimizer) -> set[str]:
    """Tensors with updates waiting in a Kahan compensation buffer (bf16 full fine-tuning, `kahan_adamw`)."""
    state = getattr(getattr(optimizer, "optimizer", optimizer), "state", {})  # accelerate wraps the optimizer
    held = set()
    for name, param in model.named_parameters():
        comp = state[param].get("kahan_comp") if param in state else None
        if isinstance(comp, torch.Tensor) and comp.shape == param.shape and bool(comp.any()):
            held.add(name)
    return held


def _numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away from this process (numel() is 0 then)."""
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


@contextlib.contextmanager
def _whole(param: torch.Tensor):
    """The whole tensor of a parameter sharded by ZeRO-3 (gathered one at a time) or FSDP2 (a DTensor)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield param.data
    else:
        yield param.full_tensor() if hasattr(param, "full_tensor") else param


def _summary(out: Path, metrics: Metrics, records: list[dict[str, Any]], show: int) -> str:
    lines = ["", "=" * 72, "llmft: run finished", ""]
    rows = [("eval loss", "eval_loss", "{:.4f}"), ("perplexity", "eval_perplexity", "{:.2f}"), ("exact match", "eval_exact_match", "{:.1%}"),
            ("  strict", "eval_exact_match_strict", "{:.1%}"), ("  flexible", "eval_exact_match_flexible", "{:.1%}"),
            ("ROUGE-L", "eval_rouge_l", "{:.3f}"), ("BLEU", "eval_bleu", "{:.1f}"), ("chrF", "eval_chrf", "{:.1f}"),
            ("forgetting", "eval_forgetting_ppl_ratio", "{:.3f}x"),
            ("pair accuracy", "eval_pair_accuracy", "{:.1%}"), ("reward accuracy", "eval_reward_accuracy", "{:.1%}"),
            ("TRL rew. acc.", "eval_rewards/accuracies", "{:.1%}"), ("TRL rew. margin", "eval_rewards/margins", "{:.3f}"),
            ("reward", "eval_reward", "{:.3f}")]
    lines.append(f"{'':14}{'before':>12}{'after':>12}")
    for label, key, fmt in rows:
        values = [(evaluated or {}).get(key) for evaluated in (metrics.before, metrics.after)]
        if key.startswith("eval_rewards/"):  # DPO's implicit rewards: undefined while the model is its reference
            values[0] = None
        if any(v is not None for v in values):
            cells = "".join(f"{fmt.format(v) if v is not None else '-':>12}" for v in values)
            lines.append(f"{label:14}{cells}")
    for sample in records[:show]:
        lines += ["", f"Q: {_one_line(sample['prompt'])}", f"   reference: {_one_line(sample['reference'])}"]
        if "baseline_answer" in sample:
            lines.append(f"   before:    {_one_line(sample['baseline_answer'])}")
        lines.append(f"   after:     {_one_line(sample['answer'])}")
    lines += ["", f"Run directory: {out}", "=" * 72]
    return "\n".join(lines)


def _one_line(text: str, width: int = 100) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"
