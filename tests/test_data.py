"""Loading, validation and the assistant-only loss mask, on four real chat-template shapes."""

import json

import datasets
import pytest

from llmft.data import IGNORE, load_rows, load_splits, prepare_dataset, tokenize_messages, validate_rows
from llmft.dataset.build import BuildConfig, Source, build
from llmft.errors import DataError
from llmft.model import set_distinct_pad
from tests.helpers import TEMPLATES, chat_rows, make_tokenizer, write_jsonl

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And 2021-03-05?"},
    {"role": "assistant", "content": "A date: March 5, 2021."},
]


def _labelled_runs(input_ids, labels):
    """The maximal runs of consecutive labelled tokens, as lists of ids."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a label must be the token itself"
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_loss_falls_on_each_assistant_message_and_its_end_of_turn(style):
    tokenizer = make_tokenizer(style)
    ((input_ids, labels),) = tokenize_messages(tokenizer, CONVERSATION)
    # The ids are exactly the template's full rendering, tokenized once.
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    runs = _labelled_runs(input_ids, labels)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    end_of_turn = tokenizer.convert_tokens_to_ids(TEMPLATES[style]["end_of_turn"])
    for run, answer in zip(runs, answers):
        assert run[-1] == end_of_turn, "the token after each assistant message is the end-of-turn token, labelled"
        assert tokenizer.decode(run[:-1]).strip() == answer
    # Nothing of the user turns, system prompt or role headers carries loss.
    assert sum(label != IGNORE for label in labels) == sum(len(r) for r in runs)


def test_prompt_completion_messages_train_only_the_completion():
    tokenizer = make_tokenizer("chatml")
    ds = datasets.Dataset.from_list([{"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:]}])
    out, report = prepare_dataset(ds, tokenizer, 512, "drop", "mem")
    runs = _labelled_runs(out[0]["input_ids"], out[0]["labels"])
    assert len(runs) == 1 and tokenizer.decode(runs[0]) == "A date: March 5, 2021.<|im_end|>"
    assert report.rows_out == 1


def test_a_converted_conversational_prompt_still_trains_only_the_completion(tmp_path):
    """Built into messages, the prompt's own assistant turn is kept as context (OpenAI's weight 0), not learned:
    the converted row trains exactly the tokens the prompt/completion row does."""
    original = [{"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:]}]
    write_jsonl(tmp_path / "pc.jsonl", original)
    build(BuildConfig(sources=[Source(path=str(tmp_path / "pc.jsonl"))], out=str(tmp_path / "out"), dedupe=False))
    converted = load_rows(str(tmp_path / "out"))
    assert [m.get("weight") for m in converted[0]["messages"]] == [None, 0, None, None]
    tokenizer = make_tokenizer("chatml")
    direct, _ = prepare_dataset(datasets.Dataset.from_list(original), tokenizer, 512, "drop", "mem")
    built, _ = prepare_dataset(converted, tokenizer, 512, "drop", "mem")
    assert built[0]["input_ids"] == direct[0]["input_ids"] and built[0]["labels"] == direct[0]["labels"]
    runs = _labelled_runs(built[0]["input_ids"], built[0]["labels"])
    assert [tokenizer.decode(run) for run in runs] == ["A date: March 5, 2021.<|im_end|>"]


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_an_answer_of_weight_zero_is_context_not_learned(style):
    tokenizer = make_tokenizer(style)
    weighted = [CONVERSATION[0], {**CONVERSATION[1], "weight": 0}, *CONVERSATION[2:]]
    ((input_ids, labels),) = tokenize_messages(tokenizer, weighted)
    assert input_ids == tokenize_messages(tokenizer, CONVERSATION)[0][0]  # rendered as it is, weight or not
    runs = _labelled_runs(input_ids, labels)
    assert len(runs) == 1 and tokenizer.decode(runs[0][:-1]).strip() == CONVERSATION[3]["content"]


def test_answers_of_weight_zero_after_the_last_learned_one_are_not_rendered():
    """They carry no loss and cannot change the loss before them: they would only lengthen the example (and get it
    dropped as overlong)."""
    tokenizer = make_tokenizer("chatml")
    trailing = [*CONVERSATION[:2], CONVERSATION[2], {**CONVERSATION[3], "weight": 0}]
    assert tokenize_messages(tokenizer, trailing) == tokenize_messages(tokenizer, CONVERSATION[:2])


def test_weight_is_a_training_field_a_prompt_does_not_carry():
    from llmft.dataset.clean import exact_key
    from llmft.schema import MESSAGES, conversation_problems, prompt_and_reference

    weighted = [CONVERSATION[0], {**CONVERSATION[1], "weight": 0}, *CONVERSATION[2:]]
    prompt, reference = prompt_and_reference({"messages": weighted}, MESSAGES)
    assert reference == CONVERSATION[3]["content"] and prompt == CONVERSATION[:3]  # sent to models as it is
    assert exact_key(weighted) != exact_key(CONVERSATION)  # not a duplicate of the row that learns both answers
    empty_context = [CONVERSATION[0], {"role": "assistant", "content": "", "weight": 0}, *CONVERSATION[2:]]
    assert conversation_problems(empty_context) == []  # an empty answer kept as context teaches nothing
    assert conversation_problems(empty_context, strict=True)  # builds still refuse empty messages


def test_plain_prompt_completion_trains_completion_and_eos():
    tokenizer = make_tokenizer("llama3")
    ds = datasets.Dataset.from_list([{"prompt": "Question: hello", "completion": " Hi there!"}])
    out, _ = prepare_dataset(ds, tokenizer, 512, "drop", "mem")
    runs = _labelled_runs(out[0]["input_ids"], out[0]["labels"])
    assert len(runs) == 1 and tokenizer.decode(runs[0]) == " Hi there!<|eot_id|>"


def test_overlong_examples_are_dropped_or_truncated_and_counted():
    tokenizer = make_tokenizer("chatml")
    long_answer = "Paris " * 200
    rows = chat_rows(3) + [{"messages": [{"role": "user", "content": "Long?"},
                                         {"role": "assistant", "content": long_answer}]}]
    ds = datasets.Dataset.from_list(rows)
    kept, report = prepare_dataset(ds, tokenizer, 96, "drop", "mem")
    assert (report.rows_in, report.rows_out, report.truncated) == (4, 3, 0)
    assert report.dropped == {"longer than max_length (data.overlong: drop)": 1}
    kept, report = prepare_dataset(ds, tokenizer, 96, "truncate", "mem")
    assert (report.rows_out, report.truncated) == (4, 1)
    assert max(len(ids) for ids in kept["input_ids"]) == 96


def test_truncation_keeps_the_end_that_holds_the_answer():
    tokenizer = make_tokenizer("chatml")
    long = {"role": "user", "content": "word " * 100}
    rows = [{"messages": [long, {"role": "assistant", "content": "Paris"}]},  # the answer is in the last 64 tokens
            {"messages": [long, {"role": "assistant", "content": "Paris"}, long]}]  # a turn after it is not rendered
    kept, report = prepare_dataset(datasets.Dataset.from_list(rows), tokenizer, 64, "truncate", "mem")
    assert report.rows_out == 2 and report.truncated == 2 and not report.dropped
    assert all(tokenizer.decode(ids).endswith("Paris<|im_end|>\n") for ids in kept["input_ids"])


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "hi"}], "messages: no assistant message"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "messages[1].role: 'bot' is not one of"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "messages[1].content: empty"),
    ([{"role": "assistant", "content": "hi"}], "the conversation starts with 'assistant'"),
    ([], "must be a non-empty list"),
])
def test_invalid_rows_are_named_with_row_and_field(messages, expected):
    if not messages:  # arrow cannot infer a struct type from an empty list alone
        ds = datasets.Dataset.from_dict({"messages": [chat_rows(1)[0]["messages"], []]})
    else:
        ds = datasets.Dataset.from_list(chat_rows(2) + [{"messages": messages}])
    with pytest.raises(DataError) as err:
        validate_rows(ds, "train.jsonl")
    text = str(err.value)
    assert "train.jsonl" in text and expected in text
    assert f"row {len(ds)}:" in text


def test_wrongly_typed_content_in_a_file_is_named(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", chat_rows(2) + [bad])
    with pytest.raises(DataError) as err:
        validate_rows(load_rows(str(path)), str(path))
    assert "mixed.jsonl" in str(err.value) and "row 3: messages[1].content: must be a string, got int" in str(err.value)


def test_every_problem_is_reported_at_once():
    rows = [{"messages": [{"role": "user", "content": "a"}]} for _ in range(30)]
    with pytest.raises(DataError) as err:
        validate_rows(datasets.Dataset.from_list(rows), "x.jsonl")
    assert "30 problem(s)" in str(err.value) and "and 10 more" in str(err.value)


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat_rows(1)[0]) + "\n" + '{"messages": [\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_rows(str(path))


def test_missing_columns_say_what_to_do(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="none of the columns of a training row.*llmft data convert"):
        validate_rows(load_rows(str(path)), str(path))


def test_loads_jsonl_parquet_and_save_to_disk_alike(tmp_path):
    rows = chat_rows(5)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    for source in (jsonl, tmp_path / "a.parquet", tmp_path / "disk"):
        assert load_rows(str(source))["messages"] == ds["messages"]


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", chat_rows(20))
    train, evaluation = load_splits(str(path), None, 0.25, seed=1)
    again, _ = load_splits(str(path), None, 0.25, seed=1)
    assert (len(train), len(evaluation)) == (15, 5)
    assert train["messages"] == again["messages"]
    assert not {str(m) for m in train["messages"]} & {str(m) for m in evaluation["messages"]}


def test_pad_token_is_distinct_from_eos():
    tokenizer = make_tokenizer("chatml")
    tokenizer.pad_token = tokenizer.eos_token  # as SmolLM2 ships it
    set_distinct_pad(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_answers_that_look_like_numbers_stay_text(tmp_path):
    """GSM8K-like rows answer "4": read back as the number 4 (as datasets' Json feature does for a text column),
    every row would be refused as not text."""
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?",
                                                                                       "completion": "6", "id": 7}])
    rows = load_rows(str(path))
    assert rows[0]["completion"] == "4" and rows[1]["id"] == 7 and rows[0]["id"] is None
    assert validate_rows(rows, str(path)) == "prompt_completion"


def test_the_held_out_share_keeps_every_row_of_a_prompt_on_one_side(tmp_path):
    """Pairs from one UltraFeedback row, or threads of one OASST tree, share a prompt: held out together, so the
    eval rows are prompts training never saw. Rows of distinct prompts split as datasets splits them."""
    rows = [{"messages": [{"role": "user", "content": f"Question {q}?"}, {"role": "assistant", "content": f"A{a}."}]}
            for q in range(10) for a in range(3)]
    train, held = load_splits(str(write_jsonl(tmp_path / "threads.jsonl", rows)), None, 0.2, seed=3)
    openings = [{r["messages"][0]["content"] for r in split} for split in (train, held)]
    assert len(held) == 6 and not openings[0] & openings[1]
    distinct = write_jsonl(tmp_path / "distinct.jsonl", chat_rows(10))
    train, held = load_splits(str(distinct), None, 0.2, seed=3)
    expected = load_rows(str(distinct)).train_test_split(test_size=0.2, seed=3)["test"]
    assert [r["messages"] for r in held] == [r["messages"] for r in expected]
