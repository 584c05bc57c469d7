"""Preference tuning end to end: the converters of every preference format, building pair and KTO datasets, loss
masks on real chat templates, and DPO, KTO and reward-model runs on a tiny model (weights change, the run directory
holds what a user needs, `llmft eval` reports pair and reward metrics)."""

import json
import math

import pytest
from safetensors.torch import load_file

from llmft.config import load_recipe
from llmft.data import encode_pair, load_rows
from llmft.dataset.build import BuildConfig, Source, build
from llmft.dataset.preference import (detect_preference_format, from_hh, from_kto, from_pairs, from_sharegpt_pairs,
                                      from_ultrafeedback, oasst_pairs)
from llmft.errors import DataError
from llmft.evaluation import EvalOptions, evaluate_command
from llmft.config import GenerationEval
from llmft.run_dir import read_run
from llmft.schema import RowError
from llmft.train import train
from tests.helpers import SHARED_DATA, assert_report, chat_rows, pair_rows, write_jsonl, write_recipe
from tests.test_templates import tokenizer_for

USER = [{"role": "user", "content": "Hi?"}]


# Converters -----------------------------------------------------------------------------------------------------


def test_trl_pairs_as_text_as_messages_and_with_the_prompt_inside_the_answers():
    text = from_pairs({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})
    assert text["prompt"] == USER and text["chosen"] == [{"role": "assistant", "content": "Hello."}]
    implicit = from_pairs({"chosen": USER + [{"role": "assistant", "content": "Hello."}],
                           "rejected": USER + [{"role": "assistant", "content": "Go away."}]})
    assert implicit["prompt"] == USER and implicit["rejected"][0]["content"] == "Go away."
    # ultrafeedback_binarized: a text prompt, and answers that repeat it as their first message.
    binarized = from_pairs({"prompt": "Hi?", "chosen": USER + [{"role": "assistant", "content": "Hello."}],
                            "rejected": USER + [{"role": "assistant", "content": "No."}], "score_chosen": 8.0,
                            "score_rejected": 2.0})
    assert binarized["chosen"] == [{"role": "assistant", "content": "Hello."}] and binarized["score_chosen"] == 8.0
    with pytest.raises(RowError, match="shares no prompt"):
        from_pairs({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]})


def test_llamafactory_hh_ultrafeedback_oasst_and_kto_rows():
    pair = from_sharegpt_pairs({"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi?"}],
                                "chosen": {"from": "gpt", "value": "Hello."}, "rejected": {"from": "gpt", "value": "No."}})
    assert [m["role"] for m in pair["prompt"]] == ["system", "user"] and pair["rejected"][0]["content"] == "No."

    hh = from_hh({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: Bye!",
                  "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: Whatever."})
    assert [m["role"] for m in hh["prompt"]] == ["user", "assistant", "user"]
    assert hh["chosen"][0]["content"] == "Bye!" and hh["rejected"][0]["content"] == "Whatever."

    rated = {"instruction": "Name a colour.", "completions": [
        {"response": "Blue.", "overall_score": 9}, {"response": "Seven.", "overall_score": 2},
        {"response": "Red, probably.", "overall_score": 6}]}
    (best_worst,) = from_ultrafeedback(rated)
    assert (best_worst["chosen"][0]["content"], best_worst["rejected"][0]["content"]) == ("Blue.", "Seven.")
    assert len(from_ultrafeedback(rated, margin=3)) == 3  # 9-2, 9-6, 6-2: every pair at least 3 apart
    assert len(from_ultrafeedback(rated, margin=5)) == 1
    with pytest.raises(RowError, match="same rating"):
        from_ultrafeedback({"instruction": "x", "completions": [{"response": "a", "overall_score": 1},
                                                                {"response": "b", "overall_score": 1}]})

    tree = {"role": "prompter", "text": "Q?", "replies": [
        {"role": "assistant", "text": "Worst.", "rank": 2, "replies": []},
        {"role": "assistant", "text": "Best.", "rank": 0, "replies": [
            {"role": "prompter", "text": "More?", "replies": [{"role": "assistant", "text": "Only one.", "rank": 0}]}]},
        {"role": "assistant", "text": "Deleted.", "rank": 1, "deleted": True}]}
    (found,) = oasst_pairs(tree)  # the follow-up has a single reply: no pair there
    assert found["prompt"] == [{"role": "user", "content": "Q?"}]
    assert (found["chosen"][0]["content"], found["rejected"][0]["content"]) == ("Best.", "Worst.")

    kto = from_kto({"messages": USER + [{"role": "assistant", "content": "Hello."}], "label": True})
    assert kto == {"prompt": USER, "completion": [{"role": "assistant", "content": "Hello."}], "label": True}
    assert from_kto({"prompt": "Hi?", "completion": "Go away.", "label": False})["label"] is False
    with pytest.raises(RowError, match="label"):
        from_kto({"prompt": "Hi?", "completion": "Go away.", "label": "yes"})


@pytest.mark.parametrize("row,expected", [
    ({"conversations": [], "chosen": {}, "rejected": {}}, "sharegpt_pairs"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "pairs"),
    ({"instruction": "a", "completions": []}, "ultrafeedback"),
    ({"messages": [], "label": True}, "kto"),
    ({"prompt": "a", "completion": "b", "label": False}, "kto"),
    ({"messages": []}, None),
])
def test_preference_formats_are_detected_from_their_keys(row, expected):
    assert detect_preference_format(row) == expected


# Building datasets ----------------------------------------------------------------------------------------------


def _build(tmp_path, *paths, **options):
    config = BuildConfig(out=str(tmp_path / "out"), near_dedupe_threshold="off",
                         sources=[Source(path=str(p)) for p in paths], **options)
    return build(config)


def test_pair_dataset_dedupes_on_the_prompt_and_keeps_one_rows_pairs_on_one_side_of_the_split(tmp_path):
    rated = [{"instruction": f"Question {i}?", "completions": [{"response": f"Good {i}.", "overall_score": 9},
                                                               {"response": f"Fine {i}.", "overall_score": 6},
                                                               {"response": f"Bad {i}.", "overall_score": 1}]}
             for i in range(10)]
    rated.append({**rated[0], "completions": rated[0]["completions"][::-1]})  # the same prompt again: a duplicate
    source = write_jsonl(tmp_path / "uf.jsonl", rated)
    manifest = build(BuildConfig(out=str(tmp_path / "out"), test_fraction=0.3, near_dedupe_threshold="off",
                                 sources=[Source(path=str(source), pair_margin=3)]))
    assert manifest["kind"] == "preference"
    assert manifest["sources"][0]["read"] == manifest["sources"][0]["kept"] == 33  # 3 pairs a row
    assert manifest["steps"]["dedupe"]["exact"] == 3  # the repeated prompt's 3 pairs; each row's own 3 are kept
    train_rows, test_rows = (load_rows(str(tmp_path / "out" / s)) for s in ("train", "test"))
    assert len(train_rows) + len(test_rows) == 30
    prompts = [{r["prompt"][0]["content"] for r in rows} for rows in (train_rows, test_rows)]
    assert not prompts[0] & prompts[1]  # no prompt on both sides
    assert set(train_rows.column_names) >= {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}


def test_one_build_gives_one_kind_of_row(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(3))
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(3))
    with pytest.raises(DataError, match="different kinds of rows.*pairs.jsonl: pairs.*chats.jsonl: conversations"):
        _build(tmp_path, pairs, chats)


@pytest.mark.skipif(not (SHARED_DATA / "llamafactory_demo").exists(), reason="needs ../shared/data/llamafactory_demo")
def test_llamafactory_demo_pairs_and_kto_rows_convert_completely(tmp_path):
    dpo = _build(tmp_path / "dpo", SHARED_DATA / "llamafactory_demo" / "dpo_en_demo.json")
    assert dpo["sources"][0]["format"] == "sharegpt_pairs"
    assert dpo["sources"][0]["read"] == dpo["sources"][0]["kept"] == 300
    assert dpo["steps"]["dedupe"]["exact"] == 5  # five prompts appear twice in the file
    assert dpo["output"]["train"]["rows"] == 295
    kto = _build(tmp_path / "kto", SHARED_DATA / "llamafactory_demo" / "kto_en_demo.json")
    rows = load_rows(str(tmp_path / "kto" / "out" / "train"))
    assert kto["sources"][0]["format"] == "kto" and len(rows) == 300
    assert sum(rows["label"]) == 150


# Loss masks on real templates -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm2", "llama3_2", "qwen3", "gemma3", "phi3"])
def test_pairs_train_only_the_answer_and_its_end_of_turn_token(name):
    tokenizer, end = tokenizer_for(name)
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"}],
           "chosen": [{"role": "assistant", "content": "Four."}], "rejected": [{"role": "assistant", "content": "Five."}]}
    pair = encode_pair(tokenizer, row)
    assert not pair["prompt_differs"]
    prompt = tokenizer.decode(pair["prompt_ids"])
    assert prompt.rstrip().endswith(tokenizer.decode(tokenizer(
        tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"][-3:]).rstrip())  # the prompt ends with the generation prompt
    for answer, text in (("chosen_ids", "Four."), ("rejected_ids", "Five.")):
        decoded = tokenizer.decode(pair[answer])
        assert text in decoded and decoded.rstrip().endswith(end), decoded  # (Qwen3's empty think block is the model's)
        assert decoded.replace("<think>", "").replace("</think>", "").strip().startswith(text), decoded
        assert "Two plus two" not in decoded and "Be brief" not in decoded


# Training -------------------------------------------------------------------------------------------------------


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))


def _recipe(tmp_path, model, data, stage, **training):
    return load_recipe(write_recipe(tmp_path / f"{stage}.yaml", model, data, tmp_path / f"run_{stage}",
                                    data={"eval_fraction": 0.25}, training={"stage": stage, **training}))


def _changed(out, base_adapter_names=None):
    run = read_run(out)
    tensors = run.info.trainable_tensors
    assert tensors["changed"] == tensors["total"] > 0, tensors
    return run


def test_dpo_lora_starts_at_log_2_trains_and_reports_pair_metrics(tmp_path, tiny_model_dir, pairs_file, capfd):
    out = train(_recipe(tmp_path, tiny_model_dir, pairs_file, "dpo", learning_rate=1e-2, max_steps=6))
    run = _changed(out)
    assert run.info.stage == "dpo" and not (out / "ref").exists()  # no copy of the adapter as reference
    before, after = run.metrics.before, run.metrics.after
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference: the DPO loss is log 2
    assert before["eval_rewards/accuracies"] == 0 and "eval_pair_accuracy" in before
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_rewards/accuracies"] > 0.5
    assert_report(out, "eval_pair_accuracy", "eval_rewards/accuracies", "Speed and cost")
    capfd.readouterr()
    evaluate_command(EvalOptions(target=str(out), baseline="base"), GenerationEval(num_generate=0))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["results"]["eval_reward_accuracy"] > 0.5  # the run against its base as reference
    assert results["results"]["eval_reward_margin"] > 0
    assert {"eval_pair_accuracy", "eval_logps_chosen"} <= set(results["baseline"])


def test_dpo_loss_variants_and_full_fine_tuning_train(tmp_path, tiny_model_dir, pairs_file):
    out = train(_recipe(tmp_path, tiny_model_dir, pairs_file, "dpo", loss_type=["ipo"], max_steps=2, learning_rate=1e-3))
    assert read_run(out).recipe.training.loss_type == ["ipo"]
    _changed(out)
    recipe = load_recipe(write_recipe(tmp_path / "full.yaml", tiny_model_dir, pairs_file, tmp_path / "full",
                                      peft={"method": "full"}, data={"eval_fraction": 0.25},
                                      training={"stage": "dpo", "max_steps": 2, "learning_rate": 1e-4}))
    _changed(train(recipe))  # the reference is a second copy of the base model, loaded by TRL


def test_dpo_on_top_of_an_sft_run(tmp_path, tiny_model_dir, pairs_file):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(8))
    sft = train(load_recipe(write_recipe(tmp_path / "sft.yaml", tiny_model_dir, chats, tmp_path / "sft",
                                         data={"eval_fraction": 0.0})))
    dpo = train(_recipe(tmp_path, sft, pairs_file, "dpo", max_steps=2, learning_rate=1e-3))
    run = _changed(dpo)
    assert run.info.base_model.name_or_path == str(sft)
    # The DPO adapter loads on the SFT run's merged weights, as `llmft eval` and `llmft merge` load it.
    evaluate_command(EvalOptions(target=str(dpo)), GenerationEval(num_generate=0))
    assert "eval_pair_accuracy" in json.loads((dpo / "eval_results.json").read_text())["results"]


def test_kto_trains_on_pairs_split_into_desirable_and_undesirable_answers(tmp_path, tiny_model_dir, pairs_file):
    out = train(_recipe(tmp_path, tiny_model_dir, pairs_file, "kto", max_steps=3, learning_rate=1e-2))
    run = _changed(out)
    assert run.info.launch.cpu_micro_batches is False  # KTO's KL term needs whole batches
    assert run.info.data["train"].tokenized["rows_out"] == 18  # 9 training pairs, 2 answers each
    assert "eval_kl" in run.metrics.after and "eval_pair_accuracy" in run.metrics.after


def test_reward_model_trains_a_score_head_and_is_evaluated_as_one(tmp_path, tiny_model_dir, pairs_file):
    out = train(_recipe(tmp_path, tiny_model_dir, pairs_file, "reward", max_steps=4, learning_rate=1e-2))
    _changed(out)
    saved = load_file(out / "adapter_model.safetensors")
    assert any("score" in name for name in saved)  # the new head is saved with the adapter
    evaluate_command(EvalOptions(target=str(out)), GenerationEval(num_generate=0))
    results = json.loads((out / "eval_results.json").read_text())["results"]
    assert set(results) == {"eval_reward_accuracy", "eval_reward_margin"}
    assert_report(out, "eval_reward_accuracy", "Training curves")  # refreshed by llmft eval
    from llmft.chat import ChatOptions, load  # a reward model scores answers: chat refuses it by name
    from llmft.errors import ConfigError

    with pytest.raises(ConfigError, match="a reward run scores answers and cannot write them"):
        load(ChatOptions(run=str(out)))


def test_stages_refuse_the_wrong_kind_of_rows(tmp_path, tiny_model_dir, pairs_file):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(8))
    with pytest.raises(DataError, match="holds messages rows; this stage trains on preference pairs"):
        train(_recipe(tmp_path, tiny_model_dir, chats, "dpo"))
    with pytest.raises(DataError, match="holds preference rows, which supervised fine-tuning does not train on"):
        train(_recipe(tmp_path, tiny_model_dir, pairs_file, "sft"))


def test_the_report_of_pairs_flags_a_length_bias(tmp_path):
    from datasets import Dataset

    from llmft.dataset.report import format_table, report

    tokenizer, _ = tokenizer_for("smollm2")
    biased = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Q{i}?"}],
                                 "chosen": [{"role": "assistant", "content": f"A long and careful answer {i}."}],
                                 "rejected": [{"role": "assistant", "content": "No."}]} for i in range(10)])
    result = report(biased, tokenizer, 64, "drop", "biased")
    assert result["schema"] == "preference" and result["rows"] == 10
    assert result["chosen_longer_share"] == 1.0 and result["length_bias"]
    assert result["answer_tokens"]["chosen"]["mean"] > result["answer_tokens"]["rejected"]["mean"]
    assert "LENGTH BIAS" in format_table(result)
    balanced = Dataset.from_list(pair_rows(10))
    assert not report(balanced, tokenizer, 64, "drop", "balanced")["length_bias"]


def test_the_report_of_pairs_names_the_row_a_template_cannot_render(tmp_path):
    from datasets import Dataset

    from llmft.dataset.report import report

    tokenizer, _ = tokenizer_for("gemma")  # refuses a system message
    rows = pair_rows(3)
    rows[1] = {**rows[1], "prompt": [{"role": "system", "content": "Be brief."}, *rows[1]["prompt"]]}
    with pytest.raises(DataError, match=r"pairs: row 2: the chat template of .* refused this conversation"):
        report(Dataset.from_list(rows), tokenizer, 64, "drop", "pairs")


@pytest.mark.parametrize("stage,extra", [("orpo", {}), ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0})],
                         ids=["orpo", "simpo"])
def test_reference_free_stages_orpo_and_simpo_train(tmp_path, tiny_model_dir, pairs_file, stage, extra):
    out = train(_recipe(tmp_path, tiny_model_dir, pairs_file, stage, max_steps=3, learning_rate=1e-2, **extra))
    run = _changed(out)
    assert run.info.stage == stage and "eval_rewards/accuracies" in run.metrics.after
    assert "eval_nll_loss" in run.metrics.after and "eval_pair_accuracy" in run.metrics.after


def test_kto_kl_completions_answer_another_prompt():
    """A pair unpaired for KTO is two neighbouring rows of one prompt; the KL term's mismatched completion must come
    from another prompt, not the row's own pair."""
    from llmft.stages.preference import mismatched_completions

    prompts = [[1], [1], [2], [2], [3], [3]]  # chosen, rejected of three prompts
    completions = [[10], [11], [20], [21], [30], [31]]
    kl = mismatched_completions({"prompt_ids": prompts, "completion_ids": completions})["KL_completion_ids"]
    for prompt, completion in zip(prompts, kl):
        assert completions.index(completion) // 2 != prompt[0] - 1
    assert mismatched_completions({"prompt_ids": [[1], [1]], "completion_ids": [[10], [11]]}) == {
        "KL_completion_ids": [[11], [10]]}  # one prompt only: nothing else to take
