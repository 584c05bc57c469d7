"""Every error llmft reports to a user: one base class, caught once by the CLI and printed as its message.

Kept free of torch, transformers and TRL so that light commands (`llmft data convert`) stay light. Each message
says what is wrong, where (file, line or row, field), and what to do.
"""

from __future__ import annotations


class LlmftError(Exception):
    """Bad input or settings, or a step that must not go ahead. `exit_code` is what the command returns."""

    exit_code = 1


class ConfigError(LlmftError):
    """Problems in a recipe, a settings file or command-line options, all reported at once."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: str | None = None, what: str = "recipe"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"{len(self.problems)} problem(s) in {what}{f' {source}' if source else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class DataError(LlmftError):
    """Data that cannot be read, built or trained on: names the file, the rows and fields, and what to do."""


class ModelError(LlmftError):
    """A model or tokenizer that cannot be found or loaded."""


class RunDirError(LlmftError):
    """A run directory that is incomplete, or one that would be overwritten."""


class LaunchError(LlmftError):
    """A launch that would not run what the user asked for (process counts, sharding, batch arithmetic, tuning)."""


class CheckpointError(LlmftError):
    """A checkpoint named for resuming that cannot be resumed from."""


class NonFiniteError(LlmftError):
    """A training step whose loss or gradients are NaN or infinite."""


class HubError(LlmftError):
    """A merge, check or push that must not go ahead."""


class GenerationError(LlmftError):
    """Self-chat, augmentation or a generation backend that cannot go on (bad seeds, a server that failed for good)."""


class Preempted(LlmftError):
    """Training stopped on a signal after saving a checkpoint; the exit code is the shell's for that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # schedulers and retry loops see "not finished"
