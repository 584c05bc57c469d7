"""`llmft chat RUN`: talk to a run in the terminal, with the run's own chat template and end-of-turn token.

A run directory loads as its adapter on the recorded base (or its full model); a merged folder or any model folder
loads as it is. Answers stream token by token. Commands: /reset clears the conversation, /system TEXT sets the
system prompt (/system alone removes it), /history prints the conversation as JSON, /quit (or Ctrl-D) leaves;
Ctrl-C stops an answer. A line ending in a backslash continues on the next line, and a line of three double quotes
opens and closes a block of several lines.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from llmft.errors import ConfigError, GenerationError

BLOCK = '"""'
HELP = ("/reset clears the conversation, /system TEXT sets the system prompt, /history shows it, /quit leaves; "
        'end a line with \\ to continue it, or put several lines between """ lines.')


@dataclass
class ChatOptions:
    run: str = field(metadata={"positional": True, "help": "A run directory, a merged model folder, or a model."})
    system: str | None = field(default=None, metadata={"help": "System prompt to start with."})
    max_new_tokens: int = field(default=512, metadata={"help": "Longest answer in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 answers greedily."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold."})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 (faster where bf16 is native)."})

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append("--max-new-tokens must be 1 or more.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            problems.append("--temperature must be 0 or more and --top-p in (0, 1].")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"--dtype {self.dtype}: float32 or bfloat16.")
        if problems:
            raise ConfigError(problems, what="the options of llmft chat")


def chat_command(options: ChatOptions) -> None:
    model, tokenizer, label = load(options)
    session = Session(options.system)
    print(f"llmft chat: {label}\n{HELP}", flush=True)
    while True:
        try:
            text = read_message()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as shells do
            print()
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            if session.command(text.strip()) == "quit":
                return
            continue
        session.messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        try:
            answer = stream_answer(model, tokenizer, session.conversation(), options)
        except GenerationError as err:  # the session goes on without the question
            session.messages.pop()
            print(f"llmft chat: {err}. The question is dropped; /reset starts the conversation again.",
                  file=sys.stderr)
            continue
        session.messages.append({"role": "assistant", "content": answer})


class Session:
    """The conversation and the system prompt; the slash commands act on them."""

    def __init__(self, system: str | None):
        self.system, self.messages = system, []

    def conversation(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/reset":
            self.messages = []
            print("(conversation cleared)", flush=True)
        elif name == "/system":
            self.system = rest.strip() or None
            print(f"(system prompt: {self.system!r})" if self.system else "(no system prompt)", flush=True)
        elif name == "/history":
            print(json.dumps(self.conversation(), ensure_ascii=False, indent=1), flush=True)
        else:
            print(f"(unknown command {name}; {HELP})", flush=True)
        return None


def read_message() -> str:
    """One message: a line, lines joined by trailing backslashes, or a block between lines of three quotes."""
    line = input("you> ")
    if line.strip() == BLOCK:
        lines = []
        while (line := input("... ")).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1].rstrip())
        line = input("... ")
    return "\n".join([*lines, line])


def stream_answer(model, tokenizer, messages: list[dict[str, str]], options: ChatOptions) -> str:
    """Generate in a thread and print tokens as they come; Ctrl-C stops the answer and keeps what was said."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    from llmft.model import stop_token_ids

    stop = threading.Event()

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = ({"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
                if options.temperature > 0 else {"do_sample": False})
    kwargs = dict(**ids.to(model.device), max_new_tokens=options.max_new_tokens, streamer=streamer,
                  eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                  stopping_criteria=StoppingCriteriaList([Stop()]), **sampling)
    failed = []

    def generate():
        try:
            torch.no_grad()(model.generate)(**kwargs)
        except Exception as err:  # out of memory, a conversation past the model's positions: said, not a hang
            failed.append(err)
            streamer.end()  # the loop below waits on the streamer, which only a finished generation closes

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    pieces = []
    try:
        for piece in streamer:
            pieces.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        for piece in streamer:  # drain what the last step produced
            pieces.append(piece)
        print(" (stopped)", end="")
    worker.join()
    print(flush=True)
    if failed:
        raise GenerationError(f"generation failed: {type(failed[0]).__name__}: {failed[0]}")
    return "".join(pieces).strip()


def load(options: ChatOptions):
    """(model, tokenizer, a label): a run as training left it, or a model folder as it is."""
    from llmft.config import ModelConfig, PeftSettings
    from llmft.model import load_model, load_run_model, load_tokenizer, on_gpu_if_any
    from llmft.run_dir import is_run, read_run

    path = Path(options.run)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=options.run))
    if is_run(path):
        run = read_run(path)
        from llmft.stages import STAGES

        if run.info.stage in STAGES and STAGES[run.info.stage].head != "causal_lm":
            raise ConfigError([f"{path}: a {run.info.stage} run scores answers and cannot write them; chat with a "
                               "run that generates (sft, dpo, grpo...), or score with llmft eval."],
                              what="the options of llmft chat")
        how = f"adapter on {run.info.base_model.name_or_path}" if run.is_adapter else "full model"
        model = load_run_model(run, options.dtype)
    else:
        how = "model"
        model = load_model(ModelConfig(name_or_path=options.run, dtype=options.dtype), PeftSettings(method="full"))
    model = on_gpu_if_any(model).eval()
    return model, tokenizer, f"{options.run} ({how}, ends a turn at {tokenizer.eos_token!r})"
