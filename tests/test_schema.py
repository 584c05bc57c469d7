"""One conversation schema: the same bad file gets the same verdict from every entry point that reads it."""

import pytest

from llmft.cli import run as llmft
from llmft.schema import conversation_problems, example, prompt_and_reference
from tests.helpers import chat_rows, write_jsonl, write_recipe

GOOD = chat_rows(1)[0]
BAD_ROWS = {
    "no-answer": ({"messages": [{"role": "user", "content": "hi"}]}, "messages: no assistant message"),
    "int-content": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]},
                    "messages[1].content: must be a string, got int"),
    "unknown-role": ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
                     "messages[1].role: 'bot' is not one of system, user, assistant, tool"),
    "assistant-first": ({"messages": [{"role": "assistant", "content": "hi"}]},
                        "messages[0]: the conversation starts with 'assistant'; start with 'user'"),
    "empty-answer": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
                     "messages[1].content: empty"),
}


@pytest.mark.parametrize("name", [*BAD_ROWS, "bad-json"])
def test_the_same_bad_file_gets_the_same_verdict_from_convert_report_and_train(name, tmp_path, tiny_model_dir,
                                                                                capsys):
    path = tmp_path / f"{name}.jsonl"
    if name == "bad-json":
        path.write_text(f"{__import__('json').dumps(GOOD)}\n{{oops\n")
        problem, where = "not valid JSON", "line 2"
    else:
        write_jsonl(path, [GOOD, BAD_ROWS[name][0]])
        problem, where = BAD_ROWS[name][1], "line 2"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, path, tmp_path / "run", data={"eval_fraction": 0})
    for command in (["data", "convert", str(path), "--out", str(tmp_path / "out")],
                    ["data", "report", str(path), "--recipe", str(recipe)],
                    ["train", str(recipe)]):
        code = llmft(command)
        err = capsys.readouterr().err
        assert code == 1, (command, err)
        assert problem in err and f"{name}.jsonl" in err and "Traceback" not in err, (command, err)
        assert where in err or "row 2" in err, (command, err)  # convert names file lines, training rows


def test_strict_mode_adds_the_checks_a_clean_dataset_passes():
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}]
    assert conversation_problems(two_users) == []  # a training run can use it
    assert conversation_problems(two_users, strict=True) == [
        "messages[1]: two 'user' messages in a row (turns must alternate)."]


def test_rows_of_either_kind_become_one_conversation():
    text = {"prompt": "Q", "completion": "A"}
    assert example(text, "prompt_completion").plain_text
    assert prompt_and_reference(text, "prompt_completion") == ("Q", "A")
    chat = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}
    assert example(chat, "prompt_completion").first_trainable == 1
    messages = GOOD["messages"]
    assert prompt_and_reference(GOOD, "messages") == (messages[:3], messages[3]["content"])
