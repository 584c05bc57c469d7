"""Packing must not let examples see each other: a packed row's loss equals the examples' loss run one by one."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from llmft.config import ModelConfig
from llmft.data import prepare_dataset
from llmft.model import load_tokenizer
from tests.helpers import chat_rows


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_has_the_loss_of_its_examples_run_alone(tiny_model_dir, attention):
    import datasets

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    rows = datasets.Dataset.from_list(chat_rows(4))
    prepared, _ = prepare_dataset(rows, tokenizer, 128, "drop", "rows")
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in prepared]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()

    # Alone: one forward per example, summed per-token losses.
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    alone = total / count

    # Packed the way TRL's padding-free collator packs (one row, positions restarting at 0, no attention mask).
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                       use_cache=False).loss.item()
    assert packed == pytest.approx(alone, rel=1e-4)

    # The check has teeth: the same row with positions running on (documents attending to each other) differs.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
    assert abs(leaky - alone) > 1e-3
