"""Evaluation: generation metrics on held-out prompts, during training (a Trainer callback) and after it
(`llmft eval`), held-out loss, the forgetting check, and lm-evaluation-harness.

Built-in metrics run offline through their own packages:
  exact_match  normalised string equality after an answer extractor (0-1)
  rouge_l      ROUGE-L F1, rouge_score package (0-1)
  bleu, chrf   corpus BLEU and chrF, sacrebleu package (0-100, as sacrebleu reports them)
`evaluate:ID` names any metric of the `evaluate` library (`evaluate.load(ID)`: a Hub id, or the path of a local
metric script); it is loaded before anything runs, so an unreachable one fails at once.
Answer extractors: none | gsm8k (the number after '####', else the last number) | last_number | regex:PATTERN.
Every score is named as the Trainer names eval metrics: eval_exact_match, eval_rouge_l, eval_<metric>_<key>.
"""

from __future__ import annotations

import logging
import math
import numbers as numbers_
from decimal import Decimal
import re
import string
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from llmft import run_dir
from llmft.config import EVAL_METRICS, GenerationEval
from llmft.errors import ConfigError, DataError
from llmft.judge import JudgeOptions
from llmft.model import generate_texts
from llmft.schema import (PREFERENCE, PROMPT_ONLY, TEXT, UNPAIRED, clean_tools, kind_of, prompt_and_reference,
                          without_reasoning)

log = logging.getLogger(__name__)
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
# A number opening the text after ####, not the start of a fraction, time, date, exponent or percentage ("1/2")
ANSWER_NUMBER = re.compile(r"\s*\$?\s*(-?\d[\d,]*\.?\d*)(?![\d/:%eE]|-\d)")
GSM8K_STRICT = r"regex:#### (\-?[0-9\.\,]+)"  # lm-evaluation-harness's strict-match: the answer after ####
EXTERNAL = "evaluate:"


# Prompts and references ----------------------------------------------------------------------------------------


def prompts_and_references(rows: datasets.Dataset, limit: int) -> list[dict[str, Any]]:
    """The first `limit` held-out rows with an answer to score, as (prompt, reference): the conversation before its
    last learned assistant message (not one of weight 0; or the prompt text), and that message."""
    kind = kind_of(rows.column_names, "eval data")
    if kind == TEXT:  # raw text asks no question
        return []
    items = []
    for row in rows:
        if len(items) == limit:
            break
        if kind == UNPAIRED and not row["label"]:  # an undesirable answer is no reference
            continue
        prompt, reference = prompt_and_reference(row, kind)
        if reference.strip():  # a conversation ending on a tool call has no answer text to score
            items.append({"prompt": prompt, "reference": reference, "tools": clean_tools(row.get("tools"))})
    return items


def with_few_shot(items: list[dict[str, Any]], shots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompts preceded by worked examples: earlier user/assistant turns for chat prompts, earlier prompt and
    answer paragraphs for plain-text prompts."""
    text_items = {isinstance(it["prompt"], str) for it in items}
    text_shots = {isinstance(shot["prompt"], str) for shot in shots}
    if len(text_items | text_shots) > 1:
        raise DataError("the few-shot examples and the evaluated rows are of different kinds (plain prompt/completion "
                        "text and chat messages): give worked examples of the same kind as the rows evaluated.")
    if items and isinstance(items[0]["prompt"], str):
        text = "".join(f"{shot['prompt']}{shot['reference']}\n\n" for shot in shots)
        return [{**it, "prompt": text + it["prompt"]} for it in items]
    turns = [m for shot in shots for m in (*shot["prompt"][-1:], {"role": "assistant", "content": shot["reference"]})]
    return [{**it, "prompt": _after_system(it["prompt"], turns)} for it in items]


def _after_system(prompt: list[dict[str, Any]], turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The worked examples after the prompt's system message, if it has one (templates want the system first)."""
    head = 1 if prompt and prompt[0]["role"] == "system" else 0
    return list(prompt[:head]) + turns + list(prompt[head:])


def eval_items(rows, settings: GenerationEval, shots=None) -> list[dict[str, Any]]:
    """The generation eval's prompts: the first num_generate held-out rows, after few_shot rows of `shots`."""
    if rows is None or not settings.num_generate:
        return []
    items = prompts_and_references(rows, settings.num_generate)
    if settings.few_shot:
        if shots is None:
            raise DataError("eval.few_shot needs rows to take the worked examples from.")
        items = with_few_shot(items, prompts_and_references(shots, settings.few_shot))
    return items


# Metrics -------------------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lower case, no surrounding punctuation, single spaces: formatting noise is not what exact match tests."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(string.punctuation + " ")


def extract(text: str, extractor: str) -> str:
    if extractor == "none":
        return text
    if extractor == "gsm8k" and "####" in text:  # the number after the last ####, whatever words follow it
        after = text.split("####")[-1].replace("\u2212", "-")
        number = ANSWER_NUMBER.match(after)
        return number.group(1).replace(",", "").rstrip(".") if number else after.strip().replace(",", "")
    if extractor in ("gsm8k", "last_number"):
        numbers = NUMBER.findall(text)
        return numbers[-1].replace(",", "").rstrip(".") if numbers else ""
    if extractor.startswith("regex:"):
        match = re.search(extractor[len("regex:"):], text)
        if not match:
            return ""
        return next((group for group in match.groups() if group is not None), "") if match.groups() else match.group(0)
    raise ValueError(f"unknown answer extractor '{extractor}': use none, gsm8k, last_number or regex:PATTERN")


def matches(prediction: str, reference: str, extractor: str = "none") -> bool:
    """Exact match after extraction; an answer the extractor finds nothing in never matches."""
    return _same(extract(prediction, extractor), extract(reference, extractor))


def _same(answer: str, expected: str) -> bool:
    numbers = _number(answer), _number(expected)
    if None not in numbers:  # 72 == 72.0 == 72.00, and -5 != 5 (normalise strips a sign as punctuation)
        return numbers[0] == numbers[1]
    answer, expected = normalise(answer), normalise(expected)
    return bool(answer) and answer == expected


NUMERIC = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d*)?")  # 1234, 1,234, 72.0 (not 1,5 or 1_000)


def _number(text: str) -> Decimal | None:
    """A plain decimal number written the usual ways, else None (compared as text then)."""
    text = text.strip()
    text = text[:-1] if text.endswith(".") else text  # the full stop of a sentence
    if not text.isascii() or not NUMERIC.fullmatch(text):
        return None
    return Decimal(text.replace(",", ""))


def load_metrics(names: list[str]) -> dict[str, Any]:
    """The `evaluate:` metrics among `names`, loaded; a ConfigError naming the metric and the fix if one cannot be."""
    loaded = {}
    for name in names:
        if name.startswith(EXTERNAL):
            import evaluate

            ident = name[len(EXTERNAL):]
            if external_name(name) in EVAL_METRICS:
                raise ConfigError([f"eval.metrics: {name} would be scored as '{external_name(name)}', the name of a "
                                   "built-in metric; use the built-in, or a copy of the script under another name."],
                                  what="evaluation settings")
            try:
                loaded[name] = evaluate.load(ident)
            except Exception as err:  # evaluate raises many types (offline, missing script, bad module)
                raise ConfigError([
                    f"eval.metrics: cannot load the evaluate metric '{ident}' ({type(err).__name__}: {err}). "
                    "evaluate.load fetches metric scripts from the Hugging Face Hub: run once with network access "
                    f"(it is cached), or give the path of a local copy, evaluate:/path/to/{Path(ident).stem}.py. "
                    f"The built-in {', '.join(EVAL_METRICS)} work offline."], what="evaluation settings") from err
    return loaded


def external_name(name: str) -> str:
    """How an evaluate: metric's scores are named: the metric's file or Hub name (evaluate:x/my_metric.py ->
    my_metric), and my_metric_<key> for each further number it returns."""
    return _word(Path(name[len(EXTERNAL):]).stem)


def external_scores(name: str, module, predictions: list[str], references: list[str]) -> dict[str, float]:
    """An evaluate metric's numbers, named <metric> (or <metric>_<key> for metrics returning several)."""
    base = external_name(name)
    values = module.compute(predictions=predictions, references=references) or {}
    numbers = {_word(k): float(v) for k, v in values.items()
               if isinstance(v, (numbers_.Real, np.generic)) and not isinstance(v, (bool, np.bool_))}
    return {(base if key == base else f"{base}_{key}"): v for key, v in numbers.items()}


def _word(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_")


def score(predictions: list[str], references: list[str], metrics: list[str], extractor: str = "none",
          loaded: dict[str, Any] | None = None) -> dict[str, float]:
    """Each metric's score (without the eval_ prefix). `loaded` holds the evaluate: metrics (load_metrics)."""
    out: dict[str, float] = {}
    if "exact_match" in metrics:
        hits = [matches(p, r, extractor) for p, r in zip(predictions, references)]
        out["exact_match"] = sum(hits) / len(hits)
        if extractor == "gsm8k":  # as lm-evaluation-harness scores GSM8K: strict and flexible side by side
            for name, found in (("strict", GSM8K_STRICT), ("flexible", "last_number")):
                hits = [_same(extract(p, found).replace(",", ""), extract(r, "gsm8k"))
                        for p, r in zip(predictions, references)]
                out[f"exact_match_{name}"] = sum(hits) / len(hits)
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
    for name in metrics:
        if name.startswith(EXTERNAL):
            out.update(external_scores(name, (loaded or load_metrics([name]))[name], predictions, references))
    return out


# Generation ----------------------------------------------------------------------------------------------------


def prompt_texts(tokenizer: PreTrainedTokenizerBase, items: list[dict[str, Any]], reasoning: str = "keep") -> list[str]:
    """Each item's prompt as the model sees it at inference: a chat prompt through the tokenizer's own template (with
    the row's tools, and its history's reasoning as training had it), a plain-text prompt as it is."""
    from llmft.masking import masking_for, prepare

    texts = []
    for it in items:
        if isinstance(it["prompt"], str):
            texts.append(it["prompt"])
        else:
            messages = prepare(it["prompt"], masking_for(tokenizer), reasoning, tokenizer.name_or_path)
            texts.append(tokenizer.apply_chat_template(messages, tools=it.get("tools"), tokenize=False,
                                                       add_generation_prompt=True))
    return texts


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[dict[str, Any]],
             max_new_tokens: int, batch_size: int, desc: str = "Generating", reasoning: str = "keep") -> list[str]:
    """Greedy answers to the items' prompts, batched."""
    answers = []
    texts = prompt_texts(tokenizer, items, reasoning)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        chat = not isinstance(items[start]["prompt"], str)
        answers += generate_texts(model, tokenizer, texts[start : start + batch_size], max_new_tokens=max_new_tokens,
                                  add_special_tokens=not chat)[0]
    return answers


@dataclass
class Generated:
    """The generation eval of one model: scores named eval_<metric>, and every answer for the sample tables."""

    scores: dict[str, float]
    answers: list[str]
    correct: list[bool]


def generation_eval(model, tokenizer, items: list[dict[str, Any]], settings: GenerationEval, desc: str = "Generating",
                    loaded: dict[str, Any] | None = None, reasoning: str = "keep") -> Generated:
    """Greedy answers to `items`, scored with the settings' metrics and answer extractor. Scores compare final
    answers: a reasoning block the model writes first is not part of what is scored."""
    answers = generate(model, tokenizer, items, settings.max_new_tokens, settings.generate_batch_size, desc,
                       reasoning)
    finals = [without_reasoning(a) for a in answers]
    references = [it["reference"] for it in items]
    correct = [matches(a, r, settings.answer_extractor) for a, r in zip(finals, references)]
    scores = score(finals, references, settings.metrics, settings.answer_extractor, loaded)
    return Generated({f"eval_{k}": v for k, v in scores.items()}, answers, correct)


def samples(items: list[dict[str, Any]], result: Generated, baseline: Generated | None = None) -> list[dict[str, Any]]:
    """The sample records of the run directory's one shape: prompt, reference, answer, exact_match, and the
    baseline's answer beside it when there is one."""
    records = []
    for i, it in enumerate(items):
        record = {"prompt": prompt_text(it["prompt"]), "reference": it["reference"], "answer": result.answers[i],
                  "exact_match": result.correct[i]}
        if baseline is not None:
            record.update(baseline_answer=baseline.answers[i], baseline_exact_match=baseline.correct[i])
        records.append(record)
    return records


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
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "right"  # left padding would shift the positions of padded rows (Llama counts them from 0)
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
        tokenizer.padding_side = side
    return math.exp(total_nll / total_tokens)


# The in-training hook ------------------------------------------------------------------------------------------


class GenerationEvalCallback(TrainerCallback):
    """At every Trainer evaluation: generate on fixed held-out prompts, score, check forgetting, write samples.

    The scores join the Trainer's eval metrics (eval_exact_match, eval_rouge_l, eval_bleu, eval_chrf,
    eval_forgetting_ppl_ratio), so `metric_for_best_model`, early stopping and the trackers see them. Generation
    runs on the main process; the scores are broadcast so every process takes the same early-stopping decision.
    """

    def __init__(self, tokenizer, items: list[dict[str, Any]], cfg, out_dir: Path, loaded: dict[str, Any],
                 reasoning: str = "keep", forgetting: bool = True):
        self.tokenizer, self.items, self.cfg, self.out_dir, self.loaded = tokenizer, items, cfg, out_dir, loaded
        self.reasoning = reasoning
        self.trainer = None  # set after the Trainer is built, to log through it
        self.texts = general_texts() if cfg.forgetting_check and forgetting else []
        self.base_ppl: float | None = None
        self.last: Generated | None = None

    def _forgetting(self, model) -> dict[str, float]:
        if not self.texts:
            return {}
        ppl = perplexity(model, self.tokenizer, self.texts)
        if self.base_ppl is None:  # the first measurement is the model before training
            self.base_ppl = ppl
        return {"eval_general_ppl": ppl, "eval_forgetting_ppl_ratio": ppl / self.base_ppl}

    def _runs_here(self, state) -> bool:
        """Rank 0 generates while the others wait; under ZeRO-3 or FSDP every rank holds only a slice of each weight,
        so every rank must run the same forward passes (greedy decoding: they all get the same answers)."""
        from llmft.model import sharded_training

        return state.is_world_process_zero or sharded_training()

    def measure_base(self, trainer) -> None:
        """The forgetting check's reference: the model before training, measured before `trainer.train()` (which
        loads the weights of a checkpoint it resumes from before any callback runs). A sharded model (FSDP, ZeRO-3)
        is not prepared yet here: `on_train_begin` measures it."""
        from llmft.model import sharded_training

        if self.texts and self.base_ppl is None and trainer.is_world_process_zero() and not sharded_training():
            self._forgetting(trainer.model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Where the model could not be measured before training (sharded or under DeepSpeed): a resumed run takes
        the reference from its earlier evaluations (general ppl / ratio), else measures now and says what it is."""
        if not self.texts or self.base_ppl is not None or not self._runs_here(state):
            return
        earlier = [h for h in state.log_history if h.get("eval_forgetting_ppl_ratio")]
        if state.global_step and earlier:
            self.base_ppl = earlier[0]["eval_general_ppl"] / earlier[0]["eval_forgetting_ppl_ratio"]
            return
        if state.global_step:
            log.warning(f"The forgetting check's reference is the model resumed at step {state.global_step}: the "
                        "model before training could not be measured here and no evaluation before the resume had.")
        self._forgetting(model)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        new: dict[str, float] = {}
        if self._runs_here(state):
            if self.items:
                self.last = generation_eval(model, self.tokenizer, self.items, self.cfg,
                                            f"Generating (step {state.global_step})", self.loaded, self.reasoning)
                new.update(self.last.scores)
                if state.is_world_process_zero:
                    run_dir.write_jsonl(self.out_dir / run_dir.SAMPLES_DIR / f"step-{state.global_step}.jsonl",
                                        samples(self.items, self.last))
            new.update(self._forgetting(model))
        new = _broadcast(new)
        metrics.update(new)
        if new and self.trainer is not None:
            self.trainer.log(new)


def _broadcast(values: dict[str, float]) -> dict[str, float]:
    """Rank 0's values on every rank (a no-op in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    box = [values]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# Held-out loss -------------------------------------------------------------------------------------------------


@torch.no_grad()
def assistant_loss(model, tokenizer, rows: datasets.Dataset, max_length: int | None, overlong: str,
                   batch_size: int = 8, reasoning: str = "keep") -> float:
    """Mean loss over the tokens that carry loss in training (assistant tokens), token-weighted; rows are
    tokenized as training tokenizes them (same max_length and overlong policy)."""
    from llmft.data import prepare_dataset

    prepared, _ = prepare_dataset(rows, tokenizer, max_length, overlong, "eval data", reasoning=reasoning)
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


# Preference pairs ----------------------------------------------------------------------------------------------


def text_loss(model, blocks: datasets.Dataset) -> dict[str, float]:
    """Mean loss over every predicted token of raw-text blocks, and its perplexity (as a pretrain run reports it)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for ids in blocks["input_ids"]:
                if len(ids) < 2:
                    continue
                sequence = torch.tensor([ids], device=model.device)
                total += model(input_ids=sequence, labels=sequence, use_cache=False).loss.float().item() * (len(ids) - 1)
                count += len(ids) - 1
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def answer_logps(model, pairs: datasets.Dataset, answer: str) -> list[float]:
    """The summed log-probability of each pair's `answer` (chosen_ids or rejected_ids) after its prompt_ids, one
    sequence at a time (no padding, so no attention mask to get wrong)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt, ids in zip(pairs["prompt_ids"], pairs[answer]):
            sequence = torch.tensor([prompt + ids], device=model.device)
            logits = model(input_ids=sequence, use_cache=False).logits[0].float()
            start = len(prompt)
            predicted = torch.log_softmax(logits[start - 1: -1], dim=-1) if start else None
            if predicted is None:  # no prompt token: the first answer token has nothing to be predicted from
                predicted, ids = torch.log_softmax(logits[:-1], dim=-1), ids[1:]
            target = torch.tensor(ids, device=model.device).unsqueeze(1)
            out.append(predicted.gather(1, target).sum().item())
    finally:
        model.train(was_training)
    return out


def pair_metrics(chosen: list[float], rejected: list[float], ref_chosen: list[float] | None = None,
                 ref_rejected: list[float] | None = None, beta: float = 0.1) -> dict[str, float]:
    """Preference metrics of held-out pairs from answer log-probabilities: how often the model itself prefers the
    chosen answer (eval_pair_accuracy: comparable before and after training, and between models), and, against a
    reference model, DPO's implicit reward: beta x (log p_model - log p_reference) of each answer
    (eval_reward_accuracy, eval_reward_margin)."""
    n = len(chosen)
    out = {"eval_pair_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
           "eval_logps_chosen": sum(chosen) / n, "eval_logps_rejected": sum(rejected) / n}
    if ref_chosen is not None and ref_rejected is not None:
        margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
        out["eval_reward_accuracy"] = sum(m > 0 for m in margins) / n
        out["eval_reward_margin"] = sum(margins) / n
    return out


@torch.no_grad()
def reward_scores(model, pairs: datasets.Dataset) -> dict[str, float]:
    """A reward model on held-out pairs: how often it scores the chosen answer higher, and by how much on average."""
    was_training = model.training
    model.eval()
    margins = []
    try:
        for prompt, chosen, rejected in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"]):
            scores = [model(input_ids=torch.tensor([prompt + ids], device=model.device)).logits[0, 0].float().item()
                      for ids in (chosen, rejected)]
            margins.append(scores[0] - scores[1])
    finally:
        model.train(was_training)
    return {"eval_reward_accuracy": sum(m > 0 for m in margins) / len(margins),
            "eval_reward_margin": sum(margins) / len(margins)}


def held_out_pairs(rows: datasets.Dataset, tokenizer, max_length: int | None, overlong: str,
                   reasoning: str = "keep") -> datasets.Dataset | None:
    """Held-out preference rows tokenized as training tokenizes them; None when the rows are not pairs."""
    from llmft.data import prepare_preference

    if rows is None or kind_of(rows.column_names, "eval data") != PREFERENCE:
        return None
    pairs, _ = prepare_preference(rows, tokenizer, max_length, overlong, "eval data", PREFERENCE, reasoning=reasoning)
    return pairs


class PerplexityCallback(TrainerCallback):
    """eval_perplexity = exp(eval_loss) at every evaluation of a run on raw text, where the loss is over every
    token and perplexity is how language models are compared."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is not None and "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))


class PairEvalCallback(TrainerCallback):
    """At every Trainer evaluation of a preference run, how often the model prefers the chosen answer of each
    held-out pair (eval_pair_accuracy), beside TRL's own metrics (eval_rewards/accuracies is DPO's implicit reward
    against the reference; before training it is 0 by construction, which is why this one is added)."""

    def __init__(self, pairs: datasets.Dataset, reward_model: bool = False):
        self.pairs, self.reward_model, self.trainer = pairs, reward_model, None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        from llmft.model import sharded_training

        new: dict[str, float] = {}
        if state.is_world_process_zero or sharded_training():  # under ZeRO-3 every rank joins each forward
            if self.reward_model:
                new = reward_scores(model, self.pairs)
            else:
                new = pair_metrics(answer_logps(model, self.pairs, "chosen_ids"),
                                   answer_logps(model, self.pairs, "rejected_ids"))
        new = _broadcast(new)
        metrics.update(new)
        if new and self.trainer is not None:
            self.trainer.log(new)


# `llmft eval` ---------------------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    """`llmft eval`'s own options; the generation settings are GenerationEval's, shared with the recipe."""

    target: str = field(metadata={"positional": True, "help": "A run directory (adapter or full model), or a model "
                                                               "id, path or built-in name."})
    baseline: str | None = field(default=None, metadata={
        "help": "Evaluate this model the same way, side by side ('base' = the run's base model)."})
    data: str | None = field(default=None, metadata={
        "help": "Held-out data (messages or prompt/completion); default: the rows the run evaluated in training."})
    few_shot_data: str | None = field(default=None, metadata={
        "help": "Where few-shot examples come from (default: the run's, else --data)."})
    max_length: int | None = field(default=1024, metadata={"help": "Longest example for the loss (a run: its own)."})
    overlong: str = field(default="drop", metadata={"help": "Longer examples: drop | truncate (a run: its own)."})
    reasoning: str = field(default="keep", metadata={"help": "Reasoning traces in the data: keep | drop (a run: its "
                                                             "own data.reasoning)."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N rows of the data."})
    lm_eval_tasks: list[str] = field(default_factory=list, metadata={
        "help": "lm-evaluation-harness tasks: standard ones (e.g. arc_easy, needs their data) or YAML tasks over "
                "local files; shipped offline: llmft_dates (generative), llmft_facts_mc (multiple choice)."})
    lm_eval_include: list[str] = field(default_factory=list, metadata={"help": "Folders of your own lm-eval task YAMLs."})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "Only the first N examples of each task."})
    lm_eval_chat_template: bool = field(default=True, metadata={
        "help": "Feed lm-eval prompts through the model's chat template (--no-lm-eval-chat-template: plain text)."})
    out: str | None = field(default=None, metadata={"help": "Where results go (default: the run directory, or "
                                                            "eval_<model>/)."})

    def __post_init__(self):
        problems = [] if self.overlong in ("drop", "truncate") else [f"overlong: '{self.overlong}' is not drop or truncate."]
        if self.reasoning not in ("keep", "drop"):
            problems.append(f"reasoning: '{self.reasoning}' is not keep or drop.")
        if problems:
            raise ConfigError(problems, what="the options of llmft eval")


OPTIONS = [EvalOptions, GenerationEval, JudgeOptions]
RENAMED = {"--batch-size": "--generate_batch_size", "--generation_batch_size": "--generate_batch_size",
           "--generation-batch-size": "--generate_batch_size",
           "--lm-eval-no-chat-template": "--no_lm_eval_chat_template"}


def run_defaults(target: str) -> dict[str, Any]:
    """A run's own evaluation settings (its eval: section, max_length and overlong policy), which `llmft eval RUN`
    starts from; nothing for a model that is not a run."""
    if not run_dir.is_run(Path(target)):
        return {}
    run = run_dir.read_run(Path(target))
    recipe = run.recipe
    shared = {f.name: getattr(recipe.eval, f.name) for f in fields(GenerationEval)}
    shared["metrics"] = [run.metric(name) for name in recipe.eval.metrics]
    return {**shared, "max_length": recipe.training.max_length, "overlong": recipe.data.overlong,
            "reasoning": recipe.data.reasoning}


def load_for_eval(target: str, revision: str | None = None):
    """(model, tokenizer, Run or None) for a run directory (adapter on its base, or full model) or a model (at
    `revision`, for a Hub id)."""
    from llmft.config import ModelConfig, PeftSettings
    from llmft.model import load_model, load_run_model, load_tokenizer, on_gpu_if_any

    path = Path(target)
    if path.is_dir() and not run_dir.is_run(path) and not (path / "config.json").exists():
        raise DataError(f"{target} is neither a run directory (run.json, recipe.yaml, metrics.json, the weights: "
                        "what llmft train writes) nor a model folder (config.json). Give one of those, a Hub id, "
                        "or smollm2-135m-instruct.")
    if run_dir.is_run(path):
        run = run_dir.read_run(path)
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))  # the run's own tokenizer and template
        return on_gpu_if_any(load_run_model(run)), tokenizer, run
    cfg = ModelConfig(name_or_path=target, dtype="float32", revision=revision)
    return on_gpu_if_any(load_model(cfg, PeftSettings(method="full"))), load_tokenizer(cfg), None


def _free_gpu_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def held_out(options: EvalOptions, run) -> tuple[str, datasets.Dataset]:
    """(label, rows) to evaluate on: --data, else the rows the run evaluated in training."""
    from llmft.data import load_rows, validate_rows

    if options.data:
        rows, label = load_rows(options.data), options.data
        validate_rows(rows, options.data)
    elif run is not None:
        rows = run.eval_rows()
        if rows is None:
            raise DataError(f"{run.path} held out no data in training (no eval_data, eval_fraction 0): pass --data FILE.")
        label = f"{run.path / run_dir.EVAL_SPLIT} (held out in training from {run.info.data['eval'].path})"
    else:
        raise DataError(f"{options.target} is not a run directory, so it has no held-out data: pass --data FILE.")
    return label, rows.select(range(min(options.limit, len(rows)))) if options.limit else rows


def shots_for(options: EvalOptions, settings: GenerationEval, run, rows) -> tuple[Any, Any]:
    """(rows the few-shot examples come from, rows whose prompts are asked): --few-shot-data, else the training
    rows the run showed, else the first rows of the evaluated data, which are then not asked themselves."""
    from llmft.data import load_rows, validate_rows

    if not settings.few_shot:
        return None, rows
    if options.few_shot_data:
        shots = load_rows(options.few_shot_data)
        validate_rows(shots, options.few_shot_data)
        return shots, rows
    if run is not None and run.few_shot_rows() is not None:
        return run.few_shot_rows(), rows
    if len(rows) <= settings.few_shot:
        raise DataError(f"--few-shot {settings.few_shot} takes every one of the {len(rows)} evaluated rows as an "
                        "example: give --few-shot-data, or fewer shots.")
    return rows.select(range(settings.few_shot)), rows.select(range(settings.few_shot, len(rows)))


def evaluate_model(model, tokenizer, rows, items, options: EvalOptions, settings: GenerationEval,
                   loaded: dict[str, Any], reward_model: bool = False):
    """Loss, generation metrics, general-text perplexity (and lm-eval) of one model, named eval_*; its answers; and
    for preference pairs, the pair metrics and each answer's log-probability (for the reward against a baseline)."""
    pairs = held_out_pairs(rows, tokenizer, options.max_length, options.overlong, options.reasoning)
    if reward_model:  # a score per answer: nothing to generate or to take a loss of
        return reward_scores(model, pairs), None, None
    logps = None
    if pairs is not None:
        logps = answer_logps(model, pairs, "chosen_ids"), answer_logps(model, pairs, "rejected_ids")
        answer_tokens = sum(len(ids) for ids in pairs["chosen_ids"])
        results = {"eval_loss": -sum(logps[0]) / answer_tokens, **pair_metrics(*logps)}  # loss of the chosen answers
    elif kind_of(rows.column_names, "eval data") == TEXT:  # raw text: the loss of every token, as perplexity
        from llmft.data import text_blocks

        results = text_loss(model, text_blocks(rows, tokenizer, options.max_length or 1024, "eval data")[0])
    elif kind_of(rows.column_names, "eval data") == PROMPT_ONLY:  # prompts alone: no answer to take a loss of
        results = {}
    else:
        if kind_of(rows.column_names, "eval data") == UNPAIRED:  # the loss of the desirable answers only
            rows = rows.filter(lambda label: label, input_columns="label").remove_columns("label")
        results = {"eval_loss": assistant_loss(model, tokenizer, rows, options.max_length, options.overlong,
                                               settings.generate_batch_size, options.reasoning)}
    generated = generation_eval(model, tokenizer, items, settings, "Generating", loaded, options.reasoning) \
        if items else None
    if generated:
        results.update(generated.scores)
    results["eval_general_ppl"] = perplexity(model, tokenizer, general_texts())
    if options.lm_eval_tasks:  # last: merging an adapter changes the model object
        results.update(lm_eval_results(model, tokenizer, options, settings.generate_batch_size))
    return results, generated, logps


def judged(judge_options: JudgeOptions, items, answers: Generated, base_answers: Generated | None,
           batch_size: int) -> tuple[dict[str, float], dict[str, float] | None, dict[str, Any]]:
    """A judge's view of the answers: mean 1-10 grade of each model, and with a baseline the run's win rate against
    it (both orders judged, so position bias cancels). Returns (run metrics, baseline metrics, judge details)."""
    from llmft.judge import make_judge, win_rate

    judge = make_judge(judge_options, batch_size)
    prompts = [it["prompt"] for it in items]

    def mean_grade(generated: Generated) -> dict[str, float]:
        grades = [g for g in judge.grade(prompts, generated.answers) if g is not None]
        return {"eval_judge_score": sum(score for score, _ in grades) / len(grades) if grades else float("nan")}

    tuned, baseline, details = mean_grade(answers), None, {}
    if base_answers is not None:
        baseline = mean_grade(base_answers)
        comparisons = judge.compare(prompts, answers.answers, base_answers.answers)
        tuned.update(win_rate(comparisons))
        details["comparisons"] = comparisons
    details.update(judge.stats())
    return tuned, baseline, details


def evaluate_command(options: EvalOptions, settings: GenerationEval, judge_options: JudgeOptions | None = None) -> None:
    """`llmft eval`: a run or model (and a baseline) on held-out data; eval_results.json and eval_report.md."""
    from llmft.stages import STAGES

    from llmft.hardware import tune_allocator

    tune_allocator()
    judge_options = judge_options or JudgeOptions()
    if judge_options.given and not settings.num_generate:
        raise ConfigError(["a judge grades generated answers: set --num_generate N (held-out prompts to answer)."],
                          what="the options of llmft eval")
    loaded = load_metrics(settings.metrics)
    model, tokenizer, run = load_for_eval(options.target)
    reward_model = run is not None and STAGES[run.info.stage].head == "sequence_classification"
    label, rows = held_out(options, run)
    shots, asked = shots_for(options, settings, run, rows)
    items = [] if reward_model else eval_items(asked, settings, shots)
    tuned, answers, logps = evaluate_model(model, tokenizer, rows, items, options, settings, loaded, reward_model)
    baseline, base_answers, base_name = None, None, None
    if options.baseline:
        del model  # its scores are in: the GPU's memory goes to the baseline
        _free_gpu_memory()
        own_base = options.baseline == "base" and run is not None
        base_name = run.recipe.model.name_or_path if own_base else options.baseline
        from llmft.model import base_source

        base_model, base_tokenizer, _ = load_for_eval(base_source(run.info.base_model) if own_base else base_name,
                                                      run.recipe.model.revision if own_base else None)
        baseline, base_answers, base_logps = evaluate_model(base_model, base_tokenizer, rows, items, options,
                                                            settings, loaded)
        if logps is not None:  # DPO's implicit reward of the run against the baseline as reference
            beta = getattr(run.recipe.training, "beta", 0.1) if run else 0.1
            tuned.update(pair_metrics(*logps, *base_logps, beta=beta))
    judge = None
    if judge_options.given and answers is not None:
        judge_tuned, judge_base, judge = judged(judge_options, items, answers, base_answers,
                                                settings.generate_batch_size)
        tuned.update(judge_tuned)
        if baseline is not None:
            baseline.update(judge_base)
    name = Path(options.target).name
    out = Path(options.out) if options.out else Path(options.target) if run else Path(f"eval_{name}")
    results = {"target": options.target, "data": label, "settings": {**asdict(options), **asdict(settings)},
               "results": tuned, "baseline": baseline, "baseline_model": base_name,
               "deltas": {k: tuned[k] - baseline[k] for k in tuned if k in baseline} if baseline else None,
               "samples": samples(items, answers, base_answers) if answers else [], "judge": judge}
    report = "\n".join([f"# Evaluation of {name}", "", *run_dir.metrics_table(tuned, baseline, name, f"{base_name} (baseline)"),
                        "", f"Lower is better for {', '.join(k for k in run_dir.LOWER_IS_BETTER if k in tuned)}; "
                        "higher for the others.", ""])
    paths = run_dir.write_eval_results(out, results, report)
    page = None
    if run is not None and out.resolve() == run.path.resolve():
        from llmft.report import refresh

        page = refresh(run.path)
    print(report + f"\nSaved {paths[0]} and {paths[1]}" + (f"; refreshed {page}" if page else ""))


def lm_eval_results(model, tokenizer, options: EvalOptions, batch_size: int) -> dict[str, float]:
    """lm-evaluation-harness on the loaded model: standard tasks, llmft's own, or YAML tasks over local files.

    Task folders (llmft's shipped ones and --lm_eval_include) are copied with their `data_files` made absolute,
    since lm-eval resolves them against the working directory. Scores come back as eval_lm_eval/TASK/METRIC.
    """
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if hasattr(model, "merge_and_unload"):  # lm-eval takes a plain transformers model: merge the adapter in memory
        model = model.merge_and_unload()
    shipped = str(resources.files("llmft").joinpath("resources/lm_eval_tasks"))
    with tempfile.TemporaryDirectory(prefix="llmft-lm-eval-") as tmp:
        folders = [_resolve_task_files(Path(folder), Path(tmp) / str(i))
                   for i, folder in enumerate([shipped, *options.lm_eval_include])]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = simple_evaluate(model=lm, tasks=options.lm_eval_tasks, task_manager=TaskManager(include_path=folders),
                                 limit=options.lm_eval_limit, apply_chat_template=options.lm_eval_chat_template,
                                 log_samples=False)
    scores = {}
    for task, values in output["results"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and "stderr" not in key and key not in ("alias", "sample_len"):
                scores[f"eval_lm_eval/{task}/{key.split(',')[0]}"] = float(value)
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
