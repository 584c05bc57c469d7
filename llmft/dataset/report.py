"""`llmft data report`: what training will see, before any GPU hour is spent.

Uses the tokenizer, chat template, max_length and overlong policy training will use (from a recipe, or a model
name), and the same tokenization and loss masks (`llmft.data`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from llmft.data import (IGNORE, answer_ids, document_ids, example_name, fit_example, load_rows, tokenize_row,
                        validate_rows)
from llmft.errors import ConfigError, DataError
from llmft.masking import masking_for
from llmft.schema import PREFERENCE, PROMPT_ONLY, TEXT, UNPAIRED
from llmft.schema import example as as_example

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around the tokens that carry loss in the rendered example


@dataclass
class ReportOptions:
    dataset: str = field(metadata={"positional": True, "help": "A dataset directory (a build's folder or its "
                                                                "train/), or a .jsonl/.json/.parquet file."})
    recipe: str | None = field(default=None, metadata={"help": "The recipe training will use (its model, "
                                                               "max_length and overlong policy)."})
    model: str | None = field(default=None, metadata={"help": "Or a model (Hub id, path or smollm2-135m-instruct), "
                                                              "with --max-length."})
    max_length: int | None = field(default=None, metadata={"help": "Longest example in tokens (default: the recipe's)."})
    out: str | None = field(default=None, metadata={"help": "Where report.json and length_histogram.png go "
                                                            "(default: DATASET_report/)."})

    def __post_init__(self):
        if bool(self.recipe) == bool(self.model):
            raise ConfigError(["give --recipe RECIPE or --model MODEL (one of them)."],
                              what="the options of llmft data report")


def report_command(options: ReportOptions) -> None:
    """`llmft data report`: the table on the terminal, report.json and the histogram on disk."""
    from llmft.config import ModelConfig, load_recipe
    from llmft.model import load_tokenizer

    if options.recipe:
        recipe = load_recipe(options.recipe)
        tokenizer = load_tokenizer(recipe.model, recipe.training.trust_remote_code)
        max_length, overlong = options.max_length or recipe.training.max_length, recipe.data.overlong
        reasoning = recipe.data.reasoning
    else:
        tokenizer = load_tokenizer(ModelConfig(name_or_path=options.model))
        max_length, overlong, reasoning = options.max_length, "drop", "keep"
    dataset = Path(options.dataset)
    source = dataset / "train" if (dataset / "train" / "state.json").exists() else dataset
    result = report(load_rows(str(source)), tokenizer, max_length, overlong, str(source), reasoning)
    print(format_table(result))
    out = Path(options.out) if options.out else source.parent / f"{source.name.split('.')[0]}_report"
    paths = write(result, out)
    print(f"\nSaved {paths['json']} and {paths['histogram']}")


def report(rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None, overlong: str,
           source: str, reasoning: str = "keep") -> dict[str, Any]:
    """Length distribution, what max_length would drop or cut, loss share, per-role tokens, the masking strategy of
    the chat template, and a rendered example (one with a tool call, when the data has any). Preference rows get
    their own report (`pair_report`)."""
    kind = validate_rows(rows, source)
    if kind in (PREFERENCE, UNPAIRED):
        return pair_report(rows, kind, tokenizer, max_length, overlong, source, reasoning)
    if kind == TEXT:
        return text_report(rows, tokenizer, max_length, source)
    if kind == PROMPT_ONLY:
        raise DataError(f"{source}: prompt-only rows (GRPO's prompts): no answers to measure. The report covers "
                        "conversations, prompt/completion rows, pairs, KTO answers and raw text.")
    lengths, trainable, role_tokens = [], [], Counter()
    over, cut_tokens, cut_trainable, left_empty, zero_trainable = 0, 0, 0, 0, 0
    rendered, rendered_tools = None, None
    for index, row in enumerate(tqdm(rows, desc="Tokenizing", unit="row")):
        conversation = as_example(row, kind)
        for message in conversation.messages:
            text = message.get("content") if isinstance(message.get("content"), str) else ""
            role_tokens[message["role"]] += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        uses_tools = any(m.get("tool_calls") or m["role"] == "tool" for m in conversation.messages)
        try:
            examples = list(tokenize_row(row, tokenizer, kind, reasoning))
        except DataError as err:  # named as training names it
            raise DataError(f"{source}: {example_name(row, index)}: {err}") from err
        for ids, labels in examples:
            n_train = sum(label != IGNORE for label in labels)
            lengths.append(len(ids))
            trainable.append(n_train)
            zero_trainable += n_train == 0
            if max_length is not None and len(ids) > max_length:
                over += 1
                cut_tokens += len(ids) - max_length
                kept = fit_example(ids, labels, max_length, "truncate")[1]  # the end training would keep
                kept_train = sum(label != IGNORE for label in kept)
                cut_trainable += n_train - kept_train
                left_empty += kept_train == 0
            if n_train and rendered is None:
                rendered = render_mask(tokenizer, ids, labels)
            if n_train and uses_tools and rendered_tools is None:
                rendered_tools = render_mask(tokenizer, ids, labels)
    total, total_train = sum(lengths), sum(trainable)
    arr = np.array(lengths)
    how = masking_for(tokenizer)
    return {
        "source": source, "schema": kind, "rows": len(rows), "examples": len(lengths), "tokens": total,
        "trainable_tokens": total_train, "loss_share": total_train / total if total else 0.0,
        "length": {"min": int(arr.min()), "mean": float(arr.mean()), "p50": int(np.percentile(arr, 50)),
                   "p90": int(np.percentile(arr, 90)), "p99": int(np.percentile(arr, 99)), "max": int(arr.max())},
        "max_length": max_length, "overlong_policy": overlong, "reasoning": reasoning,
        "masking": {**how.record(), "description": how.describe()},
        "over_max_length": {"rows": over, "tokens_cut_if_truncated": cut_tokens,
                            "trainable_tokens_cut_if_truncated": cut_trainable,
                            "rows_left_without_loss_if_truncated": left_empty},
        "zero_trainable_rows": zero_trainable,
        "role_content_tokens": dict(role_tokens),
        "template_tokens": total - sum(role_tokens.values()),
        "example": rendered_tools or rendered,
        "lengths": lengths,
    }


LENGTH_BIAS = 0.65  # chosen longer in more than this share of pairs (or shorter in more): a model can learn length


def pair_report(rows: datasets.Dataset, kind: str, tokenizer, max_length: int | None, overlong: str, source: str,
                reasoning: str = "keep") -> dict[str, Any]:
    """Preference pairs (or KTO answers): how many, prompt and answer lengths, how often the chosen answer is the
    longer one (a length bias a model learns instead of quality: the classic trap of preference data), and what
    max_length would drop or cut."""
    answers = ("chosen", "rejected") if kind == PREFERENCE else ("completion",)
    prompts, lengths, over, rendered = [], {a: [] for a in answers}, 0, None
    labels = rows["label"] if kind == UNPAIRED else None
    for index, row in enumerate(tqdm(rows, desc="Tokenizing", unit="row")):
        try:
            ids = {a: answer_ids(tokenizer, row, kind, a, reasoning) for a in answers}
        except DataError as err:  # named as training names it
            raise DataError(f"{source}: {example_name(row, index)}: {err}") from err
        prompt = ids[answers[0]][0]
        prompts.append(len(prompt))
        for a in answers:
            lengths[a].append(len(ids[a][1]))
        over += max_length is not None and len(prompt) + max(len(ids[a][1]) for a in answers) > max_length
        if rendered is None:
            answer = ids[answers[0]][1]
            rendered = render_mask(tokenizer, prompt + answer, [IGNORE] * len(prompt) + answer)
    out = {"source": source, "schema": kind, "rows": len(rows), "max_length": max_length, "overlong_policy": overlong,
           "reasoning": reasoning, "prompt_tokens": _spread(prompts),
           "answer_tokens": {a: _spread(v) for a, v in lengths.items()}, "over_max_length": {"rows": over},
           "example": rendered, "lengths": [p + max(v[i] for v in lengths.values()) for i, p in enumerate(prompts)]}
    if kind == PREFERENCE:
        longer = sum(c > r for c, r in zip(lengths["chosen"], lengths["rejected"])) / len(rows)
        shorter = sum(c < r for c, r in zip(lengths["chosen"], lengths["rejected"])) / len(rows)
        out["chosen_longer_share"], out["chosen_shorter_share"] = longer, shorter
        out["length_bias"] = longer > LENGTH_BIAS or shorter > LENGTH_BIAS
        scores = [r.get("score_chosen") for r in rows] if "score_chosen" in rows.column_names else []
        out["scored_pairs"] = sum(s is not None for s in scores)
    else:
        out["desirable"] = sum(labels)
        out["undesirable"] = len(labels) - out["desirable"]
    return out


def text_report(rows: datasets.Dataset, tokenizer, max_length: int | None, source: str) -> dict[str, Any]:
    """Raw text for continued pretraining: documents, tokens as training counts them (`document_ids`), empty documents
    (counted: training drops them), and the blocks of max_length tokens the documents pack into (nothing is cut)."""
    lengths, empty = [], 0
    for text in tqdm(rows[TEXT], desc="Tokenizing", unit="document"):
        ids = document_ids(tokenizer, [text])[0]
        if ids:
            lengths.append(len(ids))
        else:
            empty += 1
    tokens = sum(lengths)
    return {"source": source, "schema": TEXT, "rows": len(rows), "documents": len(lengths), "empty_documents": empty,
            "tokens": tokens, "document_tokens": _spread(lengths) if lengths else None, "max_length": max_length,
            "blocks": math.ceil(tokens / max_length) if max_length else None, "lengths": lengths, "example": None}


def format_text_table(r: dict[str, Any]) -> str:
    spread = r["document_tokens"]
    rows = [("documents", f"{r['documents']:,} of {r['rows']:,} rows"),
            ("empty documents (dropped in training)", f"{r['empty_documents']:,}"),
            ("tokens (as trained: with BOS where added, end-of-text)", f"{r['tokens']:,}"),
            ("document tokens", f"mean {spread['mean']:.1f}, p50 {spread['p50']}, p90 {spread['p90']}, "
                                f"max {spread['max']}" if spread else "-"),
            (f"blocks of max_length ({r['max_length']})", f"{r['blocks']:,} (documents packed; no token cut)"
             if r["blocks"] is not None else "- (set --max-length)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"Pre-flight report: {r['source']} (raw text)", ""] + [f"  {k:<{width}}  {v}" for k, v in rows])


def _spread(values: list[int]) -> dict[str, float]:
    arr = np.array(values)
    return {"mean": float(arr.mean()), "p50": int(np.percentile(arr, 50)), "p90": int(np.percentile(arr, 90)),
            "max": int(arr.max())}


def format_pair_table(r: dict[str, Any]) -> str:
    def spread(d):
        return f"mean {d['mean']:.1f}, p50 {d['p50']}, p90 {d['p90']}, max {d['max']}"

    rows = [("rows", f"{r['rows']:,}"), ("prompt tokens", spread(r["prompt_tokens"]))]
    rows += [(f"{name} answer tokens", spread(d)) for name, d in r["answer_tokens"].items()]
    if r["schema"] == PREFERENCE:
        rows.append(("chosen longer / shorter than rejected",
                     f"{r['chosen_longer_share']:.0%} / {r['chosen_shorter_share']:.0%}"
                     + ("  <- LENGTH BIAS: a model can learn to prefer length instead of quality"
                        if r["length_bias"] else "")))
        rows.append(("pairs with scores", f"{r['scored_pairs']:,}"))
    else:
        rows.append(("desirable / undesirable", f"{r['desirable']:,} / {r['undesirable']:,}"))
    rows.append((f"rows over max_length ({r['max_length']})", f"{r['over_max_length']['rows']:,} -> "
                                                             f"{r['overlong_policy']}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"Pre-flight report: {r['source']} ({r['schema']})", ""] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += ["", f"First example, rendered; loss on the tokens between {MARK_OPEN} and {MARK_CLOSE}:", "",
              r["example"]]
    return "\n".join(lines)


def render_mask(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The decoded example with every run of loss-carrying tokens between ⟦ and ⟧."""
    out, inside = [], False
    for token, label in zip(ids, labels):
        trained = label != IGNORE
        if trained != inside:
            out.append(MARK_OPEN if trained else MARK_CLOSE)
            inside = trained
        out.append(tokenizer.decode([token]))
    return "".join(out) + (MARK_CLOSE if inside else "")


def format_table(r: dict[str, Any]) -> str:
    if r["schema"] in (PREFERENCE, UNPAIRED):
        return format_pair_table(r)
    if r["schema"] == TEXT:
        return format_text_table(r)
    over = r["over_max_length"]
    rows = [
        ("rows", f"{r['rows']:,}" + (f" ({r['examples']:,} examples: one per assistant turn)"
                                     if r["examples"] != r["rows"] else "")),
        ("tokens", f"{r['tokens']:,}"),
        ("tokens carrying loss", f"{r['trainable_tokens']:,} ({r['loss_share']:.1%})"),
        ("length min / p50 / p90 / p99 / max",
         " / ".join(str(r["length"][k]) for k in ("min", "p50", "p90", "p99", "max"))),
        ("length mean", f"{r['length']['mean']:.1f}"),
        (f"rows over max_length ({r['max_length']})", f"{over['rows']:,} -> {r['overlong_policy']}"),
        ("  tokens truncation would cut", f"{over['tokens_cut_if_truncated']:,} "
                                          f"({over['trainable_tokens_cut_if_truncated']:,} carrying loss)"),
        ("  rows truncation would leave without loss", f"{over['rows_left_without_loss_if_truncated']:,}"),
        ("rows with no trainable token", f"{r['zero_trainable_rows']:,}"),
    ]
    rows += [(f"content tokens: {role}", f"{n:,}") for role, n in sorted(r["role_content_tokens"].items())]
    rows.append(("chat-template tokens", f"{r['template_tokens']:,}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"Pre-flight report: {r['source']} ({r['schema']})", ""]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += ["", f"Loss masks: {r['masking']['description']}; reasoning: {r['reasoning']}."]
    if r["example"]:
        lines += ["", f"First example, rendered; loss on the tokens between {MARK_OPEN} and {MARK_CLOSE}:", "",
                  r["example"]]
    return "\n".join(lines)


def write(r: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json and length_histogram.png under `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "histogram": out / "length_histogram.png"}
    paths["json"].write_text(json.dumps({k: v for k, v in r.items() if k != "lengths"}, indent=2))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(r["lengths"], bins=50, color="#4477aa")
    if r["max_length"]:
        ax.axvline(r["max_length"], color="#cc3311", linestyle="--", label=f"max_length {r['max_length']}")
        ax.legend()
    ax.set_xlabel("tokens per document (with its end-of-text token)" if r["schema"] == TEXT else
                  "tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.set_title(f"{'/'.join(Path(r['source']).parts[-2:])}: {r['rows']:,} examples")
    fig.tight_layout()
    fig.savefig(paths["histogram"], dpi=100)
    plt.close(fig)
    return paths
