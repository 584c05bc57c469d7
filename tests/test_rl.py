"""GRPO with verifiable rewards: the rewards on real answer formats, their errors, and training runs on a tiny model
(rewards logged, run directory complete, resume after a kill, SIGTERM, the non-finite guard)."""

import asyncio
import inspect
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from llmft.checkpoint import MARKER, NonFiniteError
from llmft.config import GenerationEval, load_recipe
from llmft.errors import ConfigError, DataError
from llmft.evaluation import EvalOptions, evaluate_command
from llmft.rewards import RewardError, build_reward, reward_name
from llmft.run_dir import read_run
from llmft.train import train
from tests.conftest import LLMFT
from tests.helpers import REPO, assert_report, chat_rows, write_jsonl, write_recipe
from tests.test_resume import KILLER

GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
VOWELS = '''
def vowels(prompts, completions, **columns):
    """Share of vowels in the completion: varies between random completions, so GRPO's advantages are not zero."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(1, len(t)) for t in texts]
'''


def _completion(text):
    return [[{"role": "assistant", "content": text}]]


def test_exact_match_reward_reads_answers_with_the_eval_extractors():
    reward = build_reward("exact_match:gsm8k")
    assert reward(prompts=[""], completions=_completion("So the answer is\n#### 72"), reference=[GSM8K_ANSWER]) == [1.0]
    assert reward(prompts=[""], completions=_completion("She sold 72 clips."), reference=[GSM8K_ANSWER]) == [1.0]
    assert reward(prompts=[""], completions=_completion("#### 71"), reference=[GSM8K_ANSWER]) == [0.0]
    assert reward(prompts=[""], completions=_completion("no number"), reference=[GSM8K_ANSWER]) == [0.0]
    strict = build_reward("exact_match:regex:#### (\\d+)")
    assert strict(prompts=[""], completions=_completion("She sold 72 clips."), reference=[GSM8K_ANSWER]) == [0.0]
    assert reward_name("exact_match:gsm8k") == "exact_match_gsm8k" and reward_name("length:64") == "length_64"
    # A thinking model's reasoning is not its answer, as in llmft eval: 71 inside <think> is not the answer 72
    thought = _completion("<think>\nMaybe #### 71? No.\n</think>\n\n#### 72")
    assert strict(prompts=[""], completions=thought, reference=[GSM8K_ANSWER]) == [1.0]
    assert build_reward("exact_match")(prompts=[""], completions=_completion("<think>\nSum.\n</think>\n\n4"),
                                       reference=["4"]) == [1.0]
    # A trace cut off by the length limit holds no answer, whatever number it reached
    cut = _completion("<think>\nNatalia sold 48 + 24 = 72")
    assert reward(prompts=[""], completions=cut, reference=[GSM8K_ANSWER]) == [0.0]
    assert reward(prompts=[""], completions=_completion("#### 72 clips. Hope this helps!"),
                  reference=[GSM8K_ANSWER]) == [1.0]


def test_format_and_length_rewards():
    fmt = build_reward("format")
    assert fmt(prompts=[""], completions=_completion("48/2 = 24, 48 + 24 = 72\n#### 72")) == [1.0]
    assert fmt(prompts=[""], completions=_completion("#### 72")) == [0.0]  # no reasoning before the answer
    assert fmt(prompts=[""], completions=_completion("72")) == [0.0]
    think = build_reward("format:<think>.+</think>.+")
    assert think(prompts=[""], completions=_completion("<think>add</think>72")) == [1.0]
    length = build_reward("length:4")
    values = length(prompts=["", "", ""], completions=["a", "b", "c"], completion_ids=[[1] * 4, [1] * 6, [1] * 20])
    assert values == [0.0, -0.5, -1.0]


def test_rewards_log_under_distinct_names_and_accept_numpy_values(tmp_path):
    import numpy as np

    from llmft.rewards import build_rewards

    assert [r.__name__ for r in build_rewards(["format", "format:<think>.+", "length:8"])] == \
        ["format", "format_2", "length_8"]
    (tmp_path / "np_reward.py").write_text("import numpy as np\n"
                                           "def score(prompts, completions, **_):\n"
                                           "    return list(np.array([0.5] * len(completions), dtype=np.float32))\n")
    values = build_reward(f"python:{tmp_path / 'np_reward.py'}:score")(prompts=["", ""], completions=["a", "b"])
    assert [float(v) for v in values] == [0.5, 0.5] and isinstance(values[0], np.floating)


def test_reward_settings_are_checked_when_the_recipe_loads(tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, rows, tmp_path / "run", training={
        "stage": "grpo", "rewards": ["exact_match:gsm9k", "format:(unclosed", "python:no_such_module:f", "lenght:3"],
        "reward_weights": [1.0], "num_generations": 2})
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    message = str(err.value)
    for expected in ("unknown answer extractor 'gsm9k'", "format:(unclosed", "no_such_module",
                     "'lenght:3' is not a reward", "1 weights for 4 rewards"):
        assert expected in message, message


def test_grpo_settings_are_checked_all_at_once_with_the_common_ones(tmp_path, tiny_model_dir):
    """Out-of-range generation settings crashed inside TRL or generate() with tracebacks; wrongly typed rewards and
    weights reached the reward code; the common checks waited until the GRPO ones passed."""
    rows = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, rows, tmp_path / "run", training={
        "stage": "grpo", "rewards": ["format", 3], "reward_weights": ["heavy"], "num_generations": 1,
        "steps_per_generation": 0, "temperature": 0.0, "max_completion_length": 0, "learning_rate": -1})
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    message = str(err.value)
    for expected in ("training.rewards: ['format', 3] is not a list of strings",
                     "training.reward_weights: ['heavy'] is not a list of numbers",
                     "training.num_generations: 1 must be >= 2", "training.steps_per_generation: 0 must be > 0",
                     "training.temperature: 0.0 must be > 0", "training.max_completion_length: 0 must be > 0",
                     "training.learning_rate: -1 must be >= 0"):
        assert expected in message, message
    with pytest.raises(ConfigError, match="training.num_generations: 0 must be >= 2"):  # was ZeroDivisionError
        load_recipe(recipe, ["--rewards", "format", "--reward_weights", "1", "--num_generations", "0",
                             "--steps_per_generation", "1", "--temperature", "1", "--max_completion_length", "8",
                             "--learning_rate", "1e-5"])


def test_a_broken_reward_names_itself_and_the_example(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text("def picky(prompts, completions, reference, **_):\n"
                      "    return [1 / (r != 'bad') for r in reference]\n"
                      "def nan(prompts, completions, **_):\n    return [float('nan')] * len(completions)\n"
                      "def short(prompts, completions, **_):\n    return [1.0]\n")
    batch = {"prompts": ["", ""], "completions": ["a", "b"], "reference": ["ok", "bad"],
             "example_id": ["row 3", "row 7"]}
    with pytest.raises(RewardError, match=r"reward 'python:.*:picky' raised ZeroDivisionError.*fails on row 7"):
        build_reward(f"python:{module}:picky")(**batch)
    with pytest.raises(RewardError, match=r"returned nan for row 3: rewards must be finite"):
        build_reward(f"python:{module}:nan")(**batch)
    with pytest.raises(RewardError, match=r"returned 1 values for 2 completions"):
        build_reward(f"python:{module}:short")(**batch)


def test_reward_modules_load_as_python_would_run_them(tmp_path, monkeypatch):
    """A .py file with dataclasses under postponed annotations (they look their module up in sys.modules), a dotted
    module in the current folder (the console script does not put it on the path), and an async reward."""
    (tmp_path / "typed.py").write_text("from __future__ import annotations\nfrom dataclasses import dataclass\n"
                                       "@dataclass\nclass Score:\n    value: float\n"
                                       "def score(prompts, completions, **_):\n"
                                       "    return [Score(1.0).value for _ in completions]\n")
    (tmp_path / "json.py").write_text("def f(prompts, completions, **_):\n    return [0.0] * len(completions)\n")
    (tmp_path / "local_rewards.py").write_text("async def graded(prompts, completions, **_):\n"
                                               "    return [0.5] * len(completions)\n"
                                               "async def picky(prompts, completions, **_):\n"
                                               "    return [1 / (c != 'b') for c in completions]\n")
    batch = {"prompts": ["", ""], "completions": ["a", "b"]}
    assert build_reward(f"python:{tmp_path / 'typed.py'}:score")(**batch) == [1.0, 1.0]
    assert build_reward(f"python:{tmp_path / 'json.py'}:f")(**batch) == [0.0, 0.0] and json.dumps([1]) == "[1]"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    graded = build_reward("python:local_rewards:graded")
    assert inspect.iscoroutinefunction(graded)  # TRL awaits async rewards together on its own event loop
    assert asyncio.run(graded(**batch)) == [0.5, 0.5]
    with pytest.raises(RewardError, match=r"raised ZeroDivisionError.*it fails on completion 2"):
        asyncio.run(build_reward("python:local_rewards:picky")(**batch))
    other = tmp_path / "other"
    other.mkdir()
    (other / "typed.py").write_text("def score(prompts, completions, **_):\n    return [2.0] * len(completions)\n")
    assert build_reward(f"python:{other / 'typed.py'}:score")(**batch) == [2.0, 2.0]  # not the first typed.py
    assert build_reward(f"python:{tmp_path / 'typed.py'}:score")(**batch) == [1.0, 1.0]


def _grpo_recipe(tmp_path, model_dir, name="run", rows=12, **training):
    data = []
    for i in range(rows):
        data.append({"messages": [{"role": "user", "content": f"Tom has {i} apples and buys 1 more. How many?"},
                                  {"role": "assistant", "content": f"{i} + 1 = {i + 1}\n#### {i + 1}"}]})
    (tmp_path / "vowels.py").write_text(VOWELS)
    settings = {"stage": "grpo", "rewards": ["exact_match:gsm8k", f"python:{tmp_path / 'vowels.py'}:vowels"],
                "reward_weights": [1.0, 1.0], "num_generations": 2, "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 2, "max_completion_length": 8, "max_steps": 3, "learning_rate": 5e-2,
                **training}
    return write_recipe(tmp_path / f"{name}.yaml", model_dir, write_jsonl(tmp_path / "train.jsonl", data),
                        tmp_path / name, data={"eval_fraction": 0.25}, eval={"answer_extractor": "gsm8k", "num_generate": 3, "max_new_tokens": 8},
                        training=settings)


def test_grpo_lora_trains_logs_each_reward_and_leaves_a_complete_run(tmp_path, tiny_model_dir, capfd):
    out = train(load_recipe(_grpo_recipe(tmp_path, tiny_model_dir)))
    run = read_run(out)
    assert run.info.stage == "grpo" and run.info.launch.cpu_micro_batches is False
    assert run.info.trainable_tensors["changed"] == run.info.trainable_tensors["total"] > 0
    assert run.info.data["train"].tokenized["rows_out"] == 9
    logged = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logged) == 3
    for step in logged:  # every reward, every step
        assert {"rewards/exact_match_gsm8k/mean", "rewards/vowels/mean", "reward"} <= set(step)
    for metrics in (run.metrics.before, run.metrics.after):
        assert math.isfinite(metrics["eval_reward"]) and "eval_exact_match" in metrics  # held-out reward and EM
    assert (out / "adapter_model.safetensors").exists() and (out / "eval_samples.jsonl").exists()
    assert (out / "reward_curve.png").exists()  # the reward curves, pushed with the model card
    assert "\nreward " in capfd.readouterr().out  # the summary's row
    assert_report(out, '"text":"reward"', "exact_match_gsm8k", "vowels")  # the reward chart, each reward
    evaluate_command(EvalOptions(target=str(out)), GenerationEval(num_generate=2, max_new_tokens=4))
    assert "eval_exact_match" in json.loads((out / "eval_results.json").read_text())["results"]


def test_grpo_refuses_pairs_and_counts_prompts_too_long(tmp_path, tiny_model_dir):
    from tests.helpers import pair_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    recipe = write_recipe(tmp_path / "p.yaml", tiny_model_dir, pairs, tmp_path / "p",
                          training={"stage": "grpo", "num_generations": 2, "per_device_train_batch_size": 2})
    with pytest.raises(DataError, match="holds preference rows; grpo trains on prompts with a reference answer"):
        train(load_recipe(recipe))
    with pytest.raises(DataError, match=r"no prompt left to train on \(9 prompt longer than max_length 4\)"):
        train(load_recipe(_grpo_recipe(tmp_path, tiny_model_dir, name="short", max_length=4)))


@pytest.mark.slow
def test_grpo_resumes_after_a_kill_to_the_uninterrupted_result(tmp_path, tiny_model_dir, quiet_env):
    checkpoints = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    reference = train(load_recipe(_grpo_recipe(tmp_path, tiny_model_dir, "reference", **checkpoints)))
    killed = _grpo_recipe(tmp_path, tiny_model_dir, "killed", **checkpoints)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(killed), "3"], cwd=REPO, env=quiet_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    out = tmp_path / "killed"
    assert (out / "checkpoint-2" / MARKER).exists() and not (out / "run.json").exists()
    train(load_recipe(killed))
    assert read_run(out).info.resumed_from == str(out / "checkpoint-2")
    from safetensors.torch import load_file

    want, have = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    for name in want:  # same prompts, same sampled completions (RNG restored), same updates
        assert torch.allclose(want[name], have[name], atol=1e-6), name


@pytest.mark.slow
def test_grpo_stops_cleanly_on_sigterm(tmp_path, tiny_model_dir, quiet_env):
    recipe = _grpo_recipe(tmp_path, tiny_model_dir, max_steps=2000)
    proc = subprocess.Popen([LLMFT, "train", str(recipe)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**quiet_env, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "'loss'" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "Resume with the same command" in stderr
    assert [p for p in (tmp_path / "run").glob("checkpoint-*") if (p / MARKER).exists()]


class NanInTraining(TrainerCallback):
    """Makes the training forward pass (with gradients) of prompts holding 'apples and buys 1' of row 5 NaN, while
    generation (no gradients) stays finite: a model that diverges only in the update, as the guard must catch."""

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        marker = processing_class("Tom has 4 apples", add_special_tokens=False)["input_ids"]

        def poison(module, inputs, output):
            ids = inputs[0]
            if torch.is_grad_enabled() and any(_contains(row.tolist(), marker) for row in ids):
                return output * float("nan")
            return output

        model.get_input_embeddings().register_forward_hook(poison)


def _contains(seq, part):
    return any(seq[i: i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_the_nonfinite_guard_stops_grpo_naming_the_examples(tmp_path, tiny_model_dir):
    recipe = load_recipe(_grpo_recipe(tmp_path, tiny_model_dir, max_steps=6))
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradients at step \d+ \(examples: .*row 5"):
        train(recipe, callbacks=[NanInTraining()])


def test_grpo_trains_on_prompt_only_rows_from_an_sft_run_with_full_fine_tuning(tmp_path, tiny_model_dir):
    sft = train(load_recipe(write_recipe(tmp_path / "sft.yaml", tiny_model_dir,
                                         write_jsonl(tmp_path / "chats.jsonl", chat_rows(8)), tmp_path / "sft",
                                         data={"eval_fraction": 0.0})))
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}], "answer": str(i + 1), "level": i % 3}
            for i in range(8)]
    (tmp_path / "vowels.py").write_text(VOWELS)
    recipe = write_recipe(tmp_path / "grpo.yaml", sft, write_jsonl(tmp_path / "prompts.jsonl", rows), tmp_path / "rl",
                          peft={"method": "full"}, data={"eval_fraction": 0.25},
                          eval={"answer_extractor": "last_number", "num_generate": 2, "max_new_tokens": 4},
                          training={"stage": "grpo", "rewards": ["exact_match:last_number",
                                                                 f"python:{tmp_path / 'vowels.py'}:vowels"],
                                    "num_generations": 2, "per_device_train_batch_size": 4,
                                    "per_device_eval_batch_size": 2, "max_completion_length": 6, "max_steps": 2,
                                    "learning_rate": 1e-3})
    run = read_run(train(load_recipe(recipe)))
    assert run.info.base_model.name_or_path == str(sft) and not run.is_adapter
    assert run.info.trainable_tensors["changed"] == run.info.trainable_tensors["total"] > 0
    assert "eval_exact_match" in run.metrics.after and "eval_reward" in run.metrics.after
    with pytest.raises(DataError, match=r"has a 'prompt' column but no answers \(columns: \['answer', 'level', 'prompt'\]\)"):
        train(load_recipe(write_recipe(tmp_path / "s2.yaml", tiny_model_dir, tmp_path / "prompts.jsonl",
                                       tmp_path / "s2")))


@pytest.mark.gpu
def test_grpo_generates_with_vllm_colocated(tmp_path, tiny_model_dir):
    """vLLM generation (training.use_vllm, colocate mode) on one GPU: needs CUDA and `pip install vllm`."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm on a GPU machine)")
    recipe = load_recipe(_grpo_recipe(tmp_path, tiny_model_dir, use_vllm=True, vllm_mode="colocate",
                                      vllm_gpu_memory_utilization=0.2, bf16=True, use_cpu=False))
    run = read_run(train(recipe))
    assert run.info.trainable_tensors["changed"] == run.info.trainable_tensors["total"] > 0


def test_numeric_answers_compare_as_numbers_and_nothing_else_does():
    from llmft.evaluation import matches

    for prediction, reference in [("72.0", "72"), ("1,234", "1234"), ("The answer is 72.", "#### 72")]:
        assert matches(prediction, reference, "last_number"), (prediction, reference)
    for prediction, reference in [("-5", "5"), ("1,5", "15"), ("12345678901234567890", "12345678901234567891")]:
        assert not matches(prediction, reference, "none"), (prediction, reference)
    assert matches("2010-01-11", "2010-01-11") and not matches("2010-01-11", "2010-1-11")  # the demo's dates


def test_only_a_prompt_with_its_reference_is_a_prompt_only_row():
    from llmft.schema import PROMPT_ONLY, kind_of

    assert kind_of(["prompt", "answer", "level"], "x") == PROMPT_ONLY
    for columns in (["prompt", "chosen"], ["prompt", "response"], ["prompt"]):  # malformed pairs, unknown answers
        with pytest.raises(DataError, match="none of the columns of a training row"):
            kind_of(columns, "x")


def test_grpo_prompts_keep_each_messages_own_fields(tmp_path, tiny_model_dir):
    """One prompt's message with a `name` must not give every other prompt's messages `name: null` (templates that
    test `'name' in message` would render it), and a reference answer "4" stays text."""
    from llmft.data import load_rows
    from llmft.model import load_tokenizer
    from llmft.stages.rl import prepare

    rows = [{"messages": [{"role": "user", "content": "Two plus two?", "name": "ann"},
                          {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "user", "content": "Three plus three?"}, {"role": "assistant", "content": "6"}]}]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    recipe = load_recipe(write_recipe(tmp_path / "g.yaml", tiny_model_dir, data, tmp_path / "g",
                                      training={"stage": "grpo", "rewards": ["exact_match"], "num_generations": 2,
                                                "per_device_train_batch_size": 2}))
    prepared, _ = prepare(load_rows(str(data)), load_tokenizer(recipe.model), recipe, str(data))
    assert prepared[0]["prompt"] == [{"role": "user", "content": "Two plus two?", "name": "ann"}]
    assert prepared[1]["prompt"] == [{"role": "user", "content": "Three plus three?"}]
    assert prepared[0]["reference"] == "4"
