"""Training data: load a split, check every row against the conversation schema, tokenize it with loss masks.

Rows are `messages` or `prompt`/`completion` (`llmft.schema`). Loss falls on assistant tokens only, for any chat
template: `llmft.masking` finds each assistant message's characters in the rendering (content, tool calls,
reasoning, end-of-turn token), and tokens whose characters start inside them carry labels.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from llmft import masking
from llmft.errors import DataError
from llmft.schema import (COLUMNS, PREFERENCE, PROMPT_COMPLETION, PROMPT_ONLY, ROW, TEXT, UNPAIRED, example, kind_of,
                          data_files, load_json_rows, raise_problems, row_number, rows_problems)

log = logging.getLogger(__name__)

IGNORE = -100
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class TokenizeReport:
    """What tokenisation did to a split: rows in and out, the examples they made (one per assistant turn where a
    template is trained turn by turn), and why any were dropped or cut."""

    rows_in: int = 0
    rows_out: int = 0
    examples: int = 0
    split_by_turn: int = 0  # rows of an incremental template trained turn by turn (their rendering needed it)
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    tokens: int = 0
    trainable_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)  # tokens per example (kept in run.json as a summary)

    def to_dict(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "examples": self.examples,
                "split_by_turn": self.split_by_turn, "truncated": self.truncated, "dropped": dict(self.dropped),
                "tokens": self.tokens, "trainable_tokens": self.trainable_tokens, **length_summary(self.lengths)}

    def summary(self, name: str) -> str:
        made = f" ({self.examples} examples)" if self.examples != self.rows_out else ""
        loss = f" ({self.trainable_tokens} carry loss)" if self.trainable_tokens else " (prompts: no loss)"
        parts = [f"{name}: {self.rows_out}/{self.rows_in} rows kept{made}, {self.tokens} tokens{loss}"]
        if self.split_by_turn:
            parts.append(f"{self.split_by_turn} rows trained turn by turn (their template rendered them so)")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        parts += [f"{n} dropped: {why}" for why, n in sorted(self.dropped.items())]
        return "; ".join(parts)


def length_summary(lengths: list[int], bins: int = 20) -> dict[str, Any]:
    """Percentiles and a histogram of example lengths in tokens: the report's chart and the estimate's activations
    read them from run.json without the data."""
    if not lengths:
        return {}
    import numpy as np

    arr = np.asarray(lengths)
    counts, edges = np.histogram(arr, bins=min(bins, max(1, len(set(lengths)))))
    return {"length": {"mean": round(float(arr.mean()), 1), **{f"p{q}": int(np.percentile(arr, q))
                                                                 for q in (50, 90, 95, 99)}, "max": int(arr.max())},
            "length_histogram": {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}}


# Loading -------------------------------------------------------------------------------------------------------


def built_splits(source: str) -> tuple[Path, Path | None] | None:
    """(train/, test/ or None) when `source` is the folder `llmft data convert|build` wrote, else None."""
    path = Path(source)
    if (path / "manifest.json").is_file() and (path / "train").is_dir():
        return path / "train", (path / "test" if (path / "test").is_dir() else None)
    return None


def load_rows(source: str) -> datasets.Dataset:
    """Rows from a `save_to_disk` directory, the folder `llmft data convert|build` wrote (its train/ split), a
    .jsonl/.json/.parquet file, or a folder of such files."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory. Give a .jsonl/.json/.parquet file or a dataset dir.")
    if built_splits(source):
        path = built_splits(source)[0]
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:  # a half-copied folder: a shard or its index missing
            raise DataError(f"{path}: an incomplete saved dataset ({type(err).__name__}: {err}). Copy the whole "
                            "folder again, or rebuild it with llmft data convert|build.") from err
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{source}: a DatasetDict without a 'train' split (has {list(loaded)}).")
            loaded = loaded["train"]
        return loaded
    files = (data_files(sorted(p for p in path.iterdir() if p.suffix in FILE_TYPES), path) if path.is_dir()
             else [path])
    kinds = {FILE_TYPES.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) != 1:
        raise DataError(f"{source}: expected .jsonl, .json, .parquet or .txt files of one kind, found "
                        f"{[p.name for p in files]}.")
    if kinds == {"text"}:  # plain-text documents for continued pretraining: a file is one document
        return datasets.Dataset.from_list([{"text": _read_text(p)} for p in files])
    if kinds == {"json"}:  # read here: errors name the file and line, and rows keep exactly their own keys
        rows = [row for p in files for row in load_json_rows(p)]
        if not rows:
            raise DataError(f"{source}: no rows (the file is empty).")
        return as_json_columns(rows)
    try:
        return datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train")
    except Exception as err:  # pyarrow raises many types for bad files; all mean the same here
        raise DataError(f"{source}: cannot be read as a Parquet dataset: {err}") from err


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start + 1}): save the file as UTF-8.") from err


def as_json_columns(rows: list[dict[str, Any]]) -> datasets.Dataset:
    """Rows kept exactly as written: Arrow's own inference would merge the keys of every message, tool call and
    tool schema across rows into one struct, giving each row the others' keys as nulls (which templates render),
    and refuses a column whose type varies between rows."""
    columns = sorted(set().union(*rows))
    features = datasets.Features({c: _json_feature([row.get(c) for row in rows]) for c in columns})
    return datasets.Dataset.from_list([{c: row.get(c) for c in columns} for row in rows], features=features)


SCALARS = {str: "string", bool: "bool", int: "int64", float: "float64"}


def _json_feature(values: list[Any]):
    """A column's feature: its scalar type where every value has one (datasets' Json would read the text "4" back as
    the number 4), else Json (messages, tool calls, a column whose type varies between rows)."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) == 1 and next(iter(kinds)) in SCALARS:
        return datasets.Value(SCALARS[next(iter(kinds))])
    return datasets.Json()


def validate_rows(ds: datasets.Dataset, source: str) -> str:
    """Check every row against the schema; one DataError lists the problems (rows 1-based). Returns the kind."""
    kind = kind_of(ds.column_names, source)
    columns = list(COLUMNS[kind]) + [c for c in ("tools", ROW, "score_chosen", "score_rejected")
                                     if c in ds.column_names]
    raise_problems(source, rows_problems(ds.select_columns(columns), kind))
    return kind


def number_rows(ds: datasets.Dataset) -> datasets.Dataset:
    """Remember each row's 1-based number in its source, so messages name the right row after a shuffled split."""
    return ds if ROW in ds.column_names else ds.add_column(ROW, list(range(1, len(ds) + 1)))


# Tokenisation with loss masks ----------------------------------------------------------------------------------


def tokenize_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict], first_trainable: int = 0,
                      tools: list[dict] | None = None, reasoning: str = "keep") -> list[tuple[list[int], list[int]]]:
    """[(input_ids, labels)] for one conversation: labels IGNORE outside the assistant spans its template's strategy
    finds (`llmft.masking`); one pair, or one per assistant turn for templates trained turn by turn."""
    return encode_messages(tokenizer, messages, first_trainable, tools, reasoning)[0]


def encode_messages(tokenizer, messages, first_trainable=0, tools=None, reasoning="keep"):
    """(tokenize_messages' pairs, whether an incremental template needed this conversation trained turn by turn)."""
    name = tokenizer.name_or_path or "this tokenizer"
    if not tokenizer.is_fast:
        raise DataError(f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; the loss mask "
                        "needs a fast (tokenizers-backed) one. Convert it or load it with use_fast=True.")
    how = masking.masking_for(tokenizer)
    if (tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)) and not how.supports_tools:
        raise DataError(f"the chat template of {name} does not render tool schemas, tool calls and tool results, "
                        "so tool use cannot be trained with it. Use a model whose template supports tools, or leave "
                        "the tool rows out.")
    prepared = masking.prepare(messages, how, reasoning, tokenizer.name_or_path)
    try:
        rendered, split = masking.examples(tokenizer, how, prepared, tools, first_trainable)
    except DataError:
        raise
    except Exception as err:  # jinja's TemplateError, and what templates raise on data they cannot take
        raise DataError(f"the chat template of {name} refused this conversation: {type(err).__name__}: {err}") from err
    return [_label(tokenizer, text, spans) for text, spans in rendered], split


def _label(tokenizer, text: str, spans) -> tuple[list[int], list[int]]:
    """Tokens with any character inside an answer's span carry loss (a token may straddle where an answer starts,
    when the generation prompt ends inside it)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(begin < end and finish > start for start, end in spans) else IGNORE
              for token, (begin, finish) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return encoded["input_ids"], labels


def tokenize_text_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str):
    """Plain prompt/completion text (no chat template): loss on the completion and the EOS after it."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def tokenize_row(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, kind: str, reasoning: str = "keep"):
    """[(input_ids, labels)] for one row of either kind."""
    return _encode_row(row, tokenizer, kind, reasoning)[0]


def _encode_row(row, tokenizer, kind, reasoning):
    ex = example(row, kind)
    if ex.plain_text:
        return [tokenize_text_pair(tokenizer, row["prompt"], row["completion"])], False
    return encode_messages(tokenizer, ex.messages, ex.first_trainable, ex.tools, reasoning)


def _prepare(batch, indices, tokenizer, kind, max_length, overlong, reasoning):
    """A batch of rows -> their examples (more than the rows when a template is trained turn by turn)."""
    out = {"input_ids": [], "labels": [], "status": [], "example_id": [], "split": []}
    for index, values in zip(indices, zip(*batch.values())):
        row = dict(zip(batch, values))
        try:
            pairs, split = _encode_row(row, tokenizer, kind, reasoning)
        except DataError as err:
            raise DataError(f"{example_name(row, index)}: {err}") from err
        for turn, (input_ids, labels) in enumerate(pairs):
            input_ids, labels, status = fit_example(input_ids, labels, max_length, overlong)
            name = example_name(row, index) + (f", turn {turn + 1}" if len(pairs) > 1 else "")
            for key, value in (("input_ids", input_ids), ("labels", labels), ("status", status),
                               ("example_id", name), ("split", split and turn == 0)):
                out[key].append(value)
    return out


def fit_example(input_ids, labels, max_length, overlong):
    """An example within max_length: dropped, or truncated keeping whichever end holds more of its trained tokens
    (the end, for an answer after a long history), with its status."""
    status = "ok"
    if max_length is not None and len(input_ids) > max_length:
        if overlong == "drop":
            return input_ids, labels, "longer than max_length (data.overlong: drop)"
        head = sum(t != IGNORE for t in labels[:max_length])
        tail = sum(t != IGNORE for t in labels[-max_length:])
        cut = slice(None, max_length) if head >= tail else slice(-max_length, None)
        input_ids, labels, status = input_ids[cut], labels[cut], "truncated"
    if all(t == IGNORE for t in labels):
        status = "no trainable token left after truncation" if status == "truncated" else "no trainable token"
    return input_ids, labels, status


def example_name(row: dict[str, Any], index: int) -> str:
    """How logs name an example: its source row number, and its own `id` field when it has one."""
    number = f"row {row_number(row, index)}"
    return f"{number} (id {row['id']})" if row.get("id") is not None else number


def prepare_dataset(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None,
                    overlong: str, source: str, num_proc: int | None = None, reasoning: str = "keep"):
    """Validate, tokenize and filter one split. Returns (dataset with input_ids/labels, TokenizeReport)."""
    kind = validate_rows(ds, source)
    if kind in (PREFERENCE, UNPAIRED):
        raise DataError(f"{source}: holds {kind} rows, which supervised fine-tuning does not train on. Set "
                        "training.stage: dpo or kto (or reward), or train SFT on conversations.")
    if kind == TEXT:
        raise DataError(f"{source}: holds raw text rows (a 'text' column), which supervised fine-tuning does not "
                        "train on. Set training.stage: pretrain to continue pretraining on them.")
    if kind == PROMPT_ONLY:
        raise DataError(f"{source}: has a 'prompt' column but no answers (columns: {sorted(c for c in ds.column_names if c != ROW)}), which "
                        "supervised fine-tuning cannot learn from. If the answers are in another column, convert "
                        "with llmft data convert --format columns --prompt-field prompt --completion-field COLUMN; "
                        "to train on prompts with rewards, set training.stage: grpo.")
    try:
        mapped = ds.map(
            _prepare,
            with_indices=True,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer, "kind": kind, "max_length": max_length, "overlong": overlong,
                       "reasoning": reasoning},
            remove_columns=ds.column_names,
            num_proc=num_proc,
            desc=f"Tokenizing {Path(source).name}",
        )
    except DataError as err:
        raise DataError(f"{source}: {err}") from err
    report = TokenizeReport(rows_in=len(ds), split_by_turn=sum(mapped["split"]))
    statuses = Counter(mapped["status"])
    report.truncated = statuses.pop("truncated", 0)
    statuses.pop("ok", None)
    report.dropped = statuses
    kept = mapped.filter(lambda s: s in ("ok", "truncated"), input_columns="status").remove_columns(["status", "split"])
    report.examples = len(kept)
    report.rows_out = len({name.split(", turn ")[0] for name in kept["example_id"]})
    report.lengths = [len(ids) for ids in kept["input_ids"]]
    report.tokens = sum(report.lengths)
    report.trainable_tokens = sum(sum(t != IGNORE for t in labels) for labels in kept["labels"])
    if report.examples == 0:
        raise DataError(f"{source}: no example left ({report.summary('all')}). Raise the maximum length "
                        "(training.max_length; llmft eval --max-length) or truncate instead of dropping "
                        "(data.overlong: truncate; llmft eval --overlong truncate).")
    return kept, report


# Preference pairs and unpaired answers ---------------------------------------------------------------------------


def answer_ids(tokenizer, row: dict[str, Any], kind: str, answer: str = "chosen",
               reasoning: str = "keep") -> tuple[list[int], list[int]]:
    """(the tokens before the answer, the answer's own tokens) of a prompt followed by one answer: the same
    rendering and loss mask as supervised training, so an answer is its content, tool calls, kept reasoning and
    end-of-turn token, and nothing of the template around it."""
    ex = example(row, kind, answer) if kind == PREFERENCE else example(row, PROMPT_COMPLETION)
    pairs, _ = encode_messages(tokenizer, ex.messages, ex.first_trainable, ex.tools, reasoning)
    ids, labels = pairs[-1]  # the last assistant turn: the answer (earlier ones belong to the prompt)
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    if not trained:
        raise DataError(f"the {answer} answer renders to no token to train on")
    return ids[:trained[0]], ids[trained[0]: trained[-1] + 1]


def encode_pair(tokenizer, row: dict[str, Any], reasoning: str = "keep") -> dict[str, Any]:
    """prompt_ids, chosen_ids and rejected_ids of a preference row (TRL's pre-tokenized pair). Where the template
    renders the prompt differently before the two answers, the shared prefix is the prompt and each answer takes
    the rest (`prompt_differs`)."""
    prompt_c, chosen = answer_ids(tokenizer, row, PREFERENCE, "chosen", reasoning)
    prompt_r, rejected = answer_ids(tokenizer, row, PREFERENCE, "rejected", reasoning)
    shared = len(os.path.commonprefix([prompt_c, prompt_r]))
    return {"prompt_ids": prompt_c[:shared], "chosen_ids": prompt_c[shared:] + chosen,
            "rejected_ids": prompt_r[shared:] + rejected, "prompt_differs": shared != len(prompt_c)}


def fit_answers(prompt: list[int], answers: list[list[int]], max_length: int | None, overlong: str):
    """A prompt and its answers within max_length (each answer after the prompt): dropped, or truncated keeping the
    prompt's end (nearest the answer) and the answers' start; with their status."""
    longest = max(len(a) for a in answers)
    if max_length is None or len(prompt) + longest <= max_length:
        return prompt, answers, "ok"
    if overlong == "drop":
        return prompt, answers, "longer than max_length (data.overlong: drop)"
    keep_answer = min(longest, max_length - min(len(prompt), max_length // 2))
    keep_prompt = max_length - keep_answer
    return prompt[len(prompt) - keep_prompt:] if keep_prompt else [], [a[:keep_answer] for a in answers], "truncated"


def _prepare_pairs(batch, indices, tokenizer, kind, max_length, overlong, reasoning):
    """A batch of preference rows -> pre-tokenized pairs (DPO, ORPO, SimPO, reward), or of unpaired rows ->
    pre-tokenized answers with their labels (KTO)."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids") if kind == PREFERENCE else ("prompt_ids", "completion_ids")
    out = {key: [] for key in (*keys, "label", "status", "example_id", "prompt_differs")}
    for index, values in zip(indices, zip(*batch.values())):
        row = dict(zip(batch, values))
        name = example_name(row, index)
        try:
            if kind == PREFERENCE:
                encoded = encode_pair(tokenizer, row, reasoning)
            else:
                prompt, completion = answer_ids(tokenizer, row, UNPAIRED, "completion", reasoning)
                encoded = {"prompt_ids": prompt, "completion_ids": completion, "prompt_differs": False}
        except DataError as err:
            raise DataError(f"{name}: {err}") from err
        prompt, answers, status = fit_answers(encoded["prompt_ids"], [encoded[k] for k in keys[1:]], max_length,
                                              overlong)
        for key, value in zip(keys, (prompt, *answers)):
            out[key].append(value)
        out["label"].append(bool(row.get("label", True)))
        out["status"].append(status)
        out["example_id"].append(name)
        out["prompt_differs"].append(encoded["prompt_differs"])
    return out


def unpair(ds: datasets.Dataset) -> datasets.Dataset:
    """Preference pairs as unpaired answers for KTO: each pair's chosen answer desirable, its rejected one not."""
    def split(batch):
        out = {"prompt": [], "completion": [], "label": [], "tools": [], ROW: []}
        for i in range(len(batch["prompt"])):
            for answer, label in (("chosen", True), ("rejected", False)):
                out["prompt"].append(batch["prompt"][i])
                out["completion"].append(batch[answer][i])
                out["label"].append(label)
                out["tools"].append(batch["tools"][i] if "tools" in batch else None)
                out[ROW].append(batch[ROW][i] if ROW in batch else i + 1)
        return out

    return ds.map(split, batched=True, remove_columns=ds.column_names, desc="Unpairing preference rows")


def prepare_preference(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None,
                       overlong: str, source: str, want: str, num_proc: int | None = None,
                       reasoning: str = "keep"):
    """Validate and tokenize one split of preference rows (want PREFERENCE) or unpaired answers (want UNPAIRED;
    pairs are unpaired, as KTO's authors do). Returns (pre-tokenized dataset, TokenizeReport)."""
    kind = validate_rows(ds, source)
    if kind == PREFERENCE and want == UNPAIRED:
        ds, kind = unpair(ds), UNPAIRED
    if kind != want:
        needs = "preference pairs (prompt, chosen, rejected)" if want == PREFERENCE else \
            "unpaired answers (prompt, completion, label) or preference pairs"
        raise DataError(f"{source}: holds {kind} rows; this stage trains on {needs}. Convert such data with "
                        "llmft data convert (formats: pairs, sharegpt_pairs, hh, ultrafeedback, oasst_pairs, kto).")
    try:
        mapped = ds.map(_prepare_pairs, with_indices=True, batched=True, remove_columns=ds.column_names,
                        fn_kwargs={"tokenizer": tokenizer, "kind": kind, "max_length": max_length,
                                   "overlong": overlong, "reasoning": reasoning},
                        num_proc=num_proc, desc=f"Tokenizing {Path(source).name}")
    except DataError as err:
        raise DataError(f"{source}: {err}") from err
    differs = sum(mapped["prompt_differs"])
    if differs:
        log.warning("%s: in %d row(s) the chat template renders the prompt differently before the two answers; the "
                    "shared part is the prompt, the rest goes with each answer", source, differs)
    report = TokenizeReport(rows_in=len(ds))
    statuses = Counter(mapped["status"])
    report.truncated = statuses.pop("truncated", 0)
    statuses.pop("ok", None)
    report.dropped = statuses
    kept = mapped.filter(lambda s: s in ("ok", "truncated"), input_columns="status")
    kept = kept.remove_columns(["status", "prompt_differs"] + (["label"] if kind == PREFERENCE else []))
    answers = [k for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in kept.column_names]
    report.examples = report.rows_out = len(kept)
    columns = {key: [len(ids) for ids in kept[key]] for key in answers + ["prompt_ids"]}
    report.trainable_tokens = sum(sum(columns[key]) for key in answers)
    report.tokens = report.trainable_tokens + len(answers) * sum(columns["prompt_ids"])
    report.lengths = [p + max(columns[key][i] for key in answers) for i, p in enumerate(columns["prompt_ids"])]
    if report.examples == 0:
        raise DataError(f"{source}: no example left ({report.summary('all')}). Raise training.max_length, or "
                        "truncate instead of dropping (data.overlong: truncate).")
    return kept, report


def load_splits(train_source: str, eval_source: str | None, eval_fraction: float, seed: int,
                max_train: int | None = None, max_eval: int | None = None):
    """Raw train and eval rows (eval None when there is none): eval_source, else the test/ split of a built dataset
    given as train_source, else a seeded share of train."""
    train = number_rows(load_rows(train_source))
    built = built_splits(train_source)
    if not eval_source and built and built[1] is not None:
        log.info("%s is a built dataset: training on its train/ split, evaluating on its test/ split", train_source)
        eval_source = str(built[1])
    evaluation = number_rows(load_rows(eval_source)) if eval_source else None
    if evaluation is None and eval_fraction > 0:
        if len(train) < 2:
            raise DataError(f"{train_source}: {len(train)} row(s) cannot be split for evaluation; set data.eval_fraction: 0.")
        train, evaluation = held_out_split(train, eval_fraction, seed, train_source)
    if max_train is not None:
        train = train.select(range(min(max_train, len(train))))
    if evaluation is not None and max_eval is not None:
        evaluation = evaluation.select(range(min(max_eval, len(evaluation))))
    return train, evaluation


def held_out_split(rows: datasets.Dataset, fraction: float, seed: int, source: str):
    """(train, eval): a seeded share held out, rows of one prompt on one side (pairs from one UltraFeedback row, KTO
    answers to one prompt, threads of one OASST tree). Where every prompt is its own, datasets' own split."""
    from llmft.dataset.clean import group_keys, held_out_groups

    keys = group_keys(rows)
    if len(set(keys)) == len(keys):
        parts = rows.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]
    held = held_out_groups(keys, fraction, seed)
    if len(held) >= len(rows):
        raise DataError(f"{source}: its rows answer {len(set(keys))} prompt(s); holding out data.eval_fraction "
                        f"{fraction} of them leaves none to train on. Lower it, or give data.eval_data.")
    chosen = set(held)
    log.info("%s: held out %d row(s) of %d prompt(s), every row of a prompt on one side", source, len(held),
             len({keys[i] for i in held}))
    return rows.select([i for i in range(len(rows)) if i not in chosen]), rows.select(held)


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Documents as continued pretraining trains on them: with the tokens their tokenizer adds (BOS where it adds
    one, as at pretraining and in perplexity), then one end-of-text token; [] for a document with no text."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-text token to separate documents with.")
    out = []
    for text, ids in zip(texts, tokenizer(texts)["input_ids"]):
        if bos is not None and ids[:2] == [bos, bos]:
            ids = ids[1:]  # the text opened with the BOS itself
        out.append([] if not text.strip() else ids if ids and ids[-1] == eos else ids + [eos])
    return out


def text_blocks(rows: datasets.Dataset, tokenizer, block: int, source: str):
    """Documents (`document_ids`) -> blocks of `block` tokens. Documents with no text (empty, or only whitespace) are
    counted as dropped, never silently lost."""
    if validate_rows(rows, source) != TEXT:
        raise DataError(f"{source}: training.stage pretrain trains on raw text: rows with a 'text' column (convert "
                        "files with llmft data convert --format text). For conversations use training.stage: sft.")
    if tokenizer.eos_token_id is None:
        raise DataError(f"{source}: the tokenizer has no end-of-text token to separate documents with.")
    report, stream, starts = TokenizeReport(rows_in=len(rows)), [], []
    encoded = rows.map(lambda batch: {"ids": document_ids(tokenizer, batch[TEXT])},
                       batched=True, remove_columns=rows.column_names, desc=f"Tokenizing {source.split('/')[-1]}")
    numbers = rows[ROW] if ROW in rows.column_names else range(1, len(rows) + 1)
    for ids, number in zip(encoded["ids"], numbers):
        if not ids:
            report.dropped["document with no text"] += 1
            continue
        starts.append((len(stream), number))
        stream += ids
    report.rows_out = len(starts)
    if not stream:
        raise DataError(f"{source}: no document with any text ({report.rows_in} rows).")
    out = {"input_ids": [], "labels": [], "example_id": []}
    first = 0
    for number, begin in enumerate(range(0, len(stream), block), start=1):
        ids = stream[begin: begin + block]
        if len(ids) < 2:  # only the last document's end-of-text token: nothing to predict from
            break
        while first + 1 < len(starts) and starts[first + 1][0] <= begin:
            first += 1
        last = first
        while last + 1 < len(starts) and starts[last + 1][0] < begin + len(ids):
            last += 1
        rows_in_block = [str(number_) for _, number_ in starts[first: last + 1]]
        named = ", ".join(rows_in_block[:4]) + (f" and {len(rows_in_block) - 4} more" if len(rows_in_block) > 4 else "")
        out["input_ids"].append(ids)
        out["labels"].append(list(ids))
        out["example_id"].append(f"block {number} (row{'s' if len(rows_in_block) > 1 else ''} {named})")
    report.examples = len(out["input_ids"])
    report.lengths = [len(ids) for ids in out["input_ids"]]
    report.tokens = report.trainable_tokens = sum(report.lengths)
    return datasets.Dataset.from_dict(out), report
