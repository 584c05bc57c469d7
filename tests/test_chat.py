"""llmft chat, driven in a pseudo-terminal as a person would type: the streamed answer is the run's own greedy
answer with its template and end-of-turn token, multi-line input, /system, /history, /reset, Ctrl-D."""

import json
import sys

import pytest

from llmft.config import ModelConfig, load_recipe
from llmft.evaluation import prompt_texts
from llmft.model import generate_texts, load_run_model, load_tokenizer
from llmft.run_dir import read_run
from llmft.train import train
from tests.conftest import LLMFT
from tests.helpers import chat_rows, write_jsonl, write_recipe

pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed (pip install -e .[dev])")
if sys.platform == "win32":
    pytest.skip("pseudo-terminals are POSIX", allow_module_level=True)

PROMPT = "you> "


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("chat")
    data = write_jsonl(tmp / "train.jsonl", chat_rows(12))
    return train(load_recipe(write_recipe(tmp / "r.yaml", tiny_model_dir, data, tmp / "run",
                                          training={"max_steps": 15, "learning_rate": 1e-2})))


def _history(child) -> list[dict]:
    child.sendline("/history")
    child.expect(r"\n(\[.*?\n\])\r?\n" + PROMPT)
    return json.loads(child.match.group(1).replace("\r\n", "\n"))


def test_a_conversation_in_a_terminal(run):
    child = pexpect.spawn(LLMFT, ["chat", str(run), "--temperature", "0", "--max-new-tokens", "8"],
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect("llmft chat: .*adapter on .*ends a turn at '<\\|im_end\\|>'")
    child.expect(PROMPT)

    # One question: the streamed answer is what the run answers greedily to the same conversation.
    question = [{"role": "user", "content": "What is 3 plus 1?"}]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(run)))
    expected = generate_texts(load_run_model(read_run(run)), tokenizer, prompt_texts(tokenizer, [{"prompt": question}]),
                              max_new_tokens=8)[0][0]
    assert expected  # something to compare: the barely trained tiny model writes tokens rather than stopping
    child.sendline(question[0]["content"])
    child.expect("assistant> (.*?)\r\n" + PROMPT)
    assert child.match.group(1).strip() == expected
    assert _history(child) == [*question, {"role": "assistant", "content": expected}]

    # Multi-line input: a trailing backslash, then a block between lines of three quotes.
    child.sendline("first line \\")
    child.expect(r"\.\.\. ")
    child.sendline("second line")
    child.expect(PROMPT)
    child.sendline('"""')
    child.sendline("block one")
    child.sendline("block two")
    child.sendline('"""')
    child.expect("assistant> .*?" + PROMPT)
    users = [m["content"] for m in _history(child) if m["role"] == "user"]
    assert users[1:] == ["first line\nsecond line", "block one\nblock two"]

    # /system, then /reset keeps the system prompt and forgets the turns.
    child.sendline("/system Answer with a number.")
    child.expect("system prompt: 'Answer with a number.'")
    child.sendline("/reset")
    child.expect("conversation cleared")
    assert _history(child) == [{"role": "system", "content": "Answer with a number."}]
    child.sendline("/nonsense")
    child.expect("unknown command /nonsense")

    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_missing_run_is_a_clear_error(tmp_path):
    child = pexpect.spawn(LLMFT, ["chat", str(tmp_path / "nothing")], encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus != 0 and "Traceback" not in child.before and "llmft chat:" in child.before


def test_a_generation_that_fails_is_an_error_not_a_hang(run, tiny_model_dir):
    """The answer streams from a worker thread; when generation raises there (out of memory, or here a model that
    cannot generate at all: a reward model's scoring head), the streamer is closed and the error comes back."""
    import threading

    from transformers import AutoModelForSequenceClassification

    from llmft.chat import ChatOptions, stream_answer
    from llmft.errors import GenerationError

    scorer = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(run)))
    result = {}

    def answer():
        try:
            stream_answer(scorer, tokenizer, [{"role": "user", "content": "Hi"}], ChatOptions(run=str(run)))
        except GenerationError as err:
            result["error"] = str(err)

    worker = threading.Thread(target=answer, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "stream_answer hung on a failed generation"
    assert result["error"].startswith("generation failed:")
