"""`llmft compare`: fine-tuning vs from scratch at several data sizes, one token budget, a report and a plot."""

import json
import subprocess

import pytest

from llmft.compare import compare
from llmft.errors import DataError
from llmft.run_dir import missing_files
from tests.conftest import LLMFT
from tests.helpers import chat_rows, write_jsonl, write_recipe


@pytest.fixture
def arms(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(20))
    common = {"peft": {"method": "full"}, "eval": {"baseline": True}}
    finetune = write_recipe(tmp_path / "finetune.yaml", tiny_model_dir, train, tmp_path / "unused", **common)
    scratch = write_recipe(tmp_path / "scratch.yaml", tiny_model_dir, train, tmp_path / "unused",
                           model={"init": "scratch"}, **common)
    return [str(finetune), str(scratch)]


def test_compare_trains_every_arm_at_every_size_on_one_budget(tmp_path, arms, quiet_env):
    out = tmp_path / "report"
    done = subprocess.run([LLMFT, "compare", *arms, "--sizes", "4", "16", "--evals", "2", "--out", str(out)],
                          capture_output=True, text=True, env=quiet_env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["budget_from"] == "one epoch of the largest size, 16"
    budget = results["budget_tokens"]
    for arm in ("finetune", "scratch"):
        for size, epochs in (("4", 4.0), ("16", 1.0)):
            run = results["runs"][arm][size]
            assert run["examples"] == int(size) and run["epochs"] == pytest.approx(epochs, rel=0.2)
            # Same budget for every run, to within the last optimizer step's tokens.
            assert run["tokens"][0] == 0 and abs(run["tokens"][-1] - budget) < 0.25 * budget
            assert len(run["eval_loss"]) >= 3  # before training, and 2 evaluations
            assert missing_files(tmp_path / "report" / "runs" / f"{arm}-{size}") == []
    # The scratch arm starts from random weights: ~ln(vocabulary) before training, far above the pretrained start.
    assert results["runs"]["scratch"]["4"]["eval_loss"][0] > results["runs"]["finetune"]["4"]["eval_loss"][0]
    report = (out / "report.md").read_text()
    assert "| 4 | 3.97 | " in report and "| 16 | 1.00 | " in report and "finetune eval loss (best)" in report
    assert (out / "eval_loss_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert "Report:" in done.stdout


def test_compare_refuses_a_size_larger_than_the_data(tmp_path, arms):
    with pytest.raises(DataError, match="--sizes 99 is more than the 16 training rows"):
        compare(arms, [4, 99], tmp_path / "report")


def test_compare_refuses_stages_without_an_eval_loss_curve(tmp_path, tiny_model_dir):
    from llmft.errors import ConfigError

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": f"Question {i}?"}],
         "chosen": [{"role": "assistant", "content": "Yes."}], "rejected": [{"role": "assistant", "content": "No."}]}
        for i in range(8)])
    dpo = write_recipe(tmp_path / "dpo.yaml", tiny_model_dir, pairs, tmp_path / "unused", training={"stage": "dpo"})
    with pytest.raises(ConfigError, match="training.stage dpo: compare measures eval loss against tokens trained"):
        compare([str(dpo)], [4], tmp_path / "report")


def test_one_evaluation_is_at_the_end_not_at_every_step(tmp_path):
    """The Trainer reads an eval_steps ratio only under 1: 1.0 would evaluate at every step."""
    from llmft.compare import run_overrides

    overrides = run_overrides(4, tmp_path, 2.0, evals=1)
    assert float(overrides[overrides.index("--eval_steps") + 1]) < 1
