"""Preference stages: DPO (and its loss variants), ORPO, CPO and SimPO, KTO and reward models, on TRL's trainers.

Rows are tokenized by llmft (`llmft.data.prepare_preference`) with the same chat-template logic and loss masks as
supervised training: the prompt is everything the template renders before the answer, and the answer is its
content, tool calls, kept reasoning and end-of-turn token. TRL 1.16's DPOTrainer and KTOTrainer re-tokenize any
dataset they are given, and its experimental ORPO and CPO trainers tokenize text (its RewardTrainer and SFTTrainer
skip pre-tokenized data); the small subclasses below only make them take llmft's tokens as they are.
"""

from __future__ import annotations

import functools

from llmft.data import IGNORE, prepare_preference
from llmft.schema import PREFERENCE, UNPAIRED


def _without_reference_copy(model) -> None:
    """TRL copies a PEFT model's adapter as a frozen "ref" adapter to compute the reference with (and saves it in
    ref/). llmft's adapters are always fresh, so the reference is the model with its adapter disabled, which TRL
    uses when there is no "ref" adapter: no second adapter in memory, none in the run directory."""
    config = getattr(model, "peft_config", {})
    if "ref" in config:
        model.delete_adapter("ref")
        model.set_adapter("default")


@functools.cache
def dpo_trainer_class() -> type:
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on pairs llmft tokenized (prompt_ids, chosen_ids, rejected_ids)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _without_reference_copy(self.model)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


@functools.cache
def kto_trainer_class() -> type:
    from trl import KTOTrainer

    class PretokenizedKTOTrainer(KTOTrainer):
        """KTOTrainer on answers llmft tokenized (prompt_ids, completion_ids, label); the KL term's mismatched
        completions are made as TRL makes them: each batch's completions rotated by one."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _without_reference_copy(self.model)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not self.calculate_KL:
                return dataset

            return dataset.map(mismatched_completions, batched=True, batch_size=args.per_device_train_batch_size,
                               desc=f"Mismatched completions for the KL term ({dataset_name})")

    return PretokenizedKTOTrainer


def mismatched_completions(batch) -> dict:
    """KTO's KL term: each row's prompt with a completion of another prompt in its batch. TRL takes the previous
    row's; pairs unpaired for KTO sit side by side (chosen, then rejected, of one prompt), so the previous row is
    passed over while it answers the same prompt."""
    ids, prompts = batch["completion_ids"], batch["prompt_ids"]
    n = len(ids)

    def other(i: int):
        return next((ids[(i - k) % n] for k in range(1, n) if prompts[(i - k) % n] != prompts[i]), ids[(i - 1) % n])

    return {"KL_completion_ids": [other(i) for i in range(n)]}


def _tokens_as_trl_row(feature) -> dict:
    """A pre-tokenized pair in the form TRL's ORPO and CPO trainers tokenize text into."""
    prompt = feature["prompt_ids"]
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name in ("chosen", "rejected"):
        sequence = prompt + feature[f"{name}_ids"]
        row.update({f"{name}_input_ids": sequence, f"{name}_attention_mask": [1] * len(sequence),
                    f"{name}_labels": [IGNORE] * len(prompt) + feature[f"{name}_ids"]})
    return row


def _text_trainer(trainer: type) -> type:
    class Pretokenized(trainer):
        __doc__ = f"{trainer.__name__} on pairs llmft tokenized (no reference model: the loss needs none)."

        def tokenize_row(self, feature, model=None):
            if "prompt_ids" in feature:
                return _tokens_as_trl_row(feature)
            return super().tokenize_row(feature, model)

    Pretokenized.__name__ = f"Pretokenized{trainer.__name__}"
    return Pretokenized


@functools.cache
def orpo_trainer_class() -> type:
    from trl.experimental.orpo import ORPOTrainer

    return _text_trainer(ORPOTrainer)


@functools.cache
def cpo_trainer_class() -> type:
    from trl.experimental.cpo import CPOTrainer  # CPO, and SimPO with loss_type: simpo and cpo_alpha: 0

    return _text_trainer(CPOTrainer)


def reward_trainer_class() -> type:
    from trl import RewardTrainer  # takes chosen_ids / rejected_ids as they are

    return RewardTrainer


def _prepare(want: str):
    def prepare(rows, tokenizer, recipe, source: str, split: str = "train"):
        args = recipe.training
        return prepare_preference(rows, tokenizer, args.max_length, recipe.data.overlong, source, want,
                                  args.dataset_num_proc, recipe.data.reasoning)
    return prepare


prepare_pairs = _prepare(PREFERENCE)
prepare_unpaired = _prepare(UNPAIRED)


def prepare_reward(rows, tokenizer, recipe, source: str, split: str = "train"):
    """Pairs as the reward model reads them: each answer with its prompt, whole (chosen_ids, rejected_ids)."""
    pairs, report = prepare_pairs(rows, tokenizer, recipe, source)
    whole = pairs.map(lambda row: {"chosen_ids": row["prompt_ids"] + row["chosen_ids"],
                                   "rejected_ids": row["prompt_ids"] + row["rejected_ids"]},
                      remove_columns=["prompt_ids"], desc="Joining prompts and answers")
    return whole, report
