"""Property tests: valid rows, files and recipes, broken at random, never get past llmft as anything but a clear
error (an LlmftError, or a RowError naming the field), and what passes validation trains.

Hypothesis mutates known-good inputs (replace a value anywhere with another JSON value, drop a key, add one), which
reaches far more broken shapes than hand-written cases do; tests/bad_inputs/ pins the messages users see.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmft.config import load_recipe
from llmft.data import IGNORE, tokenize_row
from llmft.dataset.build import BuildConfig, Source, build
from llmft.dataset.clean import normalise_messages
from llmft.dataset.formats import CONVERTERS, from_columns, from_sharegpt, oasst_paths
from llmft.errors import ConfigError, DataError
from llmft.schema import RowError, conversation_problems, tools_problems
from tests.test_templates import tokenizer_for

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

KEYS = ["role", "content", "messages", "conversations", "from", "value", "instruction", "input", "output", "history",
        "prompt", "completion", "tool_calls", "tools", "function", "name", "arguments", "reasoning_content", "id",
        "type", "text", "replies", "rank", "question", "answer"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "", "{}"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=12)

CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                         "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}
GOOD_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Two plus two?"},
                  {"role": "assistant", "content": "Four."}]},
    {"messages": [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "name": "add", "content": "3"}, {"role": "assistant", "content": "It is 3."}],
     "tools": [TOOL]},
    {"messages": [{"role": "user", "content": "Why?"},
                  {"role": "assistant", "reasoning_content": "Think first.", "content": "Because."}]},
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "history": [["Hi", "Hello"]]},
    {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi?"},
                       {"from": "gpt", "value": "Hello."}]},
    {"prompt": "Say yes.", "completion": "Yes."},
    {"prompt": [{"role": "user", "content": "Say no."}], "completion": [{"role": "assistant", "content": "No."}]},
]
OASST = {"message_id": "a", "role": "prompter", "text": "Hi?", "replies": [
    {"message_id": "b", "role": "assistant", "text": "Hello.", "rank": 0, "replies": [
        {"message_id": "c", "role": "prompter", "text": "Bye?", "replies": []}]},
    {"message_id": "d", "role": "assistant", "text": "Hey.", "rank": 1, "replies": []}]}


def _places(value, path=()):
    """Every (path) inside a JSON value, the value itself first."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _places(child, (*path, key))


@st.composite
def mutated(draw, good=st.sampled_from(GOOD_ROWS)):
    """A good value with one to three random changes: a value replaced, a key or item dropped, a key added."""
    value = copy.deepcopy(draw(good))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_places(value))))
        if not path:
            continue
        *parent_path, key = path
        parent = value
        for step in parent_path:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[key] = draw(JSON)
        elif action == "drop":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(JSON)
    return value


def _converted(row) -> list:
    """What each reader makes of a row: messages, or a RowError; anything else escapes and fails the test."""
    readers = [*CONVERTERS.values(), from_sharegpt, lambda r: from_columns(r, "question", "answer", "system")]
    results = []
    for read in readers:
        try:
            results.append(read(row))
        except RowError as err:
            assert str(err), "a RowError must say what is wrong"
            results.append(err)
    return results


@pytest.fixture(scope="module")
def qwen3():
    """A real template that renders tools, tool results and reasoning (Qwen3's, shipped with TRL)."""
    return tokenizer_for("qwen3")[0]


@FUZZ
@given(row=mutated())
def test_readers_and_validator_never_crash_and_what_passes_trains(row, qwen3):
    for result in _converted(row):
        if isinstance(result, RowError):
            continue
        messages = normalise_messages(result)
        problems = conversation_problems(messages, strict=True) + tools_problems(row.get("tools"))
        assert all(isinstance(p, str) and p for p in problems)
        if problems:
            continue
        event("validated and tokenized")
        # Validated means trainable: the template renders it and every assistant answer carries loss.
        pairs = tokenize_row({"messages": messages, "tools": row.get("tools")}, qwen3, "messages")
        for input_ids, labels in pairs:
            assert len(input_ids) == len(labels)
            assert all(label in (IGNORE, token) for token, label in zip(input_ids, labels))
        assert any(label != IGNORE for _, labels in pairs for label in labels), messages


@FUZZ
@given(tree=mutated(st.just(OASST)), best_only=st.booleans())
def test_oasst_trees_never_crash(tree, best_only):
    try:
        paths = oasst_paths(tree, best_only)
    except RowError:
        return
    for path in paths:
        assert all(m["role"] in ("user", "assistant") and isinstance(m["content"], str) for m in path)


OASST_FLAT = [{"message_id": "a", "parent_id": None, "role": "prompter", "text": "Hi?"},
              {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "Hello.", "rank": 0},
              {"message_id": "c", "parent_id": "b", "role": "prompter", "text": "Bye?", "deleted": True}]
STRANGE_LINES = [b"", b"[1, 2]", b'{"messages": ', b"\xff\xfe{}", b"\xef\xbb\xbf{}", b'{"a": "\\ud800"}',
                 b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}", b'{"message_id": "a", "parent_id": "a"}']
LINE = st.one_of(
    mutated().map(lambda row: json.dumps(row).encode()),
    mutated(st.sampled_from(OASST_FLAT)).map(lambda row: json.dumps(row).encode()),
    st.sampled_from([json.dumps(row).encode() for row in GOOD_ROWS + OASST_FLAT]),
    st.text(max_size=30).map(str.encode), st.binary(max_size=30), st.sampled_from(STRANGE_LINES))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=6), on_error=st.sampled_from(["skip", "fail"]),
       fmt=st.sampled_from([None, None, "oasst", "alpaca", "sharegpt", "columns", "openai"]))
def test_files_of_broken_lines_build_or_say_why(lines, on_error, fmt, tmp_path_factory):
    """Any bytes, as a JSON-lines file in any format: a dataset with every row accounted for, or an LlmftError.
    build() lets any other exception through (a bug is not bad input), so a crash fails here."""
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "rows.jsonl"
    path.write_bytes(b"\n".join(lines))
    config = BuildConfig(out=str(folder / "out"), on_error=on_error, near_dedupe_threshold="off",
                         sources=[Source(path=str(path), format=fmt)])
    try:
        manifest = build(config)
    except (DataError, ConfigError) as err:
        assert str(err)
        return
    source = manifest["sources"][0]
    assert source["read"] == source["kept"] + sum(source["rejected"].values())
    written = sum(split["rows"] for split in manifest["output"].values())
    assert written == source["kept"] - manifest["steps"]["dedupe"]["exact"]
    assert written > 0


GOOD_RECIPE = {
    "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "float32"},
    "data": {"train_data": "train.jsonl", "eval_fraction": 0.1, "reasoning": "keep"},
    "peft": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "training": {"output_dir": "runs/x", "max_steps": 3, "learning_rate": 1e-4, "per_device_train_batch_size": 2,
                 "max_length": 256, "logging_steps": 1},
    "eval": {"baseline": False, "max_new_tokens": 16},
    "hub": {"push": False},
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=mutated(st.just(GOOD_RECIPE)))
def test_broken_recipes_load_or_say_why(recipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        load_recipe(path)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)


FLAGS = ["--learning_rate", "--max_steps", "--r", "--method", "--train_data", "--max_length", "--dtype",
         "--eval_fraction", "--bf16", "--lr_scheduler_type", "--lora_dropout", "--reasoning", "--push"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.sampled_from(FLAGS) | st.text(max_size=8) | st.sampled_from(["-1", "0", "1e9", "nan", "true"]),
                     max_size=6))
def test_command_line_overrides_parse_or_say_why(argv, tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(GOOD_RECIPE))
    try:
        load_recipe(path, argv)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
