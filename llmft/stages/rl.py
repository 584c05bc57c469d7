"""Online RL with verifiable rewards: TRL's GRPOTrainer, its rewards named in the recipe (llmft.rewards).

Rows are the same conversations (or prompt/completion rows) SFT trains on: the prompt is everything before the last
assistant message, and that message is the reference answer the rewards check against (the `reference` column; the
row's other columns reach the rewards too, as TRL passes them). Prompt-only rows (`prompt`, and a `reference` or
`answer` column) work too. GSM8K-style `{question, answer}` files convert with
`llmft data convert --format columns --prompt-field question --completion-field answer`.
"""

from __future__ import annotations

import functools
from collections import Counter

import datasets

from llmft.data import TokenizeReport, as_json_columns, validate_rows
from llmft.errors import DataError
from llmft.schema import MESSAGES, PROMPT_COMPLETION, PROMPT_ONLY, ROW, prompt_and_reference, row_number

CONSUMED = ("messages", "prompt", "completion", "tools")  # turned into prompt/reference; the rest is passed on


@functools.cache
def grpo_trainer_class() -> type:
    from trl import GRPOTrainer

    from llmft.rewards import build_rewards

    class LlmftGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with the recipe's rewards (training.rewards) built from their names."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("reward_funcs", build_rewards(kwargs["args"].rewards))
            super().__init__(*args, **kwargs)

        def evaluate(self, *args, **kwargs):
            metrics = super().evaluate(*args, **kwargs)
            # GRPO's loss on sampled completions is ~0 by construction (advantages are centred on 0 within each
            # group): no measure of the model. The held-out reward (eval_reward) and exact match are.
            metrics.pop("eval_loss", None)
            return metrics

    return LlmftGRPOTrainer


def prepare(rows: datasets.Dataset, tokenizer, recipe, source: str, split: str = "train"):
    """Rows -> (prompt, reference, example_id and the row's other columns), prompts longer than max_length dropped
    and counted (a prompt cannot be cut without changing the question)."""
    kind = validate_rows(rows, source)
    if kind not in (MESSAGES, PROMPT_COMPLETION, PROMPT_ONLY):
        raise DataError(f"{source}: holds {kind} rows; grpo trains on prompts with a reference answer: "
                        "conversations (the last learned assistant message is the reference), prompt/completion rows, or "
                        "prompt-only rows with a reference (or answer) column.")
    needs = [spec for spec in recipe.training.rewards if spec.startswith("exact_match")]
    limit = recipe.training.max_length
    report, out = TokenizeReport(rows_in=len(rows)), []
    passed = [c for c in rows.column_names if c not in CONSUMED and not c.startswith("_")]
    for index, row in enumerate(rows):
        prompt, reference = prompt_and_reference(row, kind)
        if needs and not reference.strip():  # e.g. a conversation ending on a tool call
            report.dropped[f"no reference answer ({needs[0]} compares with one)"] += 1
            continue
        try:
            length = _prompt_length(tokenizer, prompt)
        except Exception as err:  # jinja2's TemplateError and what templates raise ("System role not supported")
            raise DataError(f"{source}: row {row_number(row, index)}: the chat template refuses this prompt "
                            f"({type(err).__name__}: {err}).") from err
        if limit and length > limit:
            report.dropped[f"prompt longer than max_length {limit}"] += 1
            continue
        report.tokens += length
        report.lengths.append(length)
        out.append({**{c: row[c] for c in passed}, "prompt": prompt, "reference": reference,
                    "example_id": f"row {row_number(row, index)}", ROW: row_number(row, index)})
    report.rows_out = report.examples = len(out)
    if not out:
        raise DataError(f"{source}: no prompt left to train on ({_reasons(report.dropped)}).")
    return as_json_columns(out), report  # each prompt's messages keep their own keys, not every row's as nulls


def _prompt_length(tokenizer, prompt) -> int:
    if isinstance(prompt, str):
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def _reasons(dropped: Counter) -> str:
    return "; ".join(f"{n} {why}" for why, n in dropped.items()) or "the data is empty"
