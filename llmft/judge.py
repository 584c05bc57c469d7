"""A model as judge: single answers graded 1-10, and two answers compared, by a local model or an
OpenAI-compatible server (llmft.synth.backends). Used to rank sampled answers (`llmft selfchat feedback`, Baize v2's
self-distillation with feedback) and to judge a run against its base (`llmft eval --judge-...`).

Verdicts are parsed strictly: a grade must start with `Score: N` (1-10), a comparison with `Winner: A`, `B` or
`tie`. An unparseable verdict is asked again (`retries` times, sampled), then counted as unparseable, never guessed.
Pairwise judgments run in both orders (A/B and B/A), so a judge that prefers whichever answer comes first gives a
tie, not a win: position bias is cancelled, and its size reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llmft.errors import ConfigError

GRADE_PROMPT = (
    "Rate the AI assistant's answer to the conversation below, from 1 (useless, wrong or harmful) to 10 (correct, "
    "helpful and clear). Judge the last answer only.\n\n{conversation}\n\n[Answer]\n{answer}\n\n"
    "Reply in exactly this form:\nScore: <a whole number from 1 to 10>\nReason: <one sentence>"
)
COMPARE_PROMPT = (
    "Compare two answers of an AI assistant to the conversation below. Which one is more correct, helpful and "
    "clear? Ignore which one comes first and how long they are.\n\n{conversation}\n\n[Answer A]\n{a}\n\n"
    "[Answer B]\n{b}\n\nReply in exactly this form:\nWinner: <A, B or tie>\nReason: <one sentence>"
)
SCORE = re.compile(r"^\s*\**\s*score\s*\**\s*[:=]\s*\**\s*(10|[1-9])(?:\s*/\s*10)?\b", re.I | re.M)
WINNER = re.compile(r"^\s*\**\s*winner\s*\**\s*[:=]\s*\**\s*(a|b|tie)\b", re.I | re.M)
REASON = re.compile(r"^\s*reason\s*[:=]\s*(.+)$", re.I | re.M)


@dataclass
class JudgeOptions:
    """The judge: a local model (--judge-model) or an OpenAI-compatible server (--judge-base-url, --judge-api-model)."""

    judge_model: str | None = field(default=None, metadata={"help": "Local judge model (Hub id, path, or "
                                                                     "smollm2-135m-instruct)."})
    judge_base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible judge server, e.g. "
                                                                       "http://localhost:8000/v1."})
    judge_api_model: str | None = field(default=None, metadata={"help": "The judge's model name on that server."})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Variable holding its API key."})
    judge_retries: int = field(default=2, metadata={"help": "Asks again after an unparseable verdict, at most."})
    judge_max_new_tokens: int = field(default=96, metadata={"help": "Longest verdict, in tokens."})

    def __post_init__(self):
        problems = []
        if self.judge_base_url and not self.judge_api_model:
            problems.append("--judge-base-url needs --judge-api-model (the judge's name on that server).")
        if self.judge_base_url and self.judge_model:
            problems.append("--judge-model and --judge-base-url: give one judge.")
        if self.judge_retries < 0:
            problems.append("--judge-retries: must be >= 0.")
        if problems:
            raise ConfigError(problems, what="judge options")

    @property
    def given(self) -> bool:
        return bool(self.judge_model or self.judge_base_url)


def make_judge(options: JudgeOptions, batch_size: int = 8) -> Judge:
    from llmft.synth.backends import BackendOptions, make_backend

    backend = make_backend(BackendOptions(model=options.judge_model or "smollm2-135m-instruct",
                                          base_url=options.judge_base_url, api_model=options.judge_api_model,
                                          api_key_env=options.judge_api_key_env, batch_size=batch_size))
    return Judge(backend, options.judge_retries, options.judge_max_new_tokens)


def conversation_text(prompt) -> str:
    """A prompt (messages, or plain text) as the judge reads it."""
    if isinstance(prompt, str):
        return f"[User]\n{prompt}"
    return "\n\n".join(f"[{m['role'].capitalize()}]\n{m.get('content') or ''}" for m in prompt)


def parse_grade(text: str) -> tuple[int, str] | None:
    match = SCORE.search(text)
    if not match:
        return None
    reason = REASON.search(text)
    return int(match.group(1)), reason.group(1).strip() if reason else ""


def parse_winner(text: str) -> str | None:
    match = WINNER.search(text)
    return match.group(1).upper().replace("TIE", "tie") if match else None


class Judge:
    """Grades and comparisons through a backend, with strict parsing and counted retries."""

    def __init__(self, backend, retries: int = 2, max_new_tokens: int = 96):
        from llmft.synth.backends import Sampling

        self.backend, self.retries = backend, retries
        self.name = getattr(backend, "name", "judge")
        self.greedy = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)
        self.sampled = Sampling(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95)
        self.asked = self.unparseable = self.retried = 0

    def _ask(self, prompts: list[str], parse) -> list[Any]:
        """Each prompt's parsed verdict, asking again (sampled) where it did not parse; None after the retries."""
        verdicts: list[Any] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        for attempt in range(self.retries + 1):
            if not todo:
                break
            replies = self.backend.chat([[{"role": "user", "content": prompts[i]}] for i in todo],
                                        self.greedy if attempt == 0 else self.sampled)
            self.asked += len(todo)
            self.retried += len(todo) if attempt else 0
            for i, reply in zip(todo, replies):
                verdicts[i] = parse(reply)
            todo = [i for i in todo if verdicts[i] is None]
        self.unparseable += len(todo)
        return verdicts

    def grade(self, prompts: list, answers: list[str]) -> list[tuple[int, str] | None]:
        """(score 1-10, reason) for each answer to its prompt; None where no verdict parsed."""
        return self._ask([GRADE_PROMPT.format(conversation=conversation_text(p), answer=a)
                          for p, a in zip(prompts, answers)], parse_grade)

    def compare(self, prompts: list, first: list[str], second: list[str]) -> list[dict[str, Any]]:
        """For each prompt, `first` against `second` judged in both orders: the outcome (win, loss or tie for
        `first`; a split verdict is a tie; undecided, None, unless both orders gave a verdict) and the two raw
        verdicts."""
        n = len(prompts)
        texts = [conversation_text(p) for p in prompts]
        asked = [COMPARE_PROMPT.format(conversation=t, a=a, b=b) for t, a, b in zip(texts, first, second)]
        asked += [COMPARE_PROMPT.format(conversation=t, a=b, b=a) for t, a, b in zip(texts, first, second)]
        verdicts = self._ask(asked, parse_winner)
        out = []
        for ab, ba in zip(verdicts[:n], verdicts[n:]):
            points = [{"A": 1.0, "B": 0.0, "tie": 0.5}.get(ab), {"A": 0.0, "B": 1.0, "tie": 0.5}.get(ba)]
            # both orders or none: one verdict alone would bring back the position bias the pair cancels
            score = None if None in points else sum(points) / 2
            outcome = None if score is None else "win" if score > 0.5 else "loss" if score < 0.5 else "tie"
            out.append({"outcome": outcome, "verdicts": [ab, ba]})
        return out

    def stats(self) -> dict[str, Any]:
        return {"judge": self.name, "asked": self.asked, "retried": self.retried, "unparseable": self.unparseable}


def win_rate(results: list[dict[str, Any]]) -> dict[str, float]:
    """Wins (a tie counts half) over the comparisons with a verdict, and how often the judge's two verdicts split
    by position (it picked whichever answer came first, or second: its position bias)."""
    decided = [r for r in results if r["outcome"] is not None]
    wins = sum(1.0 if r["outcome"] == "win" else 0.5 if r["outcome"] == "tie" else 0.0 for r in decided)
    positional = sum(r["verdicts"][0] == r["verdicts"][1] and r["verdicts"][0] in ("A", "B") for r in results)
    return {"eval_judge_win_rate": wins / len(decided) if decided else float("nan"),
            "eval_judge_position_bias": positional / len(results) if results else 0.0,
            "eval_judge_undecided": len(results) - len(decided)}
