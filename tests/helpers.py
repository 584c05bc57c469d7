"""Tiny models and tokenizers built in-process, and chat templates written out here, for fast tests."""

from __future__ import annotations

import base64
import http.server
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, MixtralForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Chat templates in the shapes of real model families (simplified to messages without tools).
TEMPLATES = {
    # SmolLM2 / ChatML: a default system prompt is injected when none is given.
    "chatml": {
        "template": (
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
            "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
        "eos": "<|im_end|>", "bos": None, "end_of_turn": "<|im_end|>",
    },
    # Llama 3: header tokens around the role, <|eot_id|> ends each turn, BOS in the template.
    "llama3": {
        "template": (
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
        ),
        "eos": "<|eot_id|>", "bos": "<|begin_of_text|>", "end_of_turn": "<|eot_id|>",
    },
    # Mistral v0.1: [INST] ... [/INST] in plain text, the answer closed by </s>; no system role, no generation prompt.
    "mistral": {
        "template": (
            "{{ bos_token }}{% for message in messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% endif %}{% endfor %}"
        ),
        "eos": "</s>", "bos": "<s>", "end_of_turn": "</s>",
    },
    # Qwen 2.5: ChatML with its own default system prompt and whitespace control.
    "qwen": {
        "template": (
            "{%- if messages[0]['role'] == 'system' %}"
            "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
            "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
            "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
            "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
        ),
        "eos": "<|im_end|>", "bos": None, "end_of_turn": "<|im_end|>",
    },
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
    "Write this date in ISO 8601 format: March 5, 2021. 2021-03-05 user assistant system tool",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. You are Qwen, created by Alibaba Cloud.",
    "[INST] hello [/INST] Hi there! How can I help you today? 0123456789 abcdefghijklmnopqrstuvwxyz",
]


def make_tokenizer(style: str = "chatml") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with `style`'s chat template and special tokens."""
    spec = TEMPLATES[style]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=spec["eos"], bos_token=spec["bos"],
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = spec["template"]
    return tokenizer


def make_tiny_model_dir(path: Path, style: str = "chatml", layers: int = 2, intermediate: int = 64) -> Path:
    """A small random Llama (2 layers unless asked) and its tokenizer saved as a normal model directory."""
    return model_dir_for(make_tokenizer(style), path, layers, intermediate, positions=256)


def model_dir_for(tokenizer, path: Path, layers: int = 1, intermediate: int = 64, positions: int = 4096) -> Path:
    """A small random Llama sized to `tokenizer`, saved with it as a normal model directory."""
    return _saved(LlamaForCausalLM, path, tokenizer, intermediate_size=intermediate, num_hidden_layers=layers,
                  max_position_embeddings=positions, tie_word_embeddings=True)


def make_tiny_mixtral_dir(path: Path, router_aux_loss_coef: float = 0.02) -> Path:
    """A small random Mixtral (2 layers, 4 experts, top 2) returning its router logits, so that TRL adds the
    load-balancing loss, with the chatml tokenizer, saved as a normal model directory."""
    return _saved(MixtralForCausalLM, path, make_tokenizer("chatml"), intermediate_size=64, num_hidden_layers=2,
                  num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                  output_router_logits=True, router_aux_loss_coef=router_aux_loss_coef)


def _saved(model_class, path: Path, tokenizer, **config) -> Path:
    """A random model of `model_class` (hidden size 32, 4 heads, 2 key/value heads, seed 0) sized to `tokenizer`,
    saved with it."""
    config = model_class.config_class(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                                      bos_token_id=tokenizer.bos_token_id, **config)
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A metric script of the `evaluate` library, written here so that `evaluate:PATH` is tested offline.
FIRST_CHAR_METRIC = '''"""Share of predictions whose first character is the reference's."""

import datasets
import evaluate


class FirstChar(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        hits = [p[:1] == r[:1] for p, r in zip(predictions, references)]
        return {"first_char": sum(hits) / len(hits), "count": len(hits)}
'''


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    """Small two-turn conversations with short, regular answers a tiny model can start to learn."""
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": f"What is {i} plus 1?"},
            {"role": "assistant", "content": f"{i + 1}"},
            {"role": "user", "content": "And the capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]})
    return rows


def pair_rows(n: int) -> list[dict]:
    """Preference pairs in llmft's schema: the right sum chosen, a wrong one rejected."""
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
             "chosen": [{"role": "assistant", "content": f"{i + 1}"}],
             "rejected": [{"role": "assistant", "content": f"{i + 7}"}]} for i in range(n)]


def write_recipe(path: Path, model_dir: Path | str, train: Path, out: Path, **sections) -> Path:
    """A small recipe for tests: a few steps, tiny batches, no checkpoints."""
    import yaml

    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_data": str(train), "eval_fraction": 0.2},
        "peft": {"method": "lora", "r": 4, "lora_alpha": 8},
        "training": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 2,
                     "per_device_eval_batch_size": 2, "max_length": 128, "logging_steps": 1,
                     "learning_rate": 1e-2, "dataloader_num_workers": 0},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


def send_json(handler, body: dict) -> None:
    """Answer an HTTP request with a 200 JSON body (for the stand-in OpenAI-compatible servers of the tests)."""
    payload = json.dumps(body).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Stands in for the Hugging Face Hub API on 127.0.0.1: create repo, preupload, commit (files inline)."""

    requests: list = []
    files: dict = {}
    auth: set = set()
    created: list = []  # the create-repo requests' bodies (name, private...)

    def _reply(self, code: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        FakeHub.requests.append(("POST", self.path))
        FakeHub.auth.add(self.headers.get("Authorization"))
        if self.path == "/api/repos/create":
            spec = json.loads(raw)
            FakeHub.created.append(spec)
            return self._reply(200, {"url": f"http://{self.headers['Host']}/{spec.get('organization')}/{spec['name']}"})
        if "/preupload/" in self.path:
            files = json.loads(raw)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in self.path:
            for line in raw.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    FakeHub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/org/tiny/commit/abc123",
                                     "commitOid": "abc123"})
        if self.path == "/api/validate-yaml":
            return self._reply(200, {})
        return self._reply(404, {"error": f"not in the stand-in: {self.path}"})

    def do_GET(self):
        FakeHub.requests.append(("GET", self.path))
        return self._reply(404, {"error": f"not in the stand-in: {self.path}"})

    def log_message(self, *args):
        pass


def assert_report(out: Path, *expected: str) -> str:
    """The run's report.html exists and holds `expected`; drawn again here so a failure shows its traceback (after
    training, a page that cannot be drawn is only a warning)."""
    from llmft.report import render
    from llmft.run_dir import read_run

    page = (out / "report.html").read_text()
    assert render([read_run(out)]).count("class='chart'") == page.count("class='chart'")
    missing = [text for text in expected if text not in page]
    assert not missing, f"report.html lacks {missing}"
    return page
