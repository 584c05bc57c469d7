"""Tool calling and reasoning traces end to end: converters keep them, the dataset stores them, training masks the
calls and (with data.reasoning: keep) the traces, and evaluation treats reasoning the way training did."""

import json

import datasets
import pytest

from llmft.cli import run as llmft
from llmft.config import load_recipe
from llmft.data import IGNORE, tokenize_messages
from llmft.dataset.formats import from_openai, from_sharegpt
from llmft.errors import DataError
from llmft.evaluation import prompt_texts
from llmft.train import train
from tests.helpers import SHARED_DATA, model_dir_for, write_jsonl, write_recipe
from tests.test_templates import TEMPLATES, tokenizer_for

GLAIVE = SHARED_DATA / "llamafactory_demo" / "glaive_toolcall_en_demo.json"
TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
SHAREGPT_ROW = {"conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": "{\"temp\": 21}"},
    {"from": "gpt", "value": "It is 21 degrees in Paris."}], "tools": json.dumps(TOOLS)}


def test_sharegpt_function_calls_and_observations_become_tool_calls_and_results():
    messages = from_sharegpt(SHAREGPT_ROW)
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert messages[2] == {"role": "tool", "content": "{\"temp\": 21}", "name": "get_weather"}


def test_openai_rows_keep_reasoning_under_one_name():
    row = {"messages": [{"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A", "reasoning": "Because.", "extra": 1}]}
    assert from_openai(row)[1] == {"role": "assistant", "content": "A", "reasoning_content": "Because."}


def _qwen_model(tmp_path, name="qwen2_5"):
    """A tiny random model whose tokenizer carries the real template of `name` (from trl/chat_templates)."""
    tokenizer, _ = tokenizer_for(name)
    return model_dir_for(tokenizer, tmp_path / f"model-{name}"), tokenizer


def test_tool_rows_convert_report_and_train_end_to_end(tmp_path, capsys):
    """ShareGPT tool rows -> llmft data convert (tools column, Arrow) -> data report (a tool conversation rendered
    with its mask) -> llmft train with Qwen 2.5's template: the call's text carries loss, the tool result none."""
    source = write_jsonl(tmp_path / "tools.jsonl", [SHAREGPT_ROW, {**SHAREGPT_ROW, "conversations": [
        {**t, "value": t["value"].replace("Paris", "Lyon")} for t in SHAREGPT_ROW["conversations"]]}])
    assert llmft(["data", "convert", str(source), "--out", str(tmp_path / "ds"), "--no-dedupe",
                  "--near-dedupe", "off"]) == 0
    stored = datasets.load_from_disk(str(tmp_path / "ds" / "train"))
    assert stored[0]["tools"] == [{"type": "function", "function": TOOLS[0]}]
    model_dir, tokenizer = _qwen_model(tmp_path)
    capsys.readouterr()
    assert llmft(["data", "report", str(tmp_path / "ds"), "--model", str(model_dir)]) == 0
    shown = capsys.readouterr().out
    assert "Loss masks: incremental" in shown and "⟦<tool_call>" in shown and "get_weather" in shown
    assert "⟦{\"temp\": 21}" not in shown  # the tool's result is context, not a target
    ((ids, labels),) = tokenize_messages(tokenizer, from_sharegpt(SHAREGPT_ROW), tools=stored[0]["tools"])
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert '"city": "Paris"' in trained and "21 degrees" in trained and "temp" not in trained
    out = tmp_path / "run"
    train(load_recipe(write_recipe(tmp_path / "r.yaml", model_dir, tmp_path / "ds" / "train", out,
                                   data={"eval_fraction": 0}, training={"max_steps": 2, "max_length": 4096},
                                   eval={"baseline": False})))
    assert json.loads((out / "run.json").read_text())["masking"]["supports_tools"] is True


@pytest.mark.skipif(not GLAIVE.exists(), reason=f"shared data folder absent: {SHARED_DATA}")
def test_the_glaive_tool_calling_sample_converts_with_its_tools(tmp_path):
    sample = tmp_path / "glaive.json"
    sample.write_text(json.dumps(json.loads(GLAIVE.read_text())[:40]))
    assert llmft(["data", "convert", str(sample), "--out", str(tmp_path / "ds")]) == 0
    rows = datasets.load_from_disk(str(tmp_path / "ds" / "train"))
    calls = [m for r in rows for m in r["messages"] if m["tool_calls"]]
    assert calls and all(c["tool_calls"][0]["function"]["name"] for c in calls)
    assert all(r["tools"] for r in rows if any(m["tool_calls"] for m in r["messages"]))


def test_a_template_without_tool_support_is_refused_by_name(tmp_path, capfd):
    from llmft.config import ModelConfig
    from llmft.model import load_tokenizer

    model_dir, _ = _qwen_model(tmp_path, "gemma3")  # renders no tools, raises on tool messages
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    with pytest.raises(DataError, match=f"the chat template of {model_dir} does not render tool schemas, tool calls"):
        tokenize_messages(tokenizer, from_sharegpt(SHAREGPT_ROW))
    # llmft data report names the row, as training does
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello."}]},
                                                 {"messages": from_sharegpt(SHAREGPT_ROW)}])
    capfd.readouterr()
    assert llmft(["data", "report", str(rows), "--model", str(model_dir)]) == 1
    assert "rows.jsonl: row 2: the chat template" in capfd.readouterr().err


REASONING_ROW = {"messages": [{"role": "user", "content": "Two plus two?"},
                              {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\nFour."},
                              {"role": "user", "content": "And three plus three?"},
                              {"role": "assistant", "content": "Six.", "reasoning_content": "Add again."}]}


@pytest.mark.parametrize("name", ["qwen3", "llama3_2"])
def test_reasoning_keep_trains_traces_and_drop_removes_them_in_training_and_eval(name):
    tokenizer, _ = tokenizer_for(name)
    for mode, wanted in (("keep", True), ("drop", False)):
        examples = tokenize_messages(tokenizer, REASONING_ROW["messages"], reasoning=mode)  # one per turn for Qwen3
        trained = " ".join(tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])
                           for ids, labels in examples)
        assert ("Add them." in trained and "Add again." in trained) == wanted, trained
        assert any("Add them." in tokenizer.decode(ids) for ids, _ in examples) == wanted
        assert "Four." in trained and "Six." in trained
    # Evaluation prompts carry the history's reasoning the way training did.
    prompt = [{"prompt": REASONING_ROW["messages"][:3], "reference": "Six."}]
    assert "Add them." in prompt_texts(tokenizer, prompt, "keep")[0] or name == "qwen3"  # Qwen3 drops past traces
    assert "Add them." not in prompt_texts(tokenizer, prompt, "drop")[0]


def test_data_reasoning_is_a_recipe_key_and_reaches_the_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", [REASONING_ROW] * 4)
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, out, data={"eval_fraction": 0,
                                      "reasoning": "drop"}, training={"max_steps": 1}, eval={"baseline": False}))
    train(recipe)
    from llmft.hub import model_card

    assert "| reasoning | drop |" in model_card(out, "org/x")
    with pytest.raises(Exception, match="data.reasoning: 'maybe' is not one of keep, drop"):
        load_recipe(tmp_path / "r.yaml", ["--reasoning", "maybe"])


def test_every_template_of_the_issue_list_is_tested():
    families = ["llama3", "llama3_1", "llama3_2", "qwen2_5", "qwen3", "qwen3_instruct_2507", "qwen3_5_think",
                "qwen3_6", "gemma", "gemma3", "phi3", "phi3_5", "deepseek_r1_distill", "deepseekv3", "gptoss",
                "cohere", "cohere2", "glm4moe", "lfm2", "nemotron_3_nano", "smollm2"]
    assert set(families) <= set(TEMPLATES)


@pytest.mark.parametrize("recipe, template, rows", [
    ("recipes/llama-3.2-1b-instruct/lora/tools.yaml", "llama3_2", [{"messages": from_sharegpt(SHAREGPT_ROW),
                                                                     "tools": [{"type": "function",
                                                                                "function": TOOLS[0]}]}]),
    ("recipes/qwen3-0.6b/lora/reasoning.yaml", "qwen3", [REASONING_ROW]),
])
def test_the_model_recipes_train_on_a_tiny_model_with_their_template_and_pass_check(recipe, template, rows, tmp_path):
    """The recipe as shipped (Hub model swapped for a tiny one with the same real template, no download), then
    llmft check: the template renders training and inference alike for that family."""
    from tests.helpers import REPO

    model_dir, _ = _qwen_model(tmp_path, template)
    data = write_jsonl(tmp_path / "train.jsonl", rows * 6)
    out = tmp_path / "run"
    train(load_recipe(REPO / recipe, ["--name_or_path", str(model_dir), "--train_data", str(data), "--eval_data",
                                      str(data), "--output_dir", str(out), "--max_steps", "2", "--num_generate", "2",
                                      "--max_new_tokens", "4", "--global_batch_size", "4"]))
    run = json.loads((out / "run.json").read_text())
    assert run["masking"]["strategy"] == ("per_turn" if template == "qwen3" else "incremental")
    # A random tiny model does not stop at its end-of-turn token, which check also tests: only the template
    # agreement is asked of it here.
    from llmft.hub import _template_agreement
    from llmft.model import load_tokenizer
    from llmft.config import ModelConfig
    from llmft.evaluation import prompts_and_references
    from llmft.run_dir import read_run

    saved = read_run(out)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(out)))
    items = prompts_and_references(saved.eval_rows(), 3)
    assert _template_agreement(tokenizer, saved.info, items, saved.recipe.data.reasoning) == []
    # A template changed after training is caught.
    tokenizer.chat_template = tokenizer.chat_template.replace("assistant", "helper")
    assert _template_agreement(tokenizer, saved.info, items, saved.recipe.data.reasoning)


def test_jsonl_tool_rows_keep_their_own_argument_keys_and_bad_tools_are_named(tmp_path):
    """Arrow would give each row's tool-call arguments the keys of every other row's (as nulls)."""
    from llmft.data import load_rows, prepare_dataset

    def call(arguments):
        return {"messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "name": "f", "content": "done"}, {"role": "assistant", "content": "Done."}]}

    path = write_jsonl(tmp_path / "calls.jsonl", [call({"city": "Paris"}), call({"word": "probe"})])
    rows = load_rows(str(path))
    assert rows[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    tokenizer, _ = tokenizer_for("qwen2_5")
    prepared, _ = prepare_dataset(rows, tokenizer, None, "drop", str(path))
    assert "word" not in tokenizer.decode(prepared[0]["input_ids"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**call({"city": "Paris"}), "tools": "[{not json"}])
    with pytest.raises(DataError, match=r"(?s)bad.jsonl.*row 1: tools: not a list of tool schemas"):
        prepare_dataset(load_rows(str(bad)), tokenizer, None, "drop", str(bad))


def test_answers_are_scored_without_reasoning_even_when_the_prompt_opened_the_block():
    from llmft.schema import without_reasoning

    assert without_reasoning("<think>\nsum\n</think>\n\n42") == "42"
    assert without_reasoning("sum them\n</think>\n\n42") == "42"  # '<think>\n' was the generation prompt's
    assert without_reasoning("42") == "42"
