"""A model as judge: strict parsing, retries, both-order comparisons; Baize v2's self-distillation with feedback
(`llmft selfchat feedback`) and judged evaluation (`llmft eval --judge-...`), against a stand-in OpenAI-compatible
judge server on 127.0.0.1 (the judge a user would run there: vLLM, TGI, llama.cpp or OpenAI) and a tiny local
model answering."""

import http.server
import json
import re
import threading

import pytest

from llmft.cli import run
from llmft.judge import Judge, parse_grade, parse_winner, win_rate
from llmft.synth.backends import OpenAIBackend
from tests.helpers import chat_rows, send_json, write_jsonl, write_recipe


class StandInJudge(http.server.BaseHTTPRequestHandler):
    """Grades an answer by the digits in it (more is better), picks the answer with more digits, or (biased) always
    the first; the first verdict for a prompt holding 'garbled' is unparseable (a comparison's, whenever the garbled
    answer comes first). Answers every choice of `n`."""

    biased = False
    asked: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        StandInJudge.asked.append(prompt)
        if "Rate the AI assistant's answer" in prompt:
            answer = prompt.split("[Answer]\n", 1)[1].split("\n\nReply in", 1)[0]
            score = min(10, 1 + sum(c.isdigit() for c in answer))
            text = f"Score: {score}\nReason: it has {score - 1} digits."
            if "garbled" in prompt and StandInJudge.asked.count(prompt) == 1:
                text = "I think it is fine overall."
        elif "Compare two answers" in prompt:
            a = prompt.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
            b = prompt.split("[Answer B]\n", 1)[1].split("\n\nReply in", 1)[0]
            digits = [sum(c.isdigit() for c in x) for x in (a, b)]
            winner = "A" if StandInJudge.biased or digits[0] > digits[1] else "B" if digits[1] > digits[0] else "tie"
            text = f"Winner: {winner}\nReason: counted digits."
            if "garbled" in a:  # an unparseable verdict whenever that answer comes first
                text = "Both have merit."
        else:
            text = "An answer with 42 in it."
        choices = [{"message": {"role": "assistant", "content": text}}] * body.get("n", 1)
        send_json(self, {"choices": choices, "usage": {"completion_tokens": 5}})

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    StandInJudge.biased, StandInJudge.asked = False, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInJudge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.mark.parametrize("text,expected", [
    ("Score: 7\nReason: fine.", (7, "fine.")), ("**Score:** 10/10\nReason: great", (10, "great")),
    ("score = 3", (3, "")), ("Score: 11", None), ("I'd give it a 7.", None), ("Score: seven", None),
])
def test_grades_parse_strictly(text, expected):
    assert parse_grade(text) == expected


def test_winners_parse_strictly():
    assert [parse_winner(t) for t in ("Winner: A", "winner: tie\nReason: same", "**Winner:** B", "A is better")] == \
        ["A", "tie", "B", None]


def test_unparseable_verdicts_are_asked_again_and_counted(judge_url):
    judge = Judge(OpenAIBackend(judge_url, "judge", backoff=0), retries=1)
    grades = judge.grade([[{"role": "user", "content": "garbled question"}], "plain question"], ["12 and 3", "no"])
    assert grades == [(4, "it has 3 digits."), (1, "it has 0 digits.")]
    assert judge.stats() == {"judge": "judge", "asked": 3, "retried": 1, "unparseable": 0}
    stubborn = Judge(OpenAIBackend(judge_url, "judge", backoff=0), retries=0)
    assert stubborn.grade(["garbled again"], ["1"]) == [None] and stubborn.stats()["unparseable"] == 1


def test_both_orders_cancel_a_judge_that_prefers_the_first_answer(judge_url):
    judge = Judge(OpenAIBackend(judge_url, "judge", backoff=0))
    fair = judge.compare(["q1", "q2"], ["1 2 3", "none"], ["none", "4 5"])
    assert [r["outcome"] for r in fair] == ["win", "loss"]
    StandInJudge.biased = True
    biased = judge.compare(["q1", "q2"], ["1 2 3", "none"], ["none", "4 5"])
    assert [r["outcome"] for r in biased] == ["tie", "tie"]
    assert win_rate(biased) == {"eval_judge_win_rate": 0.5, "eval_judge_position_bias": 1.0, "eval_judge_undecided": 0}


def test_a_comparison_with_one_order_unread_is_undecided(judge_url):
    """One verdict alone would decide by whichever position the judge read: undecided, and counted as such."""
    judge = Judge(OpenAIBackend(judge_url, "judge", backoff=0), retries=0)
    results = judge.compare(["q"], ["garbled 1 2 3"], ["none"])  # read only with the garbled answer second
    assert results[0]["verdicts"][0] is None and results[0]["verdicts"][1] == "B"
    assert results[0]["outcome"] is None and win_rate(results)["eval_judge_undecided"] == 1


def test_feedback_samples_grades_and_builds_sft_and_dpo_datasets_resumably(tmp_path, tiny_model_dir, judge_url, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Say some numbers, {i}.\n" for i in range(6)))
    out = tmp_path / "fb"
    argv = ["selfchat", "feedback", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_model_dir),
            "--dtype", "float32", "--n", "3", "--max-new-tokens", "12", "--batch-size", "6",
            "--judge-base-url", judge_url, "--judge-api-model", "judge", "--min-score", "1", "--margin", "1"]
    assert run(argv) == 0, capfd.readouterr().err
    records = [json.loads(line) for line in (out / "feedback.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(len(r["answers"]) == 3 for r in records)
    graded = [a for r in records for a in r["answers"] if a["score"] is not None]
    assert all(a["score"] == min(10, 1 + sum(c.isdigit() for c in a["text"])) for a in graded)
    sft = json.loads((out / "sft" / "manifest.json").read_text())
    facts = sft["feedback"]
    assert facts["prompts"] == 6 and sum(facts["outcomes"].values()) == 6  # every prompt accounted for
    assert facts["judge"] == "judge" and facts["answers_per_prompt"] == 3
    assert "Self-distillation with feedback" in (out / "sft" / "data_card.md").read_text()
    if (out / "dpo").exists():  # pairs need answers graded differently: the tiny model's sampling decides
        pairs = [json.loads(line) for line in (out / "dpo.jsonl").read_text().splitlines()]
        assert all(p["score_chosen"] - p["score_rejected"] >= 1 for p in pairs)
    # A rerun judges nothing again: every prompt is already in feedback.jsonl.
    asked = len(StandInJudge.asked)
    assert run(argv) == 0
    assert len(StandInJudge.asked) == asked


def test_feedback_needs_a_judge(tmp_path, capfd):
    (tmp_path / "p.txt").write_text("q\n")
    assert run(["selfchat", "feedback", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "--judge-model or --judge-base-url" in capfd.readouterr().err


def test_eval_with_a_judge_grades_both_models_and_gives_the_win_rate(tmp_path, tiny_model_dir, judge_url, capfd):
    from llmft.config import load_recipe
    from llmft.train import train

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(10))
    out = train(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, tmp_path / "run")))
    assert run(["eval", str(out), "--baseline", "base", "--num_generate", "2", "--max_new_tokens", "6",
                "--judge-base-url", judge_url, "--judge-api-model", "judge"]) == 0, capfd.readouterr().err
    results = json.loads((out / "eval_results.json").read_text())
    assert 1 <= results["results"]["eval_judge_score"] <= 10 and 1 <= results["baseline"]["eval_judge_score"] <= 10
    assert 0 <= results["results"]["eval_judge_win_rate"] <= 1
    assert results["judge"]["judge"] == "judge" and len(results["judge"]["comparisons"]) == 2
    comparisons = [p for p in StandInJudge.asked if "Compare two answers" in p]
    assert len(comparisons) == 4  # two prompts, each judged in both orders
    assert re.search(r"eval_judge_win_rate", (out / "eval_report.md").read_text())
    assert run(["eval", str(out), "--judge-base-url", judge_url, "--judge-api-model", "judge",
                "--num_generate", "0"]) == 2


def test_feedback_without_graded_answers_names_the_judge_as_the_cause(tmp_path):
    from llmft.errors import GenerationError
    from llmft.synth.feedback import FeedbackOptions, finalize

    prompt = [{"role": "user", "content": "Hi?"}]
    records = [{"seed_id": f"row {i}", "prompt": prompt, "model": "m", "judge": "j",
                "answers": [{"text": "a", "score": None, "reason": "unparseable verdict"},
                            {"text": "b", "score": 7 if i == 0 else None, "reason": "ok"}]} for i in range(3)]
    (tmp_path / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(GenerationError, match=r"unparseable for 5 of 6 answers .* use a stronger judge"):
        finalize(tmp_path, FeedbackOptions(prompts="p.txt", out=str(tmp_path)), {"command": "test"})
