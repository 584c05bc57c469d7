"""Continued pretraining: raw text with loss on every token, as the model was pretrained.

Documents are tokenized as the model was pretrained (with the BOS its tokenizer adds, as Llama's
and Gemma's do), each followed by the end-of-text token, concatenated and cut into blocks of
training.max_length tokens (wrapped packing: a document may continue into the next block, which is how base models
are pretrained; the last block is kept, shorter). Conversations from data.replay_data join as whole examples with
their chat loss masks, so some instruction following is rehearsed while the domain text is learned.
"""

from __future__ import annotations

import logging

import datasets

from llmft.data import load_rows, number_rows, prepare_dataset, text_blocks

log = logging.getLogger(__name__)


def trainer_class() -> type:
    from trl import SFTTrainer  # the blocks carry input_ids and labels: SFTTrainer trains on them as they are

    return SFTTrainer


def prepare(rows: datasets.Dataset, tokenizer, recipe, source: str, split: str = "train"):
    """Text rows -> (blocks of input_ids with labels, TokenizeReport), plus replay conversations when the recipe
    names them."""
    blocks, report = text_blocks(rows, tokenizer, recipe.training.max_length, source)
    replay = recipe.data.replay_data
    if not replay or split != "train":  # replay joins the training split only: held-out text stays text
        return blocks, report
    chats, chat_report = prepare_dataset(number_rows(load_rows(replay)), tokenizer, recipe.training.max_length,
                                         recipe.data.overlong, replay, recipe.training.dataset_num_proc,
                                         recipe.data.reasoning)
    log.info(chat_report.summary("replay"))
    chats = chats.select_columns(["input_ids", "labels", "example_id"])
    mixed = datasets.concatenate_datasets([blocks, chats.cast(blocks.features)]).shuffle(seed=recipe.training.seed)
    report.examples += chat_report.examples
    report.tokens += chat_report.tokens
    report.trainable_tokens += chat_report.trainable_tokens
    return mixed, report
