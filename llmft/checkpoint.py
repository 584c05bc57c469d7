"""Surviving interruptions: complete checkpoints only, automatic resume, clean stops on SIGTERM/SIGINT, and a guard
against non-finite losses and gradients.

A checkpoint counts as complete once every process has finished writing it and the main process has put a marker
file in it; resume never picks one without the marker, so a job killed halfway through a save resumes from the
checkpoint before.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from llmft.errors import CheckpointError, NonFiniteError

log = logging.getLogger(__name__)

MARKER = "llmft_checkpoint.json"
NO_RESUME = ("no", "none", "false", "")


# Checkpoints and resume ------------------------------------------------------------------------------------------


def _step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def checkpoints(out: Path) -> list[Path]:
    """Every checkpoint directory in `out`, oldest first, complete or not."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0] if out.is_dir() else []
    return sorted(found, key=_step)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file()


def resume_point(out: Path, setting: str | bool | None, overwrite: bool) -> str | None:
    """The checkpoint to resume from, following `training.resume_from_checkpoint`.

    auto: the latest complete checkpoint in `out`, or none (a fresh start). A path: that checkpoint. no: none.
    With overwrite_output_dir the run starts over, and earlier checkpoints are removed so that a later `auto`
    cannot pick one of the old run's.
    """
    setting = "auto" if setting is True else "no" if setting in (False, None) else str(setting)
    if overwrite:
        for old in checkpoints(out):
            shutil.rmtree(old, ignore_errors=True)
        return None
    if setting.lower() in NO_RESUME:
        return None
    if setting.lower() != "auto":
        path = Path(setting)
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"resume_from_checkpoint: {path} is not a checkpoint (no trainer_state.json in it). "
                              f"Point it at an {out}/checkpoint-N directory, or use auto.")
        if not is_complete(path):
            log.warning("%s has no completion marker (%s): it may be half-written.", path, MARKER)
        _warn_if_weights_only(path)
        return str(path)
    found = checkpoints(out)
    complete = [p for p in found if is_complete(p)]
    skipped = [p.name for p in found if not is_complete(p) and (not complete or _step(p) > _step(complete[-1]))]
    if skipped:
        log.warning("Skipping incomplete checkpoint(s) %s (killed while saving?).", ", ".join(skipped))
    if not complete:
        return None
    log.info("Resuming from %s (resume_from_checkpoint: auto; pass --resume_from_checkpoint no to start over "
             "with --overwrite_output_dir true).", complete[-1])
    _warn_if_weights_only(complete[-1])
    return str(complete[-1])


def _warn_if_weights_only(checkpoint: Path) -> None:
    """A checkpoint saved with save_only_model holds no optimizer, scheduler or random state: training resumes
    from its weights with those started afresh, so not to the result of an uninterrupted run."""
    if not (checkpoint / "optimizer.pt").exists() and not any(checkpoint.glob("global_step*")):
        log.warning("%s holds the weights only (training.save_only_model): the run resumes with a fresh optimizer, "
                    "schedule and random state, so it will not match an uninterrupted run.", checkpoint)


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once every process has written its part."""

    def on_save(self, args, state, control, **kwargs):
        if _is_distributed():
            torch.distributed.barrier()  # ZeRO/FSDP ranks write their own shards
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                tmp = folder / f".{MARKER}.tmp"
                tmp.write_text(json.dumps({"step": state.global_step, "epoch": state.epoch, "time": time.time()}))
                tmp.rename(folder / MARKER)  # atomic: the marker is there whole or not at all
                # An event in the log history (not a logged metric: trackers never see it) for the run's report.
                state.log_history.append({"step": state.global_step, "llmft_event": "checkpoint"})


# Preemption -------------------------------------------------------------------------------------------------------


class Preemption(TrainerCallback):
    """On SIGTERM (schedulers, `kill`) or SIGINT (Ctrl-C): finish the current step, save a checkpoint, stop.

    A second signal of the same kind stops at once, the usual way. In multi-process runs the ranks agree on the
    stop step (one all-reduce of a flag per step), since a checkpoint save is collective under ZeRO/FSDP.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.received = signum
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping (send it again to stop "
                    "at once).", signal.Signals(signum).name)
        signal.signal(signum, self._previous[signum])

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. training from a notebook worker): no handlers then
            self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        received = self.received
        if _is_distributed():
            flag = torch.tensor([received or 0], dtype=torch.int64, device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag.item()) or None
        if received:
            self.received, self.stopped_at = received, state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def message(self, out: Path, recipe_source: str | None) -> str:
        name = signal.Signals(self.received).name
        return (f"{name}: stopped at step {self.stopped_at} after saving {out}/checkpoint-{self.stopped_at}.\n"
                f"Resume with the same command (resume_from_checkpoint: auto picks it up):\n"
                f"  llmft train {recipe_source or 'RECIPE'} [same options]")


# Non-finite loss and gradients ------------------------------------------------------------------------------------


class NonFiniteGuard(TrainerCallback):
    """Checks the gradients before every optimizer step; a NaN/Inf loss makes them non-finite too.

    policy stop: raise, naming the step and the examples in it; the last checkpoint stays the last good one.
    policy skip: drop the step's update (the learning-rate schedule still advances) and go on, counting skips.
    `attach` makes the trainer remember each step's micro-batches, so the examples can be named.
    """

    def __init__(self, policy: str, dataset):
        self.policy, self.dataset = policy, dataset
        self.batches: list[dict[str, torch.Tensor]] = []
        self.skipped: list[dict[str, Any]] = []

    def attach(self, trainer) -> None:
        fetch = trainer.get_batch_samples

        def remembering(*args, **kwargs):
            batches, count = fetch(*args, **kwargs)
            self.batches = batches
            return batches, count

        trainer.get_batch_samples = remembering

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all()):
            return
        step = state.global_step + 1
        examples = self.example_ids()
        if self.policy == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradients at step {step} (examples: {', '.join(examples) or 'unknown'}). "
                "Training stopped; the latest checkpoint is the last good one. Lower training.learning_rate, check "
                "those examples, or set training.on_nonfinite: skip to drop such steps.")
        for param in model.parameters():
            param.grad = None  # optimizers leave parameters without a gradient untouched
        self.skipped.append({"step": step, "examples": examples})
        log.warning("Step %d: non-finite loss or gradients; update skipped (training.on_nonfinite: skip). "
                    "Examples: %s", step, ", ".join(examples) or "unknown")

    def example_ids(self) -> list[str]:
        """The `example_id`s of the sequences in the current step's micro-batches (padding and packing undone)."""
        rows = [row for inputs in self.batches if isinstance(inputs, list) for row in inputs]
        if rows:  # untokenized rows (GRPO's prompts): they carry their example_id
            return list(dict.fromkeys(str(row.get("example_id", "unknown")) for row in rows))
        wanted = {tuple(seq) for inputs in self.batches for seq in _sequences(inputs)}
        if not wanted:
            return []
        found = []
        for row in self.dataset.select_columns(["input_ids", "example_id"]):
            if tuple(row["input_ids"]) in wanted:
                found.append(row["example_id"])
        return found


def _sequences(inputs: dict[str, torch.Tensor]) -> list[list[int]]:
    ids = inputs["input_ids"].cpu()
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"].cpu().bool()
        return [row[m].tolist() for row, m in zip(ids, mask)]
    if "position_ids" in inputs:  # packed rows: each document restarts its positions at 0
        sequences = []
        for row, positions in zip(ids, inputs["position_ids"].cpu()):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(row)]
            sequences += [row[a:b].tolist() for a, b in zip(starts, starts[1:])]
        return sequences
    return [row.tolist() for row in ids]
