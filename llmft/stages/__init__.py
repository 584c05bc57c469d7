"""Training stages: what differs between supervised fine-tuning, preference tuning and reward models is the TRL
trainer, how rows become its dataset, and (for a reward model) the head on the model. Everything else is shared by
`llmft.train`: the run directory, evaluation hooks, resume, the NaN guard, the model card and push.

A new stage is a trainer class and a `prepare` function, a row in STAGES, its training section in
`llmft.config.TRAINING_CLASSES` and its name in `llmft.config.STAGES` (a test keeps the three equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmft.schema import MESSAGES, PREFERENCE, TEXT, UNPAIRED
from llmft.stages import preference, pretrain, rl, sft


@dataclass(frozen=True)
class Stage:
    name: str
    trainer_class: Callable[[], type]  # the TRL trainer, imported only when training starts (TRL takes seconds)
    prepare: Callable  # (rows, tokenizer, recipe, source, split) -> (the trainer's dataset, TokenizeReport)
    tags: tuple[str, ...]  # the model card's tags
    rows: str  # the kind of rows it trains on (llmft.schema); KTO also takes pairs, unpaired
    head: str = "causal_lm"  # the model's head: causal_lm, or sequence_classification (a reward model's score)
    micro_batches: bool = True  # CPU micro-batches allowed (KTO estimates its KL term across a whole batch)
    counts_tokens: bool = False  # its batches carry input_ids, so the Trainer counts the tokens trained on


STAGES = {
    "sft": Stage("sft", sft.trainer_class, sft.prepare, ("sft",), MESSAGES, counts_tokens=True),
    "pretrain": Stage("pretrain", pretrain.trainer_class, pretrain.prepare, ("continued-pretraining",), TEXT,
                      counts_tokens=True),
    "dpo": Stage("dpo", preference.dpo_trainer_class, preference.prepare_pairs, ("dpo",), PREFERENCE, counts_tokens=True),
    "orpo": Stage("orpo", preference.orpo_trainer_class, preference.prepare_pairs, ("orpo",), PREFERENCE),
    "cpo": Stage("cpo", preference.cpo_trainer_class, preference.prepare_pairs, ("cpo",), PREFERENCE),
    "kto": Stage("kto", preference.kto_trainer_class, preference.prepare_unpaired, ("kto",), UNPAIRED,
                 micro_batches=False),
    "reward": Stage("reward", preference.reward_trainer_class, preference.prepare_reward, ("reward-model",),
                    PREFERENCE, head="sequence_classification", counts_tokens=True),
    # GRPO's batch is groups of completions it generates and pads itself
    "grpo": Stage("grpo", rl.grpo_trainer_class, rl.prepare, ("grpo",), MESSAGES, micro_batches=False),
}
