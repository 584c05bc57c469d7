"""Continued pretraining: raw text with loss on every token, as the model was pretrained.

Documents are tokenized, each followed by the end-of-text token, concatenated and cut into blocks of
training.max_length tokens (wrapped packing: a document may continue into the next block, which is how base models
are pretrained; the last block is kept, shorter). Conversations from data.replay_data join as whole examples with
their chat loss masks, so some instruction following is rehearsed while the domain text is learned.
"""

from __future__ import annotations

import logging

import datasets

from llmft.data import TokenizeReport, load_rows, number_rows, prepare_dataset, validate_rows
from llmft.errors import DataError
from llmft.schema import ROW, TEXT

log = logging.getLogger(__name__)


def trainer_class() -> type:
    from trl import SFTTrainer  # the blocks carry input_ids and labels: SFTTrainer trains on them as they are

    return SFTTrainer


def prepare(rows: datasets.Dataset, tokenizer, recipe, source: str):
    """Text rows -> (blocks of input_ids with labels, TokenizeReport), plus replay conversations when the recipe
    names them."""
    blocks, report = text_blocks(rows, tokenizer, recipe.training.max_length, source)
    replay = recipe.data.replay_data
    if not replay or source != recipe.data.train_data:  # replay joins the training split only
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


def text_blocks(rows: datasets.Dataset, tokenizer, block: int, source: str):
    """Documents -> blocks of `block` tokens, an end-of-text token after each document. Documents with no token
    (empty, or only whitespace) are counted as dropped, never silently lost."""
    if validate_rows(rows, source) != TEXT:
        raise DataError(f"{source}: training.stage pretrain trains on raw text: rows with a 'text' column (convert "
                        "files with llmft data convert --format text). For conversations use training.stage: sft.")
    if tokenizer.eos_token_id is None:
        raise DataError(f"{source}: the tokenizer has no end-of-text token to separate documents with.")
    report, stream, starts = TokenizeReport(rows_in=len(rows)), [], []
    encoded = rows.map(lambda batch: {"ids": tokenizer(batch[TEXT], add_special_tokens=False)["input_ids"]},
                       batched=True, remove_columns=rows.column_names, desc=f"Tokenizing {source.split('/')[-1]}")
    numbers = rows[ROW] if ROW in rows.column_names else range(1, len(rows) + 1)
    for ids, text, number in zip(encoded["ids"], rows[TEXT], numbers):
        if not ids or not text.strip():
            report.dropped["document with no text"] += 1
            continue
        starts.append((len(stream), number))
        stream += ids + [tokenizer.eos_token_id]
    report.rows_out = len(starts)
    if not stream:
        raise DataError(f"{source}: no document with any text ({report.rows_in} rows).")
    out = {"input_ids": [], "labels": [], "example_id": []}
    first = 0
    for number, begin in enumerate(range(0, len(stream), block), start=1):
        ids = stream[begin: begin + block]
        while first + 1 < len(starts) and starts[first + 1][0] <= begin:
            first += 1
        last = first
        while last + 1 < len(starts) and starts[last + 1][0] < begin + len(ids):
            last += 1
        rows_in_block = f"row {starts[first][1]}" + (f"-{starts[last][1]}" if last != first else "")
        out["input_ids"].append(ids)
        out["labels"].append(list(ids))
        out["example_id"].append(f"block {number} ({rows_in_block})")
    report.examples = len(out["input_ids"])
    report.tokens = report.trainable_tokens = len(stream)
    return datasets.Dataset.from_dict(out), report
