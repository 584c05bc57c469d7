"""Where the assistant's tokens are in a rendered conversation, for any chat template: the loss mask.

A template is first probed (a conversation with a system prompt, two turns, a reasoning trace and, where the
template supports them, tools, a tool call and its result), and gets one of three strategies:

  incremental         the template renders each turn the same whether or not later turns follow (Llama 3.x,
                      Qwen 2.5, Gemma, SmolLM2, Mistral...): render the conversation turn by turn; an assistant
                      message runs from the end of the generation prompt before it to the end of its rendering.
  generation_markers  it rewrites earlier turns (Qwen3 drops earlier reasoning, Phi-3 and GPT-OSS change earlier
                      turns) and TRL ships a training version of it with {% generation %} markers: render with that
                      version; the markers give the assistant spans.
  per_turn            it rewrites earlier turns and has no training version: each assistant turn is its own
                      example, the conversation before it rendered exactly as the template renders it at inference.

Every strategy masks an assistant message's content, its tool-call text, its reasoning when the template renders
it, and its end-of-turn token; never system, user or tool-result text or role headers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from llmft.errors import DataError
from llmft.schema import REASONING_FIELDS, Messages, reasoning_of, trainable

log = logging.getLogger(__name__)
Spans = list[tuple[int, int]]

PROBE: Messages = [
    {"role": "system", "content": "Probe system prompt."},
    {"role": "user", "content": "Probe question one?"},
    {"role": "assistant", "content": "Probe answer one.", "reasoning_content": "Probe reasoning one."},
    {"role": "user", "content": "Probe question two?"},
    {"role": "assistant", "content": "Probe answer two."},
]
PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_lookup", "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}]
PROBE_TOOL_TURNS: Messages = [
    {"role": "user", "content": "Probe question three?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "probe_lookup", "arguments": {"word": "Probe argument."}}}]},
    {"role": "tool", "name": "probe_lookup", "content": "Probe tool result."},
    {"role": "assistant", "content": "Probe answer three."},
]


class NotIncremental(Exception):
    """The template rendered an earlier turn differently once a later turn followed."""


@dataclass(frozen=True)
class Masking:
    """How one chat template is masked, and why (logged, and recorded in run.json and the data report)."""

    strategy: str
    reason: str
    template: str  # what training renders with: the tokenizer's own template, or TRL's training version of it
    training_template: str | None = None  # the name of TRL's training template, when one is used
    reasoning: str | None = None  # how the template keeps a trace: "field" (reasoning_content), "inline" (a <think>
    # block in the content), or None (it drops both)
    supports_tools: bool = False  # tools, tool calls and tool results survive its rendering
    system: bool = True  # it accepts a system message

    def describe(self) -> str:
        tools = "renders tools" if self.supports_tools else "does not render tool calls and results"
        reasoning = {"field": "renders reasoning_content", "inline": "keeps reasoning as a <think> block",
                     None: "drops reasoning"}[self.reasoning]
        return f"{self.strategy} ({self.reason}; {tools}; {reasoning})"

    def record(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "reason": self.reason, "training_template": self.training_template,
                "template_sha256": hashlib.sha256(self.template.encode()).hexdigest(),
                "reasoning": self.reasoning, "supports_tools": self.supports_tools}


# Rendering -----------------------------------------------------------------------------------------------------


def render(tokenizer: PreTrainedTokenizerBase, messages: Messages, template: str, tools=None,
           generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def render_marked(tokenizer: PreTrainedTokenizerBase, messages: Messages, template: str, tools=None):
    """(text, spans) from a template's {% generation %} blocks, in order."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, indices = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                           return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    return texts[0], [tuple(span) for span in indices[0]]


def incremental(tokenizer, messages: Messages, template: str, tools=None, first_trainable: int = 0):
    """(text, spans): each assistant message from the end of the generation prompt before it to the end of its own
    rendering, less trailing whitespace (so its end-of-turn token, not the newline after it)."""
    text = render(tokenizer, messages, template, tools)
    spans = []
    for i, before, through in _turns(tokenizer, messages, template, tools, first_trainable):
        if not (through.startswith(before) and text.startswith(through)):
            raise NotIncremental(i)
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def _learned(messages: Messages, first_trainable: int) -> list[int]:
    """The assistant messages that carry loss: not in a conversational prompt, not marked weight 0."""
    return [i for i, message in enumerate(messages) if i >= first_trainable and trainable(message)]


def _turns(tokenizer, messages: Messages, template: str, tools, first_trainable: int):
    """(index, the conversation before it with the generation prompt, the conversation through it) for every
    trainable assistant message."""
    for i in _learned(messages, first_trainable):
        yield (i, render(tokenizer, messages[:i], template, tools, generation_prompt=True),
               render(tokenizer, messages[: i + 1], template, tools))


def per_turn(tokenizer, messages: Messages, template: str, tools=None, first_trainable: int = 0):
    """[(text, [span])] for each assistant message: the conversation up to it as the template renders it with that
    message last, the loss on that message alone."""
    prompt = _generation_prompt(tokenizer, template, tools)
    examples = []
    for _, before, through in _turns(tokenizer, messages, template, tools, first_trainable):
        # Where the answer departs from the generation prompt: its end, or earlier when the prompt pre-fills part of
        # an answer that this one writes otherwise (Nemotron's '<think>\n' before an answer without reasoning),
        # then past a turn header the template opens there itself (Gemma's '<|turn>model\n' after a tool result).
        start = len(os.path.commonprefix([before, through]))
        start += len(os.path.commonprefix([prompt, through[start:]]))
        text = through.rstrip()
        if not _ends_special(tokenizer, text) and tokenizer.eos_token:
            text += tokenizer.eos_token  # no end-of-turn token (GLM-4): the model must still learn to stop
        examples.append((text, [(start, len(text))]))
    return examples


def _ends_special(tokenizer, text: str) -> bool:
    return any(text.endswith(token) for token in tokenizer.get_added_vocab())


def markers(tokenizer, messages: Messages, template: str, tools=None, first_trainable: int = 0):
    """(text, spans) from the training template's {% generation %} blocks (one or more per assistant message); the
    blocks of assistant messages that carry no loss (a conversational prompt's, those marked weight 0) are left out:
    TRL's training templates render a conversation's start the same whatever follows, so such a message's blocks lie
    between the renderings of the conversation before it and through it. A block that opens with what the
    generation prompt already says (DeepSeek's '<｜Assistant｜>', and the '<think>\n' its R1 prompt pre-fills)
    starts after it: the model is not the one writing that part."""
    text, spans = render_marked(tokenizer, messages, template, tools)
    prompt_end = len(render_marked(tokenizer, messages[:first_trainable], template, tools)[0]) if first_trainable else 0
    skipped = [(0, prompt_end)] + [(len(render_marked(tokenizer, messages[:i], template, tools)[0]),
                                    len(render_marked(tokenizer, messages[: i + 1], template, tools)[0]))
                                   for i, message in enumerate(messages)
                                   if i >= first_trainable and message["role"] == "assistant" and not trainable(message)]
    prompt = _generation_prompt(tokenizer, template, tools)
    return text, [(a + len(os.path.commonprefix([prompt, text[a:b]])), b) for a, b in spans
                  if not any(start <= a < end for start, end in skipped)]


_PROMPTS: dict[tuple[str, str, str], str] = {}


def _generation_prompt(tokenizer, template: str, tools=None) -> str:
    """What the template adds to ask for an answer (e.g. '<|im_start|>assistant\n'), remembered per template."""
    key = (tokenizer.name_or_path, template, repr(tools))
    if key not in _PROMPTS:
        asked = [{"role": "user", "content": "Probe question one?"}]
        plain = render(tokenizer, asked, template, tools)
        prompted = render(tokenizer, asked, template, tools, generation_prompt=True)
        _PROMPTS[key] = prompted[len(plain):] if prompted.startswith(plain) else ""
    return _PROMPTS[key]


def examples(tokenizer, masking: Masking, messages: Messages, tools=None, first_trainable: int = 0):
    """([(text, spans)], whether the conversation had to be trained turn by turn though its template is incremental)
    of one conversation under its template's strategy: one item, or one per assistant turn. It ends with its last
    learned answer: turns after it carry no loss and cannot change the loss before them."""
    learned = _learned(messages, first_trainable)
    messages = messages[: learned[-1] + 1] if learned else messages
    if masking.strategy == "generation_markers":
        return [markers(tokenizer, messages, masking.template, tools, first_trainable)], False
    if masking.strategy == "per_turn":
        return per_turn(tokenizer, messages, masking.template, tools, first_trainable), False
    try:
        return [incremental(tokenizer, messages, masking.template, tools, first_trainable)], False
    except NotIncremental:  # this conversation has something the probe had not: train it turn by turn
        return per_turn(tokenizer, messages, masking.template, tools, first_trainable), True


def prepare(messages: Messages, masking: Masking, reasoning: str, model: str = "") -> Messages:
    """Messages as training renders them. reasoning drop: traces removed. keep: traces kept, as reasoning_content
    where the template renders that field, else as a <think> block opening the content."""
    out = []
    for message in messages:
        if message.get("role") != "assistant":
            out.append(message)
            continue
        trace, content = reasoning_of(message)
        kept = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
        if reasoning == "drop" or not trace or (masking.reasoning is None and not trainable(message)):
            out.append({**kept, "content": content})  # (a context-only answer's trace is not learned: it may go)
        elif masking.reasoning == "field":
            out.append({**kept, "content": content, "reasoning_content": trace})
        elif masking.reasoning == "inline":
            out.append({**kept, "content": f"<think>\n{trace}\n</think>\n\n{content}"})
        else:
            raise DataError(f"the chat template of {model or 'this tokenizer'} drops reasoning traces (neither "
                            "reasoning_content nor a <think> block survives its rendering), so they cannot be "
                            "trained: set data.reasoning: drop (llmft eval: --reasoning drop) to use the answers "
                            "without them.")
    return out


def agreement(tokenizer, masking: Masking, prompt: Messages, answer: str, tools=None, reasoning: str = "keep"):
    """None when training renders the conversation before an answer as the tokenizer's own template renders it at
    inference (its generation prompt); else where and how the two differ."""
    messages = prepare([*prompt, {"role": "assistant", "content": answer}], masking, reasoning)
    text, _ = examples(tokenizer, masking, messages, tools, first_trainable=len(prompt))[0][-1]
    served = render(tokenizer, messages[:-1], tokenizer.chat_template, tools, generation_prompt=True)
    if text.startswith(served):  # the trained answer continues exactly what inference shows the model
        return None
    at = len(os.path.commonprefix([text, served]))
    return (f"training renders {text[max(0, at - 40): at + 40]!r} where inference renders "
            f"{served[max(0, at - 40): at + 40]!r} (character {at})")


# Choosing a strategy -------------------------------------------------------------------------------------------


_DECIDED: dict[tuple[str, str], Masking] = {}


def masking_for(tokenizer: PreTrainedTokenizerBase) -> Masking:
    """The strategy for this tokenizer's chat template (probed once per model and template, then remembered)."""
    key = (tokenizer.name_or_path, tokenizer.chat_template)
    if key not in _DECIDED:
        _DECIDED[key] = _Probe(tokenizer).decide()
    return _DECIDED[key]


class _Probe:
    """Renders the probe conversations with a template to find what it keeps and how it renders turns."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decide(self) -> Masking:
        own = self.tokenizer.chat_template
        system = self._renders(own, PROBE[:3]) is not None
        conversation = PROBE if system else PROBE[1:]
        features = {"reasoning": self._reasoning(own), "supports_tools": self._supports_tools(own), "system": system}
        probes = [(conversation, None)]
        if features["supports_tools"]:
            probes.append((conversation + PROBE_TOOL_TURNS, PROBE_TOOLS))
        try:
            for messages, tool_schemas in probes:
                incremental(self.tokenizer, messages, own, tool_schemas)
            return Masking("incremental", "the template renders every turn the same whatever follows", own, **features)
        except NotIncremental:
            pass
        per_turn_masking = Masking("per_turn", "the template rewrites earlier turns and TRL has no training version "
                                   "of it: each assistant turn is its own example", own, **features)
        training = _trl_training_template(self.tokenizer)
        if training is None:
            return per_turn_masking
        name, text = training
        source = f"TRL's {name}" if name.endswith("_training") else "its own {% generation %} markers"
        marked = Masking("generation_markers", f"the template rewrites earlier turns; {source} marks the "
                         "answers", text, training_template=name, reasoning=self._reasoning(text),
                         supports_tools=self._supports_tools(text) and features["supports_tools"], system=system)
        if marked.reasoning and not self._marks_reasoning(marked, conversation):
            return dataclasses.replace(per_turn_masking, reason=f"the template rewrites earlier turns and {source} "
                                       "drops their reasoning: each assistant turn is its own example")
        if agreement(self.tokenizer, marked, conversation[:-1], conversation[-1]["content"],
                     reasoning="keep" if marked.reasoning else "drop") is None:
            return marked
        if marked.reasoning and per_turn_masking.reasoning is None:  # turn by turn would lose every trace
            return dataclasses.replace(marked, reason=f"the template drops reasoning; {source} keeps it and "
                                       "marks the answers (earlier turns render with their reasoning, unlike at "
                                       "inference: llmft check reports such conversations)")
        return dataclasses.replace(per_turn_masking, reason=f"the template rewrites earlier turns and {source} "
                                   "renders them unlike inference: each assistant turn is its own example")

    def _renders(self, template: str, messages, tools=None) -> str | None:
        try:
            return render(self.tokenizer, messages, template, tools)
        except Exception:  # jinja's TemplateError and the templates' own raise_exception: not rendered
            return None

    def _reasoning(self, template: str) -> str | None:
        """How a trace survives rendering: as the reasoning_content field, inline as a <think> block, or not."""
        text = self._renders(template, PROBE[1:3])
        if text is not None and "Probe reasoning one." in text:
            return "field"
        inline = [PROBE[1], {"role": "assistant", "content": "<think>\nProbe reasoning one.\n</think>\n\nAnswer."},
                  *PROBE[3:]]
        text = self._renders(template, inline)
        return "inline" if text is not None and "Probe reasoning one." in text else None

    def _supports_tools(self, template: str) -> bool:
        """Whether a tool call's arguments and a tool's result both survive rendering (some templates silently drop
        one of them)."""
        text = self._renders(template, PROBE[1:3] + PROBE_TOOL_TURNS, PROBE_TOOLS)
        return text is not None and all(s in text for s in ("Probe argument.", "Probe tool result."))

    def _marks_reasoning(self, marked: Masking, conversation: Messages) -> bool:
        """Whether the training template's marked answers hold the reasoning of an earlier turn."""
        text, spans = markers(self.tokenizer, prepare(conversation, marked, "keep"), marked.template)
        at = text.find("Probe reasoning one.")
        return at >= 0 and any(a <= at < b for a, b in spans)


def _trl_training_template(tokenizer) -> tuple[str, str] | None:
    """(name, text) of TRL's training version of this tokenizer's template, if TRL ships one."""
    from trl import chat_template_utils

    try:
        text = chat_template_utils.get_training_chat_template(tokenizer)
    except ValueError:  # TRL has no training version of this template
        return None
    if text is None:  # TRL finds the template already fit for training: its own markers
        return "the template itself", tokenizer.chat_template
    folder = Path(chat_template_utils.__file__).parent / "chat_templates"
    name = next((p.stem for p in sorted(folder.glob("*_training.jinja")) if p.read_text(encoding="utf-8") == text),
                "a training template")
    return name, text
