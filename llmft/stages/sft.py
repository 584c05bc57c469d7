"""Supervised fine-tuning: TRL's SFTTrainer on conversations tokenized with llmft's loss masks.

The dataset handed to TRL already holds input_ids and labels (loss on assistant tokens only, for any chat
template), so TRL trains on them as they are instead of tokenizing again.
"""

from __future__ import annotations

from llmft.data import prepare_dataset


def trainer_class() -> type:
    from trl import SFTTrainer  # ~6 s to import: keep it out of `llmft --help`

    return SFTTrainer


def prepare(rows, tokenizer, recipe, source: str, split: str = "train"):
    """Validated rows -> (input_ids/labels dataset, TokenizeReport), with the recipe's max_length and overlong policy."""
    args = recipe.training
    return prepare_dataset(rows, tokenizer, args.max_length, recipe.data.overlong, source, args.dataset_num_proc,
                           recipe.data.reasoning)
