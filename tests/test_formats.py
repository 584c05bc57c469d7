"""Converters and cleaning checks on small hand-written cases, malformed rows included."""

import pytest

from llmft.dataset.clean import EvalIndex, NearDuplicateFinder, exact_key, normalise_messages
from llmft.dataset.formats import (detect_format, from_alpaca, from_columns, from_openai, from_prompt_completion,
                                   from_sharegpt, oasst_flat_to_trees, oasst_paths)
from llmft.schema import RowError, conversation_problems


def test_alpaca_with_input_system_and_history():
    row = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "Be brief.",
           "history": [["Hi", "Hello! How can I help?"]]}
    assert from_alpaca(row) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Translate.\n\nBonjour"}, {"role": "assistant", "content": "Hello"},
    ]


@pytest.mark.parametrize("row, field, problem", [
    ({"output": "x"}, "instruction", "missing"),
    ({"instruction": "  ", "output": "x"}, "instruction", "empty"),
    ({"instruction": "a", "output": None}, "output", "null"),
    ({"instruction": "a", "output": 3}, "output", "must be a string, got int"),
    ({"instruction": "a", "output": "b", "history": [["only one"]]}, "history[0]", "pair"),
    ({"instruction": "a", "output": "b", "history": "no"}, "history", "must be a list"),
])
def test_alpaca_errors_name_the_field(row, field, problem):
    with pytest.raises(RowError) as err:
        from_alpaca(row)
    assert err.value.field == field and problem in err.value.problem


def test_sharegpt_roles_and_errors():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}]}
    assert [m["role"] for m in from_sharegpt(row)] == ["system", "user", "assistant"]
    alt = {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}
    assert [m["role"] for m in from_sharegpt(alt)] == ["user", "assistant"]
    with pytest.raises(RowError, match=r"conversations\[1\].from.*unknown speaker 'robot'"):
        from_sharegpt({"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]})
    with pytest.raises(RowError, match=r"conversations\[0\].value.*must be a string"):
        from_sharegpt({"conversations": [{"from": "human", "value": None}]})


def test_openai_messages_keep_tool_calls():
    call = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]
    row = {"messages": [{"role": "user", "content": "1+1?"},
                        {"role": "assistant", "content": None, "tool_calls": call},
                        {"role": "tool", "content": "2", "tool_call_id": "c1"},
                        {"role": "assistant", "content": "2"}], "extra": 1}
    messages = from_openai(row)
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert messages[2]["tool_call_id"] == "c1"
    assert conversation_problems(messages, strict=True) == []


def test_prompt_completion_and_columns():
    assert from_prompt_completion({"prompt": "Q", "completion": "A"}) == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    gsm = {"question": "2+2?", "answer": "2+2=4\n#### 4"}
    assert from_columns(gsm, "question", "answer")[1]["content"].endswith("#### 4")
    with pytest.raises(RowError, match="'problem': missing"):
        from_columns(gsm, "problem", "answer")


OASST_TREE = {"text": "Root question", "role": "prompter", "replies": [
    {"text": "Second best", "role": "assistant", "rank": 1, "replies": []},
    {"text": "Best answer", "role": "assistant", "rank": 0, "replies": [
        {"text": "Follow-up", "role": "prompter", "replies": [
            {"text": "Follow-up answer", "role": "assistant", "rank": 0}]}]},
    {"text": "Deleted", "role": "assistant", "rank": 2, "deleted": True},
]}


def test_oasst_tree_every_path_or_best_only():
    paths = oasst_paths(OASST_TREE, best_only=False)
    assert [[m["content"] for m in p] for p in paths] == [
        ["Root question", "Second best"],
        ["Root question", "Best answer", "Follow-up", "Follow-up answer"],
    ]
    best = oasst_paths(OASST_TREE, best_only=True)
    assert [[m["content"] for m in p] for p in best] == [["Root question", "Best answer", "Follow-up", "Follow-up answer"]]


def test_oasst_flat_rows_assemble_into_the_same_tree():
    flat = [
        {"message_id": "r", "parent_id": None, "text": "Root question", "role": "prompter"},
        {"message_id": "a1", "parent_id": "r", "text": "Second best", "role": "assistant", "rank": 1},
        {"message_id": "a2", "parent_id": "r", "text": "Best answer", "role": "assistant", "rank": 0},
    ]
    (tree,), orphans = oasst_flat_to_trees(flat)
    assert orphans == []
    assert [[m["content"] for m in p] for p in oasst_paths(tree, best_only=True)] == [["Root question", "Best answer"]]
    with pytest.raises(RowError, match="expected 'prompter' or 'assistant'"):
        oasst_paths({"text": "x", "role": "moderator"}, best_only=False)


@pytest.mark.parametrize("row, fmt", [
    ({"conversations": []}, "sharegpt"),
    ({"messages": [{"from": "human", "value": "x"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "x"}]}, "openai"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"message_tree_id": "t", "prompt": {"text": "x"}}, "oasst"),
    ({"message_id": "m", "parent_id": None, "role": "prompter", "text": "x"}, "oasst"),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_undetectable_format_says_which_flags_to_pass():
    with pytest.raises(ValueError, match="--format columns --prompt-field"):
        detect_format({"question": "q", "answer": "a"})


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "two 'user' messages in a row"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "ends on 'user'"),
    ([{"role": "user", "content": "a"}], "no assistant message"),
    ([{"role": "assistant", "content": "a"}], "starts with 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}], "content: empty"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "c"}],
     "system message may only come first"),
    ([{"role": "user", "content": "a"}, {"role": "narrator", "content": "c"}], "role: 'narrator' is not one of"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "c"}, {"role": "assistant", "content": "c"}],
     "tool result must follow an assistant"),
])
def test_conversation_problems(messages, problem):
    found = conversation_problems(messages, strict=True)
    assert any(problem in p for p in found), found


def test_normalisation_and_system_prompt_injection():
    messages = [{"role": "user", "content": "Cafe\u0301\u200b  \r\nnext line   \r\n"},
                {"role": "assistant", "content": "def f():\n    return 1\n"}]
    out = normalise_messages(messages, system_prompt="Be nice.")
    assert out[0] == {"role": "system", "content": "Be nice."}
    assert out[1]["content"] == "Caf\u00e9\nnext line"
    assert out[2]["content"] == "def f():\n    return 1"  # indentation kept


def test_exact_key_ignores_case_spacing_and_system():
    a = [{"role": "system", "content": "x"}, {"role": "user", "content": "Hello  World"},
         {"role": "assistant", "content": "Hi"}]
    b = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi "}]
    assert exact_key(a) == exact_key(b)


def test_near_duplicates_found_and_distinct_texts_kept():
    finder = NearDuplicateFinder(threshold=0.7)
    # 60 words: one changed word alters 5 of 56 five-word shingles (Jaccard ~0.84)
    base = " ".join(f"word{i}" for i in range(30)) + " the cat sleeps in the warm afternoon sun " + " ".join(
        f"tail{i}" for i in range(22))
    assert finder.seen("a", base) is None
    assert finder.seen("b", base.replace("warm", "hot")) == "a"
    assert finder.seen("c", "an entirely different sentence about compilers, parsers and grammars of languages") is None


def test_eval_index_reports_which_eval_rows_a_text_hits():
    index = EvalIndex(n=5)
    index.add("eval 1", "Natalia sold clips to 48 of her friends in April")
    index.add("eval 2", "short")
    assert index.hits("Q: Natalia sold clips to 48 of her friends in May") == {"eval 1"}
    assert index.hits("nothing in common here at all today") == set()
