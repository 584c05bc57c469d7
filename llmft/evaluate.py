"""Evaluation: generation metrics on held-out prompts, during training (a Trainer callback) and after it.

Metrics run offline through their own packages (`evaluate.load` fetches metric scripts from the Hub at run time):
  exact_match  normalised string equality after an answer extractor (0-1)
  rouge_l      ROUGE-L F1, rouge_score package (0-1)
  bleu, chrf   corpus BLEU and chrF, sacrebleu package (0-100, as sacrebleu reports them)
Answer extractors: none | gsm8k (the number after '####', else the last number) | last_number | regex:PATTERN.
"""

from __future__ import annotations

import json
import math
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from llmft.config import EVAL_METRICS as METRICS
from llmft.data import schema_of
from llmft.model import generate_texts

NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


# Prompts and references ----------------------------------------------------------------------------------------


def prompts_and_references(rows: datasets.Dataset, limit: int) -> list[dict[str, Any]]:
    """Each held-out row as (prompt, reference): the conversation before its last assistant message, and that message."""
    schema = schema_of(rows, "eval data")
    items = []
    for row in rows.select(range(min(limit, len(rows)))):
        if schema == "messages":
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            items.append({"prompt": messages[:last], "reference": messages[last]["content"]})
        elif isinstance(row["prompt"], str):
            items.append({"prompt": row["prompt"], "reference": row["completion"]})
        else:
            answers = [m["content"] for m in row["completion"] if m["role"] == "assistant"]
            items.append({"prompt": row["prompt"], "reference": answers[-1]})
    return items


def with_few_shot(items: list[dict[str, Any]], shots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat prompts preceded by worked examples as earlier user/assistant turns."""
    turns = [m for shot in shots for m in (*shot["prompt"][-1:], {"role": "assistant", "content": shot["reference"]})]
    return [{**it, "prompt": turns + list(it["prompt"])} for it in items]


# Metrics -------------------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lower case, no surrounding punctuation, single spaces: formatting noise is not what exact match tests."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(string.punctuation + " ")


def extract(text: str, extractor: str) -> str:
    if extractor == "none":
        return text
    if extractor == "gsm8k" and "####" in text:
        return text.split("####")[-1].strip().replace(",", "")
    if extractor in ("gsm8k", "last_number"):
        numbers = NUMBER.findall(text)
        return numbers[-1].replace(",", "").rstrip(".") if numbers else ""
    if extractor.startswith("regex:"):
        match = re.search(extractor[len("regex:"):], text)
        return (match.group(1) if match and match.groups() else match.group(0) if match else "")
    raise ValueError(f"unknown answer extractor '{extractor}': use none, gsm8k, last_number or regex:PATTERN")


def matches(prediction: str, reference: str, extractor: str = "none") -> bool:
    """Exact match after extraction; an answer the extractor finds nothing in never matches."""
    answer, expected = normalise(extract(prediction, extractor)), normalise(extract(reference, extractor))
    return bool(answer) and answer == expected


def score(predictions: list[str], references: list[str], metrics: list[str], extractor: str = "none") -> dict[str, float]:
    out: dict[str, float] = {}
    if "exact_match" in metrics:
        hits = [matches(p, r, extractor) for p, r in zip(predictions, references)]
        out["exact_match"] = sum(hits) / len(hits)
    if "rouge_l" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        out["rouge_l"] = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        if "bleu" in metrics:
            out["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
        if "chrf" in metrics:
            out["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    return out


# Generation ----------------------------------------------------------------------------------------------------


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list, max_new_tokens: int,
             batch_size: int, desc: str = "Generating") -> list[str]:
    """Greedy answers, batched; chat prompts go through the tokenizer's chat template, text prompts as they are."""
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = prompts[start : start + batch_size]
        chat = not isinstance(batch[0], str)
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if chat else p
                 for p in batch]
        answers += generate_texts(model, tokenizer, texts, max_new_tokens=max_new_tokens,
                                  add_special_tokens=not chat)[0]
    return answers


def generation_eval(model, tokenizer, items: list[dict[str, Any]], max_new_tokens: int, batch_size: int,
                    desc: str, metrics: list[str] = ("exact_match",), extractor: str = "none") -> dict[str, Any]:
    """Metrics over `items`, with every answer kept for the side-by-side table."""
    answers = generate(model, tokenizer, [it["prompt"] for it in items], max_new_tokens, batch_size, desc)
    references = [it["reference"] for it in items]
    correct = [matches(a, r, extractor) for a, r in zip(answers, references)]
    return {**score(answers, references, list(metrics), extractor), "answers": answers, "correct": correct}


def prompt_text(prompt) -> str:
    """The last user turn of a prompt, for display."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


# Forgetting check ----------------------------------------------------------------------------------------------


def general_texts() -> list[str]:
    """Paragraphs of general English shipped with llmft (written for it), for the forgetting check."""
    text = resources.files("llmft").joinpath("resources/general_text.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 8) -> float:
    """Token-weighted perplexity of plain texts (no chat template)."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total_nll += nll.item()
            total_tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


# The in-training hook ------------------------------------------------------------------------------------------


class GenerationEvalCallback(TrainerCallback):
    """At every Trainer evaluation: generate on fixed held-out prompts, score, check forgetting, write samples.

    The scores join the Trainer's eval metrics (eval_exact_match, eval_rouge_l, eval_bleu, eval_chrf,
    eval_forgetting_ppl_ratio), so `metric_for_best_model`, early stopping and the trackers see them. Generation
    runs on the main process; the scores are broadcast so every process takes the same early-stopping decision.
    """

    def __init__(self, tokenizer, items, cfg, out_dir: Path):
        self.tokenizer, self.items, self.cfg, self.out_dir = tokenizer, items, cfg, out_dir
        self.trainer = None  # set after the Trainer is built, to log through it
        self.texts = general_texts() if cfg.forgetting_check else []
        self.base_ppl: float | None = None
        self.last: dict[str, Any] | None = None

    def _forgetting(self, model) -> dict[str, float]:
        if not self.texts:
            return {}
        ppl = perplexity(model, self.tokenizer, self.texts)
        if self.base_ppl is None:  # the first measurement is the model before training
            self.base_ppl = ppl
        return {"eval_general_ppl": ppl, "eval_forgetting_ppl_ratio": ppl / self.base_ppl}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.texts and self.base_ppl is None and state.is_world_process_zero:
            self._forgetting(model)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        new: dict[str, float] = {}
        if state.is_world_process_zero:
            if self.items:
                result = generation_eval(model, self.tokenizer, self.items, self.cfg.max_new_tokens,
                                         self.cfg.generation_batch_size, f"Generating (step {state.global_step})",
                                         self.cfg.metrics, self.cfg.answer_extractor)
                self.last = result
                new.update({f"eval_{k}": v for k, v in result.items() if k in METRICS})
                self._write_samples(state.global_step, result)
            new.update(self._forgetting(model))
        new = _broadcast(new)
        metrics.update(new)
        if new and self.trainer is not None:
            self.trainer.log(new)

    def _write_samples(self, step: int, result: dict[str, Any]) -> None:
        folder = self.out_dir / "eval_samples"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"step-{step}.jsonl").open("w", encoding="utf-8") as f:
            for it, answer, ok in zip(self.items, result["answers"], result["correct"]):
                f.write(json.dumps({"prompt": prompt_text(it["prompt"]), "reference": it["reference"],
                                    "generation": answer, "exact_match": ok}, ensure_ascii=False) + "\n")


def _broadcast(values: dict[str, float]) -> dict[str, float]:
    """Rank 0's values on every rank (a no-op in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    box = [values]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# `llmft eval` --------------------------------------------------------------------------------------------------


@torch.no_grad()
def assistant_loss(model, tokenizer, rows: datasets.Dataset, max_length: int | None, batch_size: int = 8) -> float:
    """Mean loss over the tokens that carry loss in training (assistant tokens), token-weighted."""
    from llmft.data import prepare_dataset

    prepared, _ = prepare_dataset(rows, tokenizer, max_length, "truncate", "eval data")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(prepared), batch_size):
            batch = prepared[start : start + batch_size]
            width = max(len(ids) for ids in batch["input_ids"])
            ids = torch.full((len(batch["input_ids"]), width), tokenizer.pad_token_id)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, (row_ids, row_labels) in enumerate(zip(batch["input_ids"], batch["labels"])):
                ids[i, : len(row_ids)], labels[i, : len(row_ids)] = torch.tensor(row_ids), torch.tensor(row_labels)
                mask[i, : len(row_ids)] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits
            targets = labels[:, 1:].to(model.device)
            total += torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                       targets.reshape(-1), ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return total / count


def load_for_eval(target: str):
    """(model, tokenizer, run info or None) for a run directory (adapter on its base, or full model) or a model."""
    from llmft.config import ModelConfig, PeftSettings
    from llmft.model import load_model, load_run_model, load_tokenizer

    path = Path(target)
    if (path / "run.json").exists():
        from llmft.run_dir import read_run

        run = read_run(path)
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))  # the run's own tokenizer and template
        return load_run_model(path, run["run"]["base_model"]), tokenizer, run
    cfg = ModelConfig(name_or_path=target, dtype="float32")
    return load_model(cfg, PeftSettings(method="full")), load_tokenizer(cfg), None


def run_eval_rows(run: dict[str, Any]):
    """The held-out rows a run was evaluated on: its eval file, or the same seeded split of its training data.

    Warns when the data file changed since training (its sha256 differs from the run's fingerprint).
    """
    import logging

    from llmft.data import file_fingerprint, load_splits

    data, seed = run["recipe"]["data"], run["recipe"]["training"]["seed"]
    if data["eval_data"] is None and not data["eval_fraction"]:
        raise ValueError("the run held out no data (eval_fraction 0, no eval_data): pass --data FILE.")
    source = data["eval_data"] or data["train_data"]
    recorded = (run["run"]["data"]["eval"] or {}).get("sha256")
    if recorded and Path(source).exists() and file_fingerprint(source)["sha256"] != recorded:
        logging.getLogger(__name__).warning("%s changed since training (sha256 differs from run.json)", source)
    _, rows = load_splits(data["train_data"], data["eval_data"], data["eval_fraction"], seed,
                          data["max_train_examples"], data["max_eval_examples"])
    return (source if data["eval_data"] else f"{source} (eval_fraction {data['eval_fraction']}, seed {seed})"), rows


def evaluate_model(model, tokenizer, rows, items, opts) -> dict[str, Any]:
    """Loss, generation metrics and general-text perplexity of one model, with its answers."""
    results: dict[str, Any] = {}
    if rows is not None:
        results["eval_loss"] = assistant_loss(model, tokenizer, rows, opts.max_length)
    if items:
        gen = generation_eval(model, tokenizer, items, opts.max_new_tokens, opts.batch_size, "Generating",
                              opts.metrics, opts.answer_extractor)
        results.update({k: v for k, v in gen.items() if k in METRICS})
        results["answers"] = gen["answers"]
    results["general_ppl"] = perplexity(model, tokenizer, general_texts())
    if opts.lm_eval_tasks:  # last: merging an adapter changes the model object
        results.update(lm_eval_results(model, tokenizer, opts.lm_eval_tasks, opts.lm_eval_include or [],
                                       opts.lm_eval_limit, opts.batch_size, opts.lm_eval_chat_template))
    return results


def lm_eval_results(model, tokenizer, tasks: list[str], include: list[str], limit: int | None, batch_size: int,
                    chat_template: bool) -> dict[str, float]:
    """lm-evaluation-harness on the loaded model: standard tasks, llmft's own, or YAML tasks over local files.

    Task folders (llmft's shipped ones and `include`) are copied with their `data_files` made absolute, since
    lm-eval resolves them against the working directory. Scores come back as {"lm_eval/TASK/METRIC": value}.
    """
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if hasattr(model, "merge_and_unload"):  # lm-eval takes a plain transformers model: merge the adapter in memory
        model = model.merge_and_unload()
    shipped = str(resources.files("llmft").joinpath("resources/lm_eval_tasks"))
    with tempfile.TemporaryDirectory(prefix="llmft-lm-eval-") as tmp:
        folders = [_resolve_task_files(Path(folder), Path(tmp) / str(i)) for i, folder in enumerate([shipped, *include])]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=folders), limit=limit,
                                 apply_chat_template=chat_template, log_samples=False)
    scores = {}
    for task, values in output["results"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and "stderr" not in key and key not in ("alias", "sample_len"):
                scores[f"lm_eval/{task}/{key.split(',')[0]}"] = float(value)
    return scores


def _resolve_task_files(folder: Path, target: Path) -> str:
    """A copy of a task folder whose YAML files name their local data files by absolute path."""
    import shutil

    import yaml

    shutil.copytree(folder, target)
    for path in target.glob("*.yaml"):
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError:  # lm-eval's own tags (!function ...): leave the file as it is
            continue
        files = ((spec or {}).get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            spec["dataset_kwargs"]["data_files"] = {k: str((folder / v).resolve()) if not Path(v).is_absolute() else v
                                                    for k, v in files.items()}
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(target)


def report_markdown(name: str, tuned: dict[str, Any], baseline: dict[str, Any] | None, baseline_name: str | None) -> str:
    keys = [k for k in ("eval_loss", *METRICS, "general_ppl") if k in tuned] + sorted(k for k in tuned if k.startswith("lm_eval/"))
    lines = [f"# Evaluation of {name}", ""]
    if baseline is None:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {tuned[k]:.4f} |" for k in keys]
    else:
        lines += [f"| metric | {baseline_name} (baseline) | {name} | delta |", "|---|---|---|---|"]
        lines += [f"| {k} | {baseline[k]:.4f} | {tuned[k]:.4f} | {tuned[k] - baseline[k]:+.4f} |" for k in keys]
    lines += ["", "Lower is better for eval_loss and general_ppl; higher for the others."]
    return "\n".join(lines) + "\n"
