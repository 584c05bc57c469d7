"""Evaluation: offline metrics, the in-training hook, the forgetting check, early stopping."""

import json
import logging
import math

import pytest

from llmft.config import load_recipe
from llmft.evaluation import extract, score
from llmft.train import train
from tests.helpers import FIRST_CHAR_METRIC, chat_rows, write_jsonl, write_recipe


@pytest.mark.parametrize("text, extractor, expected", [
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "gsm8k", "72"),
    ("So the answer is 1,234.", "gsm8k", "1234"),
    ("She has 3 apples and 5 pears, 8 in all.", "last_number", "8"),
    ("Answer: (B) because", "regex:\\(([A-D])\\)", "B"),
    ("no number here", "gsm8k", ""),
    ("#### 72 clips", "gsm8k", "72"),  # the number after ####, not the words that follow it
    ("#### 72\n\nI hope this helps!", "gsm8k", "72"),
    ("#### 1,234.", "gsm8k", "1234"),
    ("#### 1/2", "gsm8k", "1/2"),  # a fraction is not its numerator
    ("#### 2023-01-05", "gsm8k", "2023-01-05"),
    ("#### \u22125 degrees", "gsm8k", "-5"),  # a typeset minus
    ("so 5", "regex:ANSWER=(\\d+)|(\\d+)$", "5"),  # the first group that matched
    ("nothing", "regex:ANSWER=(\\d+)|(\\d+)$", ""),
])
def test_answer_extractors(text, extractor, expected):
    assert extract(text, extractor) == expected


def test_metrics_run_offline_with_known_values():
    refs = ["the cat sat on the mat", "#### 72"]
    same = score(refs, refs, ["exact_match", "rouge_l", "bleu", "chrf"])
    assert same == pytest.approx({"exact_match": 1.0, "rouge_l": 1.0, "bleu": 100.0, "chrf": 100.0})
    other = score(["a dog ran in the park", "The answer is 72."], refs, ["exact_match", "rouge_l", "chrf"], "gsm8k")
    assert other["exact_match"] == 0.5  # '72' matches once the extractor has pulled the number out
    assert 0 < other["rouge_l"] < 0.5 and 0 < other["chrf"] < 50


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_rows(12))


def test_hook_scores_at_every_evaluation_and_writes_sample_tables(tmp_path, tiny_model_dir, train_file):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                          training={"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2},
                          eval={"num_generate": 2, "metrics": ["exact_match", "rouge_l", "chrf"], "max_new_tokens": 4,
                                "forgetting_check": True})
    train(load_recipe(recipe))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    scored = [h for h in history if "eval_rouge_l" in h]
    assert [h["step"] for h in scored] == [2, 4, 4]  # two evaluations in training, then the final one
    for step in (0, 2, 4):  # step 0: the evaluation before training
        rows = [json.loads(line) for line in (out / "eval_samples" / f"step-{step}.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and set(rows[0]) == {"prompt", "reference", "answer", "exact_match"}
    metrics = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        assert {"eval_exact_match", "eval_rouge_l", "eval_chrf", "eval_forgetting_ppl_ratio"} <= set(metrics[when])
    assert metrics["before"]["eval_forgetting_ppl_ratio"] == pytest.approx(1.0)
    assert metrics["after"]["eval_forgetting_ppl_ratio"] != pytest.approx(1.0)  # lr 1e-2 moves the model


def test_a_resumed_run_measures_forgetting_against_the_model_before_training(tmp_path, tiny_model_dir, train_file):
    """Without the evaluation before training, the reference perplexity was taken once training began: after a
    resume, of the checkpoint's weights. A run resumed at step 2 must report the uninterrupted run's ratios."""
    def run(name, **training):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_model_dir, train_file, tmp_path / name,
                              training={"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2,
                                        "save_strategy": "steps", "save_steps": 2, "learning_rate": 1e-2, **training},
                              eval={"num_generate": 0, "forgetting_check": True, "baseline": False})
        train(load_recipe(recipe))
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["eval_forgetting_ppl_ratio"] for h in history if "eval_forgetting_ppl_ratio" in h}

    whole = run("whole")
    resumed = run("resumed", resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert whole[4] != pytest.approx(1.0, abs=1e-3)  # training moved the model
    assert resumed == pytest.approx(whole, rel=1e-4)


def test_a_resumed_run_that_could_not_measure_first_takes_the_reference_from_its_history(tmp_path, caplog,
                                                                                          tiny_model_dir):
    """Under DeepSpeed or FSDP2 nothing is measured before training: a resumed run's reference is its earlier
    evaluations' perplexity over ratio; with none, the resumed model, and a warning says so."""
    from types import SimpleNamespace

    from transformers import TrainerState

    from llmft.config import ModelConfig, PeftSettings
    from llmft.evaluation import GenerationEvalCallback
    from llmft.model import load_model, load_tokenizer

    config = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")

    def hook():
        return GenerationEvalCallback(load_tokenizer(config), [], SimpleNamespace(forgetting_check=True), tmp_path, {})

    state = TrainerState(global_step=6, log_history=[{"loss": 2.0, "step": 2},
                                                     {"eval_general_ppl": 30.0, "eval_forgetting_ppl_ratio": 1.5}])
    resumed = hook()
    resumed.on_train_begin(None, state, None, model=None)  # no model: nothing may be measured
    assert resumed.base_ppl == pytest.approx(20.0)
    measured, model = hook(), load_model(config, PeftSettings(method="full"))
    with caplog.at_level(logging.WARNING, logger="llmft"):
        measured.on_train_begin(None, TrainerState(global_step=6, log_history=[]), None, model=model)
    assert measured.base_ppl > 1 and "the model resumed at step 6" in caplog.text


def test_early_stopping_stops_on_a_generation_metric(tmp_path, tiny_model_dir, train_file):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                          training={"max_steps": 30, "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps",
                                    "save_steps": 1, "metric_for_best_model": "eval_exact_match",
                                    "greater_is_better": True, "load_best_model_at_end": True, "learning_rate": 1e-5},
                          eval={"num_generate": 2, "max_new_tokens": 2, "early_stopping_patience": 2, "baseline": False})
    train(load_recipe(recipe))
    state = json.loads((out / "trainer_state.json").read_text())
    # A random tiny model never answers right: exact match stays 0, so patience 2 ends training at step 3.
    assert state["global_step"] == 3
    assert state["best_metric"] == 0.0 and state["best_model_checkpoint"].endswith("checkpoint-1")


def test_early_stopping_settings_are_checked_together(tmp_path, tiny_model_dir, train_file):
    from llmft.errors import ConfigError

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, tmp_path / "run",
                          eval={"early_stopping_patience": 2})
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    problems = err.value.problems
    assert len(problems) == 3, problems
    assert any("set training.eval_strategy: steps" in p for p in problems)
    assert any("needs training.metric_for_best_model" in p for p in problems)
    assert any("load_best_model_at_end: true" in p for p in problems)
    with pytest.raises(ConfigError, match=r"eval.metrics: unknown \['meteor'\]"):
        load_recipe(recipe, ["--metrics", "bleu", "meteor"])


def test_eval_command_on_a_run_dir_with_baseline_and_on_a_plain_model(tmp_path, tiny_model_dir, train_file):
    import subprocess

    from tests.conftest import LLMFT

    out = tmp_path / "run"
    train(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out)))
    result = subprocess.run([LLMFT, "eval", str(out), "--baseline", "base", "--num-generate", "2",
                             "--max-new-tokens", "4", "--metrics", "exact_match", "chrf"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["baseline_model"] == str(tiny_model_dir)
    for key in ("eval_loss", "eval_exact_match", "eval_chrf", "eval_general_ppl"):
        assert results["deltas"][key] == pytest.approx(results["results"][key] - results["baseline"][key])
    # The adapter was trained at lr 1e-2: its held-out loss differs from the base model's, and is lower.
    assert results["results"]["eval_loss"] < results["baseline"]["eval_loss"]
    # The run's own held-out split and masks are rebuilt from the run dir alone: the loss equals training's final one.
    trained = json.loads((out / "metrics.json").read_text())["after"]["eval_loss"]
    assert results["results"]["eval_loss"] == pytest.approx(trained, rel=1e-4)
    assert "| eval_loss |" in (out / "eval_report.md").read_text() and len(results["samples"]) == 2
    assert set(results["samples"][0]) == {"prompt", "reference", "answer", "exact_match", "baseline_answer",
                                          "baseline_exact_match"}
    # The same command on a plain model directory, with data given explicitly.
    result = subprocess.run([LLMFT, "eval", str(tiny_model_dir), "--data", str(train_file), "--num-generate", "1",
                             "--max-new-tokens", "2", "--out", str(tmp_path / "base_eval")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "base_eval" / "eval_results.json").read_text())["baseline"] is None


@pytest.mark.slow
def test_baseline_base_loads_the_revision_the_run_trained_from(tmp_path, tiny_model_dir, train_file, quiet_env):
    """A Hub model at two revisions, served from a local Hugging Face cache (its refs/ name each snapshot) with the
    Hub offline: the run trains from revision v1, and `--baseline base` must evaluate v1, not main."""
    import shutil
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import LLMFT

    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshots = {"main": repo / "snapshots" / ("a" * 40), "v1": repo / "snapshots" / ("b" * 40)}
    for ref, folder in snapshots.items():
        shutil.copytree(tiny_model_dir, folder)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(folder.name)
    model = AutoModelForCausalLM.from_pretrained(snapshots["v1"])
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)  # another revision: other weights
    model.save_pretrained(snapshots["v1"])
    env = {**quiet_env, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", "acme/tiny", train_file, out, model={"revision": "v1"},
                          training={"max_steps": 1}, eval={"num_generate": 0})

    def llmft(*argv):
        result = subprocess.run([LLMFT, *argv], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]

    def baseline_loss(baseline, folder):
        llmft("eval", str(out), "--baseline", baseline, "--num-generate", "0", "--out", str(tmp_path / folder))
        return json.loads((tmp_path / folder / "eval_results.json").read_text())["baseline"]["eval_loss"]

    llmft("train", str(recipe))
    base = baseline_loss("base", "base")
    assert base == pytest.approx(baseline_loss(str(snapshots["v1"]), "v1"), rel=1e-6)
    assert base != pytest.approx(baseline_loss(str(snapshots["main"]), "main"), rel=1e-3)


def test_eval_command_errors_are_clear(tmp_path):
    import subprocess

    from tests.conftest import LLMFT

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    result = subprocess.run([LLMFT, "eval", str(tmp_path / "half")], capture_output=True, text=True)
    assert result.returncode == 1 and "not a complete run directory; missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_lm_eval_shipped_and_user_tasks_run_offline(tmp_path, tiny_model_dir, train_file, quiet_env):
    import subprocess

    from tests.conftest import LLMFT

    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    write_jsonl(tasks / "yes_no.jsonl", [{"q": f"Is {i} even?", "a": "yes" if i % 2 == 0 else "no"} for i in range(4)])
    (tasks / "my_yes_no.yaml").write_text(
        "task: my_yes_no\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: yes_no.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: [\"yes\", \"no\"]\n"
        "doc_to_target: \"{{0 if a == 'yes' else 1}}\"\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    result = subprocess.run(
        [LLMFT, "eval", str(tiny_model_dir), "--data", str(train_file), "--num-generate", "1", "--max-new-tokens", "2",
         "--lm-eval-tasks", "llmft_dates", "llmft_facts_mc", "my_yes_no", "--lm-eval-include", str(tasks),
         "--lm-eval-limit", "4", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=quiet_env, cwd=tmp_path)  # another working directory on purpose
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "out" / "eval_results.json").read_text())["results"]
    for key in ("eval_lm_eval/llmft_dates/exact_match", "eval_lm_eval/llmft_facts_mc/acc", "eval_lm_eval/my_yes_no/acc"):
        assert 0.0 <= scores[key] <= 1.0, key


def test_gsm8k_shaped_eval_with_extractor_and_few_shot(tmp_path, tiny_model_dir):
    import subprocess

    from tests.conftest import LLMFT
    from tests.helpers import SHARED_DATA

    gsm = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not gsm.exists():
        pytest.skip(f"shared data folder absent: {SHARED_DATA}")
    sample = tmp_path / "gsm.jsonl"
    sample.write_text("".join(gsm.read_text().splitlines(keepends=True)[:6]))
    subprocess.run([LLMFT, "data", "convert", str(sample), "--format", "columns", "--out", str(tmp_path / "gsm")],
                   check=True, capture_output=True)
    result = subprocess.run([LLMFT, "eval", str(tiny_model_dir), "--data", str(tmp_path / "gsm" / "train"),
                             "--answer-extractor", "gsm8k", "--few-shot", "2", "--num-generate", "2",
                             "--max-new-tokens", "4", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["settings"]["answer_extractor"] == "gsm8k" and results["results"]["eval_exact_match"] == 0.0
    answers = {json.loads(line)["answer"] for line in sample.read_text().splitlines()}
    assert all(s["reference"] in answers and "####" in s["reference"] for s in results["samples"])


def test_evaluate_library_metrics_by_path_in_scores_and_training_and_a_clear_error_offline(
        tmp_path, tiny_model_dir, train_file, quiet_env):
    import subprocess

    from tests.conftest import LLMFT

    script = tmp_path / "first_char.py"
    script.write_text(FIRST_CHAR_METRIC)
    metric = f"evaluate:{script}"
    assert score(["abc", "xyz"], ["aXX", "abc"], ["exact_match", metric]) == {
        "exact_match": 0.0, "first_char": 0.5, "first_char_count": 2.0}
    out = tmp_path / "run"
    train(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_file, out,
                                   eval={"num_generate": 2, "max_new_tokens": 2, "metrics": ["exact_match", metric]})))
    after = json.loads((out / "metrics.json").read_text())["after"]
    assert 0.0 <= after["eval_first_char"] <= 1.0 and after["eval_first_char_count"] == 2.0
    result = subprocess.run([LLMFT, "eval", str(tiny_model_dir), "--data", str(train_file), "--metrics",
                             "evaluate:rouge"], capture_output=True, text=True, env=quiet_env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "cannot load the evaluate metric 'rouge'" in result.stderr and "evaluate:/path/to/rouge.py" in result.stderr


def test_perplexity_of_a_batch_equals_each_text_alone_whatever_the_padding_side(tiny_model_dir):
    """Padded rows keep their positions: a text's perplexity does not depend on the texts batched with it, even with
    a tokenizer that pads on the left."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmft.config import ModelConfig
    from llmft.evaluation import perplexity
    from llmft.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    texts = ["a short one", "a much longer text that needs no padding at all in this batch"]
    alone = perplexity(model, tokenizer, texts[:1])
    tokenizer.padding_side = "left"
    short_nll, long_nll = (math.log(perplexity(model, tokenizer, [t])) for t in texts)
    n_short, n_long = (len(tokenizer(t)["input_ids"]) - 1 for t in texts)
    together = perplexity(model, tokenizer, texts)
    assert tokenizer.padding_side == "left"  # put back as it was
    assert together == pytest.approx(math.exp((short_nll * n_short + long_nll * n_long) / (n_short + n_long)),
                                     rel=1e-4)
    assert math.log(alone) == pytest.approx(short_nll, rel=1e-5)


def test_few_shot_examples_of_another_kind_than_the_rows_are_refused():
    from llmft.errors import DataError
    from llmft.evaluation import with_few_shot

    chat = [{"prompt": [{"role": "user", "content": "2+2?"}], "reference": "4"}]
    text = [{"prompt": "Q: 3+3?\nA: ", "reference": "6"}]
    assert with_few_shot(chat, chat)[0]["prompt"][1] == {"role": "assistant", "content": "4"}
    for items, shots in ((chat, text), (text, chat)):
        with pytest.raises(DataError, match="few-shot examples and the evaluated rows are of different kinds"):
            with_few_shot(items, shots)
