"""Self-distillation with feedback (Baize v2): for each prompt, sample N answers from the model being improved, let a
judge grade each 1-10, and keep the best as supervised data and the best against the worst as preference pairs.

    llmft selfchat feedback --prompts runs/selfchat/dataset --model runs/sft --judge-model JUDGE --n 4 --out fb

Every prompt's answers and grades are appended to feedback.jsonl as soon as they are judged (flushed and synced),
so an interrupted run resumes with the prompts it has not finished. Then two datasets are built as any other (the
same checks, dedupe, split, manifest and card): sft/ (best answers scoring at least --min-score) and dpo/ (best vs
worst where they are at least --margin apart), each card stating the judge, N and the score distribution.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llmft.errors import ConfigError, DataError, GenerationError
from llmft.judge import JudgeOptions, make_judge
from llmft.synth.backends import BackendOptions, Sampling, make_backend
from llmft.synth.selfchat import DialogueWriter, read_seeds

log = logging.getLogger(__name__)


@dataclass
class FeedbackOptions:
    """`llmft selfchat feedback`: where prompts come from, how many answers each, what is kept."""

    prompts: str | None = field(default=None, metadata={
        "help": "Prompts: a .txt of questions, a conversation dataset (the turns before each last answer: e.g. a "
                "self-chat dataset/), or with --prompt-column a JSONL/JSON/CSV/Parquet file or Hub id."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding the questions."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N prompts."})
    out: str | None = field(default=None, metadata={"help": "Output folder: feedback.jsonl (resumable), sft/, dpo/."})
    n: int = field(default=4, metadata={"help": "Answers sampled per prompt."})
    min_score: float = field(default=7.0, metadata={"help": "A best answer enters sft/ when graded at least this."})
    margin: float = field(default=2.0, metadata={"help": "Best vs worst enter dpo/ when graded this far apart."})
    test_fraction: float = field(default=0.0, metadata={"help": "Share of each dataset held out as test/."})
    seed: int = field(default=0, metadata={"help": "Seed of the splits."})

    def __post_init__(self):
        problems = [f"{flag}: missing." for flag, value in (("--prompts", self.prompts), ("--out", self.out))
                    if not value]
        if self.n < 2:
            problems.append(f"--n: {self.n}: a preference needs at least 2 answers per prompt.")
        if not 1 <= self.min_score <= 10:
            problems.append(f"--min-score: {self.min_score} is not in 1..10.")
        if self.margin <= 0:
            problems.append(f"--margin: {self.margin} must be > 0.")
        if problems:
            raise ConfigError(problems, what="the options of llmft selfchat feedback")


def read_prompts(options: FeedbackOptions) -> list[tuple[str, list[dict]]]:
    """(id, prompt messages): one user message per question, or each conversation's turns before its last answer."""
    from llmft.data import load_rows, number_rows, validate_rows
    from llmft.schema import TEXT, prompt_and_reference, row_number

    if options.prompts.endswith(".txt") or options.prompt_column:
        seeds = read_seeds(options.prompts, options.prompt_column, None, options.limit)
        return [(sid, [{"role": "user", "content": text}]) for sid, text in seeds]
    rows = number_rows(load_rows(options.prompts))
    kind = validate_rows(rows, options.prompts)
    if kind == TEXT:
        raise DataError(f"{options.prompts}: raw text rows hold no question to answer; give conversations, "
                        "prompts, or a .txt file of one question per line.")
    prompts = [(f"row {row_number(row, i)}", prompt_and_reference(row, kind)[0]) for i, row in enumerate(rows)]
    prompts = [(pid, [{"role": "user", "content": p}] if isinstance(p, str) else p) for pid, p in prompts]
    prompts = [(pid, p) for pid, p in prompts if p]
    return prompts[:options.limit] if options.limit else prompts


def collect(prompts, backend, judge, n: int, sampling: Sampling, out: Path, batch: int = 8) -> dict[str, Any]:
    """Sample and grade every prompt not yet in out/feedback.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    writer = DialogueWriter(out / "feedback.jsonl")
    todo = [(pid, p) for pid, p in prompts if pid not in writer.done]
    log.info("%d prompts, %d already judged, %d to go (%d answers each)", len(prompts), len(prompts) - len(todo),
             len(todo), n)
    try:
        for start in tqdm(range(0, len(todo), batch), desc="Sampling and judging", unit="batch"):
            chunk = todo[start: start + batch]
            answers = backend.chat_n([p for _, p in chunk], n, sampling)
            flat = [(p, a) for (_, p), group in zip(chunk, answers) for a in group if a.strip()]
            grades = iter(judge.grade([p for p, _ in flat], [a for _, a in flat]))
            for (pid, prompt), group in zip(chunk, answers):
                graded = []
                for answer in group:
                    grade = next(grades) if answer.strip() else None
                    graded.append({"text": answer, "score": grade[0] if grade else None,
                                   "reason": grade[1] if grade else ("empty answer" if not answer.strip() else
                                                                      "unparseable verdict")})
                writer.write({"seed_id": pid, "prompt": prompt, "model": backend.name, "judge": judge.name,
                              "answers": graded})
    finally:
        writer.close()
    return judge.stats()


def choose(record: dict[str, Any], min_score: float, margin: float) -> tuple[dict | None, dict | None, str]:
    """The record's SFT row and preference pair (either may be None), and what happened to it."""
    graded = [a for a in record["answers"] if a["score"] is not None]
    if len(graded) < 2:
        return None, None, "fewer than 2 graded answers"
    ranked = sorted(graded, key=lambda a: -a["score"])
    best, worst = ranked[0], ranked[-1]
    assistant = lambda a: [{"role": "assistant", "content": a["text"]}]  # noqa: E731
    sft = {"messages": record["prompt"] + assistant(best)} if best["score"] >= min_score else None
    pair = {"prompt": record["prompt"], "chosen": assistant(best), "rejected": assistant(worst),
            "score_chosen": float(best["score"]), "score_rejected": float(worst["score"])} \
        if best["score"] - worst["score"] >= margin and best["text"] != worst["text"] else None
    why = "sft and pair" if sft and pair else "sft only" if sft else "pair only" if pair else \
        "best below --min-score and no pair --margin apart"
    return sft, pair, why


def finalize(out: Path, options: FeedbackOptions, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """sft/ and dpo/ datasets from feedback.jsonl, each with its manifest and a card stating how it was made."""
    from llmft.dataset.build import BuildConfig, Source, build, data_card

    records = [json.loads(line) for line in (out / "feedback.jsonl").read_text(encoding="utf-8").split("\n") if line]
    scores = Counter(a["score"] for r in records for a in r["answers"])
    outcomes, rows = Counter(), {"sft": [], "dpo": []}
    for record in records:
        sft, pair, why = choose(record, options.min_score, options.margin)
        outcomes[why] += 1
        rows["sft"] += [sft] if sft else []
        rows["dpo"] += [pair] if pair else []
    facts = {**meta, "prompts": len(records), "answers_per_prompt": options.n, "min_score": options.min_score,
             "margin": options.margin, "score_distribution": {str(k): v for k, v in sorted(scores.items(), key=str)},
             "outcomes": dict(outcomes)}
    manifests = {}
    for name, fmt in (("sft", "openai"), ("dpo", "pairs")):
        if not rows[name]:
            log.warning("feedback: no %s rows (%s)", name, dict(outcomes))
            continue
        kept = out / f"{name}.jsonl"
        kept.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[name]), encoding="utf-8")
        manifest = build(BuildConfig(sources=[Source(path=str(kept), format=fmt, name="self-feedback")],
                                     out=str(out / name), test_fraction=options.test_fraction, seed=options.seed),
                         meta["command"])
        manifest["feedback"] = facts
        (out / name / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        lines = [f"- {k}: {v}" for k, v in facts.items() if k not in ("command", "score_distribution", "outcomes")]
        lines += ["- scores given (score: answers): " + ", ".join(f"{k}: {v}" for k, v in facts["score_distribution"].items())]
        lines += [f"- {n} prompts: {why}" for why, n in outcomes.most_common()]
        (out / name / "data_card.md").write_text(data_card(manifest) + "\n## Self-distillation with feedback\n\n"
                                                 + "\n".join(lines) + "\n")
        manifests[name] = manifest
    if not manifests:
        answers, ungraded = sum(scores.values()), scores.get(None, 0)
        hint = (f"the judge's verdicts were unparseable for {ungraded} of {answers} answers (it did not answer "
                "'Score: N'): use a stronger judge (--judge-base-url, or a larger --judge-model)"
                if ungraded > answers / 2 else "lower --min-score or --margin, or sample more answers")
        raise GenerationError(f"no prompt gave an SFT row or a pair ({dict(outcomes)}); {hint}. Details in "
                              f"{out / 'feedback.jsonl'}.")
    return manifests


def feedback_command(options: FeedbackOptions, sampling: Sampling, backend_options: BackendOptions,
                     judge_options: JudgeOptions, command: str) -> None:
    """`llmft selfchat feedback`: sample, judge (resuming), then build sft/ and dpo/."""
    if not judge_options.given:
        raise ConfigError(["--judge-model or --judge-base-url: give the judge that grades the answers (a stronger "
                           "model than the one answering, as Baize v2 used ChatGPT)."],
                          what="the options of llmft selfchat feedback")
    prompts = read_prompts(options)
    if not prompts:
        raise GenerationError(f"{options.prompts}: no prompts.")
    backend = make_backend(backend_options)
    judge = make_judge(judge_options, backend_options.batch_size)
    out = Path(options.out)
    stats = collect(prompts, backend, judge, options.n, sampling, out, max(1, backend_options.batch_size // options.n))
    meta = {"command": command, "prompts_from": options.prompts, "model": backend.name, **stats,
            "sampling": asdict(sampling)}
    manifests = finalize(out, options, meta)
    facts = next(iter(manifests.values()))["feedback"]
    print(f"prompts: {facts['prompts']} ({', '.join(f'{n} {why}' for why, n in facts['outcomes'].items())}); "
          f"judge verdicts unparseable: {stats['unparseable']} of {stats['asked']} asked")
    for name, manifest in manifests.items():
        for split, output in manifest["output"].items():
            print(f"{name} {split}: {output['rows']} rows -> {output['path']}")
