"""Training stages: what differs between supervised fine-tuning and the stages to come (preference tuning, RL,
continued pretraining) is the TRL trainer and how rows become its dataset. Everything else is shared by
`llmft.train`: the run directory, evaluation hooks, resume, the NaN guard, the model card and push.

A new stage is a module with `trainer_class()` and `prepare()`, a row in STAGES, and its name in
`llmft.config.STAGES` (which the recipe's `training.stage` is checked against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmft.stages import sft


@dataclass(frozen=True)
class Stage:
    name: str
    trainer_class: Callable[[], type]  # the TRL trainer, imported only when training starts (TRL takes seconds)
    prepare: Callable  # (rows, tokenizer, recipe, source) -> (the trainer's dataset, TokenizeReport)
    tags: tuple[str, ...]  # the model card's tags


STAGES = {"sft": Stage("sft", sft.trainer_class, sft.prepare, ("sft",))}
