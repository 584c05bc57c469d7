"""`llmft augment`: paraphrase / back-translation of user turns through the self-chat backends; answers kept."""

import http.server
import json
import subprocess
import threading

import pytest

from llmft.errors import DataError
from llmft.schema import load_json_rows
from llmft.synth.augment import AugmentConfig, augment_rows
from llmft.synth.backends import LocalBackend, OpenAIBackend
from tests.conftest import LLMFT
from tests.helpers import send_json, write_jsonl


class Rewriter(http.server.BaseHTTPRequestHandler):
    """Stands in for an OpenAI-compatible server (a real model is too slow for a fast test): it answers a paraphrase request
    with the message reworded, a translation request with the message tagged by language, and misbehaves on
    messages that ask it to (empty, unchanged, far too long)."""

    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        Rewriter.requests.append(prompt)
        instruction, _, text = prompt.partition("\n\n")
        if "EMPTY" in text:
            answer = ""
        elif "SAME" in text:
            answer = text
        elif "LONG" in text:
            answer = text * 5
        elif instruction.startswith("Translate the following message into French"):
            answer = f"[fr] {text}"
        elif instruction.startswith("Translate the following message into English"):
            answer = text.replace("[fr] ", "In other words: ")
        else:
            answer = f"Put differently: {text}"
        send_json(self, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Rewriter.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Rewriter)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of Peru?"},
                  {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And of Chile?"},
                  {"role": "assistant", "content": "Santiago."}]},
    {"prompt": "Name a prime number.", "completion": "7"},
    {"messages": [{"role": "user", "content": "Say EMPTY please"}, {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "user", "content": "Say SAME please"}, {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "user", "content": "Say LONG please"}, {"role": "assistant", "content": "ok"}]},
]


def test_paraphrase_rewrites_user_turns_only_and_rejects_bad_rewrites(server):
    backend = OpenAIBackend(server, "m", concurrency=2)
    new, rejected = augment_rows(ROWS, backend, AugmentConfig(mode="paraphrase", batch_size=2))
    assert rejected == {"empty": 1, "unchanged": 1, "too long": 1}
    assert [r["augmented_from_row"] for r in new] == [1, 2]
    chat = new[0]["messages"]
    assert [m["content"] for m in chat] == ["Be brief.", "Put differently: What is the capital of Peru?", "Lima.",
                                            "Put differently: And of Chile?", "Santiago."]
    assert new[1] == {"prompt": "Put differently: Name a prime number.", "completion": "7",
                      "augmentation": "paraphrase", "augmented_from_row": 2}
    assert ROWS[0]["messages"][1]["content"] == "What is the capital of Peru?"  # the source rows are untouched


def test_backtranslation_goes_through_the_pivot_language_and_back(server):
    backend = OpenAIBackend(server, "m")
    new, _ = augment_rows(ROWS[:2], backend, AugmentConfig(mode="backtranslate", pivot="French", copies=2))
    assert len(new) == 4 and {r["augmentation"] for r in new} == {"backtranslate:French"}
    assert new[1]["prompt"] == "In other words: Name a prime number."
    assert sum(p.startswith("Translate the following message into French") for p in Rewriter.requests) == 6


def test_augment_command_writes_source_then_new_rows_and_names_bad_rows(tmp_path, server, quiet_env):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    out = tmp_path / "aug" / "train.jsonl"
    done = subprocess.run([LLMFT, "augment", str(data), "--out", str(out), "--base-url", server, "--api-model", "m"],
                          capture_output=True, text=True, env=quiet_env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 source rows -> 2 new rows (rejected: none); wrote 4 rows" in done.stdout
    rows = load_json_rows(out)
    assert rows[:2] == ROWS[:2] and rows[2]["augmentation"] == "paraphrase"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no chat here"}])
    done = subprocess.run([LLMFT, "augment", str(bad), "--out", str(out), "--base-url", server, "--api-model", "m"],
                          capture_output=True, text=True, env=quiet_env)
    assert done.returncode == 1 and "row 1: text rows have no user turn to augment" in done.stderr
    broken = write_jsonl(tmp_path / "broken.jsonl", [ROWS[0], {"messages": [{"content": "no role"}]}])
    done = subprocess.run([LLMFT, "augment", str(broken), "--out", str(out), "--base-url", server, "--api-model", "m"],
                          capture_output=True, text=True, env=quiet_env)
    assert done.returncode == 1 and "row 2: messages[0].role: None is not one of" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(DataError, match="x.jsonl, line 2: not valid JSON"):
        load_json_rows(path)


@pytest.mark.slow
def test_real_smollm2_paraphrases_demo_questions():
    """The local backend with the embedded SmolLM2-135M-Instruct: most rewrites pass the filters, answers kept."""
    from llmft.config import ModelConfig, PeftSettings
    from llmft.dataset.demo import write_demo_data
    from llmft.model import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path="smollm2-135m-instruct")
    backend = LocalBackend(load_model(cfg, PeftSettings(method="full")), load_tokenizer(cfg), batch_size=8)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        rows = load_json_rows(write_demo_data(Path(tmp), train_rows=8, eval_rows=0)["train"])
    from transformers import set_seed

    set_seed(0)  # sampling at temperature 0.7
    new, rejected = augment_rows(rows, backend, AugmentConfig(mode="paraphrase", batch_size=8))
    assert len(new) + sum(rejected.values()) == 8 and len(new) >= 4, rejected
    for row in new:
        source = rows[row["augmented_from_row"] - 1]["messages"]
        assert row["messages"][2] == source[2]  # the answer is the source's
        assert row["messages"][1]["content"] != source[1]["content"]
