"""Live progress: tokens/s, memory and the time left on the training progress line, and the same figures in every
training log, so TensorBoard, MLflow, Trackio (training.report_to) chart them beside the loss."""

from __future__ import annotations

import time

from transformers import ProgressCallback, TrainerCallback


class LiveProgress(TrainerCallback):
    """Tokens come from the Trainer's count where the stage's batches carry input_ids; otherwise each step counts
    the average tokens of a step from the tokenised data (shown with a '~')."""

    def __init__(self, tokens_per_step: float):
        self.tokens_per_step = tokens_per_step
        self.bar_owner: ProgressCallback | None = None
        self.start, self.start_step, self.start_tokens = 0.0, 0, 0

    def attach(self, trainer) -> None:
        """First among the callbacks, so the figures it adds to a log are in it when the trackers' callbacks run."""
        callbacks = trainer.callback_handler.callbacks
        callbacks.remove(self)
        callbacks.insert(0, self)
        self.bar_owner = next((c for c in callbacks if isinstance(c, ProgressCallback)), None)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step, self.start_tokens = time.time(), state.global_step, state.num_input_tokens_seen

    def tokens(self, state) -> tuple[float, bool]:
        """Tokens trained on since this process started training, and whether they were counted."""
        counted = state.num_input_tokens_seen - self.start_tokens
        if counted > 0:
            return counted, True
        return (state.global_step - self.start_step) * self.tokens_per_step, False

    def figures(self, state) -> dict[str, float]:
        elapsed = max(time.time() - self.start, 1e-9)
        tokens, _ = self.tokens(state)
        done = state.global_step - self.start_step
        left = (state.max_steps - state.global_step) * elapsed / done if done else None
        return {"tokens_per_second": tokens / elapsed, "memory_gb": memory_gb(), **({"eta_seconds": left} if left
                                                                                     is not None else {})}

    def line(self, state) -> str:
        f = self.figures(state)
        approx = "" if self.tokens(state)[1] else "~"
        eta = _clock(f["eta_seconds"]) if "eta_seconds" in f else "?"
        return f"{approx}{f['tokens_per_second']:,.0f} tok/s, {f['memory_gb']:.1f} GB, ETA {eta}"

    def on_step_end(self, args, state, control, **kwargs):
        bar = getattr(self.bar_owner, "training_bar", None)
        if bar is not None and state.is_world_process_zero:
            bar.set_postfix_str(self.line(state), refresh=False)  # drawn with the bar's next update

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.start:  # training logs, not evaluations or the summary
            f = self.figures(state)
            logs["tokens_per_second"] = round(f["tokens_per_second"], 1)
            logs["memory_gb"] = round(f["memory_gb"], 3)


def memory_gb() -> float:
    """The accelerator's allocated peak where there is one, else this process's resident memory now."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
