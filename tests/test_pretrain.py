"""Continued pretraining on raw text: conversion of .txt/JSONL text, the data report, packing into blocks with an
end-of-text token between documents, loss on every token, replay conversations, perplexity before and after."""

import json
import math
from pathlib import Path

import pytest

from llmft.config import load_recipe
from llmft.dataset.build import BuildConfig, build
from llmft.dataset.convert import Source
from llmft.dataset.report import format_table, report
from llmft.data import load_rows
from llmft.errors import ConfigError, DataError
from llmft.run_dir import read_run
from llmft.stages.pretrain import text_blocks
from llmft.train import train
from tests.helpers import assert_report, chat_rows, make_tokenizer, write_jsonl, write_recipe

C4 = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory_demo" / "c4_demo.jsonl"
DOCS = ["The river rises in the hills and runs to the sea.", "Bread is made from flour, water and salt.",
        "Stars are far away.", "Rain falls in the spring."]


def test_documents_pack_into_blocks_with_an_end_of_text_token_between_them():
    from datasets import Dataset

    tokenizer = make_tokenizer()
    rows = Dataset.from_list([{"text": DOCS[0]}, {"text": "   "}, {"text": DOCS[1]}, {"text": ""}, {"text": DOCS[2]}])
    blocks, rep = text_blocks(rows, tokenizer, 16, "docs.jsonl")
    stream = [t for ids in blocks["input_ids"] for t in ids]
    expected = []
    for doc in (DOCS[0], DOCS[1], DOCS[2]):
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # Nothing lost, nothing added but the separators (a last block of only the final end-of-text token is not kept).
    assert stream in (expected, expected[:-1])
    assert all(len(ids) == 16 for ids in blocks["input_ids"][:-1]) and 0 < len(blocks["input_ids"][-1]) <= 16
    assert blocks["labels"] == blocks["input_ids"]  # loss on every token
    assert rep.dropped == {"document with no text": 2} and rep.rows_in == 5 and rep.rows_out == 3
    assert rep.tokens == rep.trainable_tokens == len(stream) and rep.examples == len(blocks)
    ids = blocks["example_id"]  # each block names the rows it holds (rows 2 and 4 were empty)
    assert ids[0].startswith("block 1 (row") and " 1" in ids[0].split("(")[1]
    assert any(i.startswith("block") and "rows 1, 3)" in i or "rows 3, 5)" in i for i in ids)
    assert not any(f" {n}" in i.split("(")[1] for i in ids for n in (2, 4))


def test_each_document_opens_with_the_bos_its_tokenizer_adds_as_perplexity_measures_it():
    """Llama and Gemma tokenizers add a BOS: continued pretraining trains each document from it, as the model was
    pretrained and as the forgetting check and `llmft eval` measure perplexity (blocks used to start without one)."""
    from datasets import Dataset
    from tokenizers import processors

    tokenizer = make_tokenizer("llama3")
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                                        special_tokens=[(bos, tokenizer.bos_token_id)])
    rows = Dataset.from_list([{"text": DOCS[0]}, {"text": bos + DOCS[1]}])  # the second names its BOS itself
    blocks, _ = text_blocks(rows, tokenizer, 512, "docs.jsonl")
    (stream,) = blocks["input_ids"]
    measured = [tokenizer(doc)["input_ids"] for doc in DOCS[:2]]  # what perplexity() feeds the model
    assert measured[0][0] == tokenizer.bos_token_id
    assert stream == measured[0] + [tokenizer.eos_token_id] + measured[1] + [tokenizer.eos_token_id]
    lengths = report(rows, tokenizer, 512, "drop", "docs.jsonl")["lengths"]
    assert sum(lengths) == len(stream)  # the data report counts the tokens training trains on


def test_text_files_and_jsonl_convert_and_report(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"doc{i}.txt").write_text(doc)
    (folder / "empty.txt").write_text("")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = tmp_path / "built"
    manifest = build(BuildConfig(sources=[Source(path=str(folder), format="text")], out=str(out),
                                         test_fraction=0.0, seed=0, on_error="skip"))
    assert manifest["kind"] == "text"
    rows = load_rows(str(out))
    assert sorted(rows["text"]) == sorted(DOCS)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = " ".join(r["reason"] for r in rejects)
    assert "empty document" in reasons and "not UTF-8" in reasons and len(rejects) == 2
    result = report(rows, make_tokenizer(), 16, "drop", str(out))
    assert result["documents"] == 4 and result["blocks"] == math.ceil(result["tokens"] / 16)
    assert "blocks of max_length (16)" in format_table(result)


def test_sft_refuses_raw_text_and_pretrain_refuses_conversations(tmp_path, tiny_model_dir):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in DOCS])
    with pytest.raises(DataError, match="holds raw text rows .* Set training.stage: pretrain"):
        train(load_recipe(write_recipe(tmp_path / "sft.yaml", tiny_model_dir, text, tmp_path / "sft")))
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(8))
    with pytest.raises(DataError, match="stage pretrain trains on raw text"):
        train(load_recipe(write_recipe(tmp_path / "pt.yaml", tiny_model_dir, chats, tmp_path / "pt",
                                       training={"stage": "pretrain"})))
    with pytest.raises(ConfigError, match="data.replay_data mixes conversations .* for training.stage: pretrain"):
        load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, chats, tmp_path / "r",
                                 data={"replay_data": str(chats)}))


def test_continued_pretraining_lowers_held_out_perplexity_with_replay(tmp_path, tiny_model_dir, capfd):
    docs = [{"text": f"{DOCS[i % 4]} Line {i} of the domain text repeats the domain words."} for i in range(40)]
    text = write_jsonl(tmp_path / "domain.jsonl", docs)
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(4))
    recipe = write_recipe(tmp_path / "pt.yaml", tiny_model_dir, text, tmp_path / "run",
                          data={"eval_fraction": 0.2, "replay_data": str(chats), "overlong": "truncate"},
                          eval={"forgetting_check": True},
                          training={"stage": "pretrain", "max_length": 64, "max_steps": 8, "learning_rate": 1e-2})
    out = train(load_recipe(recipe))
    run = read_run(out)
    assert run.info.stage == "pretrain"
    assert run.info.trainable_tensors["changed"] == run.info.trainable_tensors["total"] > 0
    tokenized = run.info.data["train"].tokenized
    # Every text token carries loss; the replayed conversations only on their answers: fewer trainable than tokens.
    assert 0 < tokenized["trainable_tokens"] < tokenized["tokens"]
    before, after = run.metrics.before, run.metrics.after
    assert after["eval_perplexity"] < before["eval_perplexity"]
    assert "eval_forgetting_ppl_ratio" in after  # the forgetting check on general text
    assert run.info.data["replay"].sha256  # the replayed conversations are recorded beside the text
    assert run.info.data["eval"].tokenized["rows_out"] == 8  # held-out text only: replay joins the training split
    assert "\nperplexity " in capfd.readouterr().out  # the summary's row
    assert_report(out, "eval_perplexity", "eval_forgetting_ppl_ratio", "train example length (tokens)")


@pytest.mark.slow
@pytest.mark.skipif(not C4.exists(), reason="../shared/data/llamafactory_demo/c4_demo.jsonl not present")
def test_c4_sample_converts_and_reports(tmp_path):
    out = tmp_path / "c4"
    build(BuildConfig(sources=[Source(path=str(C4))], out=str(out), test_fraction=0.1, seed=0, on_error="skip"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "text" and manifest["output"]["train"]["rows"] > 100
    from llmft.config import ModelConfig
    from llmft.model import load_tokenizer

    result = report(load_rows(str(out)), load_tokenizer(ModelConfig()), 1024, "drop", str(out))
    assert result["documents"] == manifest["output"]["train"]["rows"] and result["blocks"] > 0


def test_llmft_eval_reports_the_perplexity_of_a_pretrain_run(tmp_path, tiny_model_dir):
    from llmft.config import GenerationEval
    from llmft.evaluation import EvalOptions, evaluate_command

    docs = [{"text": f"{DOCS[i % 4]} Line {i}."} for i in range(20)]
    recipe = write_recipe(tmp_path / "pt.yaml", tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", docs),
                          tmp_path / "run", data={"eval_fraction": 0.2},
                          training={"stage": "pretrain", "max_length": 32, "max_steps": 4, "learning_rate": 1e-2})
    out = train(load_recipe(recipe))
    evaluate_command(EvalOptions(target=str(out), baseline="base"), GenerationEval(num_generate=4))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["results"]["eval_perplexity"] < results["baseline"]["eval_perplexity"]
    # The number training reported for the held-out blocks (training may compute in bf16 and averages per batch;
    # llmft eval loads fp32 and weights every token the same).
    assert results["results"]["eval_loss"] == pytest.approx(read_run(out).metrics.after["eval_loss"], rel=2e-2)
