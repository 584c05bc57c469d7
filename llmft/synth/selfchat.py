"""Self-chat (as Baize did): one model writes both sides of a conversation about each seed question.

Modes:
  transcript   one request asks for the whole conversation, human lines marked [Human], AI lines [AI]; Baize's
               post-processing keeps the well-formed (human, AI) pairs up to the first malformed segment and
               always drops the last exchange, which may be cut off (Baize v1)
  alternating  one raw-text generation per turn: the human turn stops at the AI marker, the AI turn sees the
               chat so far and stops at the human marker; up to turns_max rounds (Baize v2)
  roleplay     the model's own chat template on both sides: the AI answers the chat so far; a user simulator
               (its instructions in the first user message, roles swapped) writes the next human message or [END]
Every dialogue is appended to dialogues.jsonl as soon as it is done (flushed and synced) with the filter verdict,
so an interrupted run resumes with the seeds it has not finished, losing and repeating none.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llmft.errors import ConfigError, GenerationError
from llmft.synth.backends import BackendOptions, Sampling, make_backend

log = logging.getLogger(__name__)

HUMAN, AI, END = "[Human]", "[AI]", "[END]"
TEMPLATES = {
    "transcript": (
        "Write a conversation between a curious human and an AI assistant about this topic: {seed}\n"
        "Start every line the human says with [Human] and every line the AI says with [AI]. The human asks about "
        "the topic and follows up on the answers, and stops when they have no more questions. The AI answers "
        "helpfully and in detail and tries not to ask questions itself. Write only the transcript, starting with "
        "the human's first question.\n"
    ),
    "alternating": "A conversation between a curious human and a helpful AI assistant about: {seed}\n",
    "user_simulator": (
        "You are a curious person chatting with an AI assistant about this topic: {seed}\n"
        "Write only your next message to the assistant: a follow-up question about its last answer or a related "
        "point, in one or two sentences. If you have nothing more to ask, write only [END]."
    ),
}
LEAK_MARKERS = (HUMAN, AI, "[|Human|]", "[|AI|]", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "[INST]")


MODE_NAMES = ("transcript", "alternating", "roleplay")


@dataclass
class SelfChatRunOptions:
    """Where seeds come from and where dialogues go (`llmft selfchat`)."""

    config: str | None = field(default=None, metadata={"help": "YAML file whose keys are these options' names "
                                                               "(flags override it)."})
    seeds: str | None = field(default=None, metadata={"help": ".txt (one question a line), or a "
                                                              "JSONL/JSON/CSV/Parquet file or Hub id."})
    seed_column: str | None = field(default=None, metadata={"help": "Column holding the questions (not for .txt)."})
    seed_id_column: str | None = field(default=None, metadata={"help": "Column of unique seed ids (default: file "
                                                                       "and line)."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N seeds."})
    out: str | None = field(default=None, metadata={"help": "Output folder: dialogues.jsonl (resumable) and dataset/."})
    templates: str | None = field(default=None, metadata={
        "help": "YAML mapping of template names (transcript, alternating, user_simulator) to text with {seed}."})
    test_fraction: float = field(default=0.0, metadata={"help": "Share of dialogues held out as test/."})
    seed: int = field(default=0, metadata={"help": "Seed of the split."})


@dataclass
class SelfChatSettings:
    """How dialogues are generated and filtered."""

    mode: str = field(default="roleplay", metadata={"help": "transcript (Baize v1) | alternating (Baize v2) | "
                                                            "roleplay (the model's chat template on both sides)."})
    turns_min: int = field(default=1, metadata={"help": "Dialogues with fewer exchanges are dropped."})
    turns_max: int = field(default=3, metadata={"help": "Exchanges at most."})
    min_answer_chars: int = field(default=10, metadata={"help": "Dialogues with a shorter answer are dropped."})
    max_repetition: float = field(default=0.5, metadata={
        "help": "Share of repeated word 3-grams in one answer above which it is degenerate (dropped)."})

    def __post_init__(self):
        problems = []
        if self.mode not in MODE_NAMES:
            problems.append(f"mode: '{self.mode}' is not transcript, alternating or roleplay.")
        if not 1 <= self.turns_min <= self.turns_max:
            problems.append(f"turns: need 1 <= turns_min ({self.turns_min}) <= turns_max ({self.turns_max}).")
        if problems:
            raise ConfigError(problems, what="self-chat settings")


@dataclass
class SelfChatConfig(SelfChatSettings):
    """The settings, with what generation needs besides: sampling, the prompt templates, the batch size."""

    sampling: Sampling = field(default_factory=Sampling)
    templates: dict[str, str] = field(default_factory=lambda: dict(TEMPLATES))
    batch_size: int = 16  # dialogues generated together

    def __post_init__(self):
        super().__post_init__()
        problems = [f"template '{name}' has no {{seed}} placeholder." for name, text in self.templates.items()
                    if "{seed}" not in text]
        for name, text in self.templates.items():
            try:
                text.format(seed="")
            except (KeyError, IndexError, ValueError) as err:  # {other} or a lone brace: format() reads them too
                problems.append(f"template '{name}': braces other than {{seed}} must be doubled ({{{{ and }}}}) "
                                f"({type(err).__name__}: {err}).")
        if problems:
            raise ConfigError(problems, what="self-chat templates")


# Baize's structural post-processing ----------------------------------------------------------------------------


def parse_transcript(text: str) -> list[tuple[str, str]]:
    """Well-formed (human, AI) pairs from a transcript, stopping at the first malformed segment, less the last.

    Text before the first [Human] is ignored. A segment is malformed when a marker comes out of turn or its
    text is empty. The last pair is always dropped, because generation may have cut it off.
    """
    parts = re.split(r"(\[Human\]|\[AI\])", text)
    pairs, expected, human = [], HUMAN, None
    segments = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    for marker, content in segments:
        if marker != expected or not content:
            break
        if marker == HUMAN:
            human, expected = content, AI
        else:
            pairs.append((human, content))
            expected = HUMAN
    return pairs[:-1]


def pairs_to_messages(pairs: list[tuple[str, str]]) -> list[dict]:
    return [m for h, a in pairs for m in ({"role": "user", "content": h}, {"role": "assistant", "content": a})]


# Quality filters -----------------------------------------------------------------------------------------------


def repetition(text: str) -> float:
    """Share of word 3-grams that repeat an earlier one: ~0 for prose, near 1 for a loop."""
    words = text.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def echoes(question: str, answer: str, n: int = 5) -> float:
    """Share of a human turn's word n-grams found in the answer before it: a simulator parroting the assistant."""
    from llmft.dataset.clean import shingles

    asked = shingles(question, n)
    return len(asked & shingles(answer, n)) / len(asked) if asked else 0.0


def verdict(messages: list[dict], cfg: SelfChatConfig) -> str:
    """'ok', or why the dialogue is not kept."""
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    turns = len(answers)
    if turns == 0:
        return "no well-formed exchange"
    if turns < cfg.turns_min:
        return f"fewer than {cfg.turns_min} turns"
    for text in (m["content"] for m in messages):
        if any(marker in text for marker in LEAK_MARKERS):
            return "role marker leaked into a turn"
    if any(len(a.strip()) < cfg.min_answer_chars for a in answers):
        return f"answer shorter than {cfg.min_answer_chars} characters"
    if any(repetition(a) > cfg.max_repetition for a in answers):
        return "degenerate repetition"
    for before, turn in zip(messages, messages[1:]):
        if turn["role"] == "user" and before["role"] == "assistant" and echoes(turn["content"], before["content"]) > 0.5:
            return "human turn repeats the assistant"
    return "ok"


# The modes -----------------------------------------------------------------------------------------------------


def run_transcript(seeds: list[str], backend, cfg: SelfChatConfig) -> list[list[dict]]:
    prompts = [[{"role": "user", "content": cfg.templates["transcript"].format(seed=s)}] for s in seeds]
    texts = backend.chat(prompts, cfg.sampling)
    dialogues = []
    for seed, text in zip(seeds, texts):
        text = text if text.lstrip().startswith(HUMAN) else f"{HUMAN} {seed}\n{text}"
        dialogues.append(pairs_to_messages(parse_transcript(text)[: cfg.turns_max]))
    return dialogues


def run_alternating(seeds: list[str], backend, cfg: SelfChatConfig) -> list[list[dict]]:
    transcripts = [cfg.templates["alternating"].format(seed=s) + f"{HUMAN} {s}\n" for s in seeds]
    dialogues: list[list[dict]] = [[{"role": "user", "content": s}] for s in seeds]
    active = list(range(len(seeds)))
    for round_ in range(cfg.turns_max):
        answers = backend.complete([transcripts[i] + AI for i in active], cfg.sampling, stop=[HUMAN])
        for i, answer in zip(active, answers):
            dialogues[i].append({"role": "assistant", "content": answer})
            transcripts[i] += f"{AI} {answer}\n"
        if round_ + 1 == cfg.turns_max:
            break
        questions = backend.complete([transcripts[i] + HUMAN for i in active], cfg.sampling, stop=[AI])
        still = []
        for i, question in zip(active, questions):
            if question and END not in question:
                dialogues[i].append({"role": "user", "content": question})
                transcripts[i] += f"{HUMAN} {question}\n"
                still.append(i)
        active = still
        if not active:
            break
    return dialogues


def run_roleplay(seeds: list[str], backend, cfg: SelfChatConfig) -> list[list[dict]]:
    dialogues: list[list[dict]] = [[{"role": "user", "content": s}] for s in seeds]
    active = list(range(len(seeds)))
    for round_ in range(cfg.turns_max):
        answers = backend.chat([dialogues[i] for i in active], cfg.sampling)
        for i, answer in zip(active, answers):
            dialogues[i].append({"role": "assistant", "content": answer})
        if round_ + 1 == cfg.turns_max:
            break
        views = [simulator_view(cfg.templates["user_simulator"].format(seed=seeds[i]), dialogues[i]) for i in active]
        questions = backend.chat(views, cfg.sampling)
        still = []
        for i, question in zip(active, questions):
            if question and END not in question:
                dialogues[i].append({"role": "user", "content": question})
                still.append(i)
        active = still
        if not active:
            break
    return dialogues


def simulator_view(instructions: str, dialogue: list[dict]) -> list[dict]:
    """The chat the user simulator answers, roles swapped: the assistant's answers are its "user" turns and the
    human's lines its own. Its instructions and the opening exchange form the first user message, so the view starts
    on the user, alternates and has no system message: templates that refuse a system role or require alternation
    (Gemma, Mistral) render it."""
    opening = (f"{instructions}\n\nYour first message to the assistant was:\n{dialogue[0]['content']}\n\n"
               f"The assistant answered:\n{dialogue[1]['content']}")
    return [{"role": "user", "content": opening}] + [
        {"role": "user" if m["role"] == "assistant" else "assistant", "content": m["content"]} for m in dialogue[2:]]


MODES = {"transcript": run_transcript, "alternating": run_alternating, "roleplay": run_roleplay}


# Resumable output ----------------------------------------------------------------------------------------------


class DialogueWriter:
    """Appends one JSON line per finished dialogue, flushed and synced; knows which seeds are done.

    A line cut short by a crash is removed on open, so its seed is generated again: nothing lost, nothing twice.
    """

    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        if path.exists():
            self._recover()
        self._file = path.open("a", encoding="utf-8")

    def _recover(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
        if end < len(data):
            log.warning("%s: removing a partial last line (%d bytes) left by an interrupted run", self.path,
                        len(data) - end)
            with self.path.open("r+b") as f:
                f.truncate(end)
        for line in data[:end].decode("utf-8").split("\n"):  # not splitlines: U+2028 may sit in a record
            if line.strip():
                self.done.add(json.loads(line)["seed_id"])

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.add(record["seed_id"])

    def close(self) -> None:
        self._file.close()


def generate(seeds: list[tuple[str, str]], backend, cfg: SelfChatConfig, out: Path) -> dict[str, Any]:
    """Self-chat for every seed not yet in out/dialogues.jsonl; returns counts and speed."""
    out.mkdir(parents=True, exist_ok=True)
    writer = DialogueWriter(out / "dialogues.jsonl")
    todo = [(sid, text) for sid, text in seeds if sid not in writer.done]
    log.info("%d seeds, %d already done, %d to generate (%s mode)", len(seeds), len(seeds) - len(todo), len(todo),
             cfg.mode)
    started, tokens_before, written = time.time(), backend.generated_tokens, 0
    bar = tqdm(total=len(todo), desc="Self-chat", unit="dialogue")
    try:
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            dialogues = MODES[cfg.mode]([text for _, text in chunk], backend, cfg)
            for (sid, text), messages in zip(chunk, dialogues):
                writer.write({"seed_id": sid, "seed": text, "mode": cfg.mode, "model": backend.name,
                              "status": verdict(messages, cfg), "messages": messages})
                written += 1
            elapsed = time.time() - started
            bar.update(len(chunk))
            bar.set_postfix(dialogues_s=f"{written / elapsed:.2f}",
                            tokens_s=f"{(backend.generated_tokens - tokens_before) / elapsed:.1f}")
    finally:
        bar.close()
        writer.close()
    elapsed = time.time() - started
    return {"generated": written, "seconds": round(elapsed, 1),
            "generated_tokens": backend.generated_tokens - tokens_before,
            "dialogues_per_s": written / elapsed if elapsed else 0.0}


def read_seeds(path: str, column: str | None, id_column: str | None, limit: int | None) -> list[tuple[str, str]]:
    """(seed id, question) from a text file (one per line), or a column of a JSONL/JSON/CSV/Parquet file or Hub id."""
    from llmft.dataset.sources import read_source
    from llmft.schema import RowError

    if path.endswith(".txt"):
        try:
            lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
        except OSError as err:
            raise GenerationError(f"cannot read the seeds file {path}: {err.strerror}.") from err
        except UnicodeDecodeError as err:
            raise GenerationError(f"{path}: not UTF-8 text (byte {err.start + 1}); save the seeds file as UTF-8.") from err
        seeds = [(f"line-{i + 1}", text) for i, text in enumerate(lines) if text]
    else:
        if not column:
            raise GenerationError(f"{path}: say which column holds the seed questions (--seed-column).")
        seeds = []
        rows = list(read_source(path))
        for where, row in rows:
            if isinstance(row, RowError):
                raise GenerationError(f"{where}: {row}.")
            if not isinstance(row.get(column), str) or not row[column].strip():
                raise GenerationError(f"{where}: no text in column '{column}'.")
            if id_column and row.get(id_column) in (None, ""):
                raise GenerationError(f"{where}: no id in column '{id_column}' (--seed-id-column).")
            seeds.append((str(row[id_column]) if id_column else where, row[column].strip()))
    if not seeds:
        raise GenerationError(f"{path}: no seed questions in it.")
    ids = [sid for sid, _ in seeds]
    if len(set(ids)) != len(ids):
        raise GenerationError(f"{path}: seed ids repeat; give a column of unique ids (--seed-id-column).")
    return seeds[:limit] if limit else seeds


def finalize(out: Path, meta: dict[str, Any], test_fraction: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Kept dialogues -> a messages dataset (dedupe, split, manifest, card) under out/dataset, with self-chat facts."""
    from collections import Counter

    from llmft.dataset.build import BuildConfig, Source, build, data_card

    records = [json.loads(line) for line in (out / "dialogues.jsonl").read_text(encoding="utf-8").split("\n") if line]
    statuses = Counter(r["status"] for r in records)
    accepted = out / "accepted.jsonl"
    with accepted.open("w", encoding="utf-8") as f:
        for r in records:
            if r["status"] == "ok":
                f.write(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n")
    if not statuses["ok"]:
        raise GenerationError(f"no dialogue passed the filters ({dict(statuses)}); see {out / 'dialogues.jsonl'}.")
    manifest = build(BuildConfig(sources=[Source(path=str(accepted), format="openai", name="self-chat")],
                                 out=str(out / "dataset"), test_fraction=test_fraction, seed=seed), meta["command"])
    manifest["self_chat"] = {**meta, "dialogues": len(records), "filters": dict(statuses)}
    (out / "dataset" / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    card = data_card(manifest) + "\n## Self-chat\n\n" + "\n".join(
        [f"- {k}: {v}" for k, v in meta.items() if k != "command"]
        + [f"- dialogues generated: {len(records)}"] + [f"- {n} x {why}" for why, n in statuses.most_common()])
    (out / "dataset" / "data_card.md").write_text(card + "\n")
    return manifest


def config_dict(cfg: SelfChatConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k != "templates"}


def selfchat_command(run: SelfChatRunOptions, settings: SelfChatSettings, sampling: Sampling,
                     backend_options: BackendOptions, command: str) -> None:
    """`llmft selfchat`: generate (resuming where a previous run stopped), filter, build the dataset."""
    from llmft.parsing import read_yaml_mapping, unknown_keys

    missing = [flag for flag, value in (("--seeds", run.seeds), ("--out", run.out)) if not value]
    if missing:
        raise ConfigError([f"{flag}: missing (give it as a flag or in --config)." for flag in missing],
                          what="the options of llmft selfchat")
    templates = dict(TEMPLATES)
    if run.templates:
        overrides = read_yaml_mapping(run.templates, "self-chat templates")
        problems = unknown_keys(overrides, templates, f"{run.templates}: ")
        problems += [f"{run.templates}: {k}: must be text with {{seed}}." for k, v in overrides.items()
                     if k in templates and not isinstance(v, str)]
        if problems:
            raise ConfigError(problems, what="self-chat templates")
        templates.update(overrides)
    cfg = SelfChatConfig(**asdict(settings), sampling=sampling, templates=templates, batch_size=backend_options.batch_size)
    seeds = read_seeds(run.seeds, run.seed_column, run.seed_id_column, run.limit)
    backend = make_backend(backend_options)
    out = Path(run.out)
    speed = generate(seeds, backend, cfg, out)
    meta = {"command": command, "seeds": run.seeds, "model": backend.name, **config_dict(cfg), **speed}
    manifest = finalize(out, meta, run.test_fraction, run.seed)
    filters = manifest["self_chat"]["filters"]
    print(f"dialogues: {manifest['self_chat']['dialogues']} ({', '.join(f'{n} {k}' for k, n in filters.items())})")
    for name, output in manifest["output"].items():
        print(f"{name}: {output['rows']} rows -> {output['path']}")
