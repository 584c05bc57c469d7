"""Text generation backends for self-chat: a local transformers model, or any OpenAI-compatible HTTP server.

Both answer the same calls, each taking a whole batch so work can run together:
  chat(conversations)       -> the assistant's next message for each conversation (the model's chat template applies)
  chat_n(conversations, n)  -> n sampled answers for each conversation (num_return_sequences, or the API's `n`)
  complete(prompts)         -> raw text continuations, cut at the first stop string
and count the tokens they generated (`generated_tokens`).
"""

from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llmft.errors import ConfigError, GenerationError

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """How text is sampled (self-chat and augmentation)."""

    max_new_tokens: int = field(default=256, metadata={"help": "Longest generated message, in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold."})


@dataclass
class BackendOptions:
    """Which model generates: a local one (--model), or an OpenAI-compatible server (--base-url, --api-model)."""

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Local model: Hub id, path or built-in name."})
    dtype: str = field(default="auto", metadata={"help": "Local model weights: auto | float32 | bfloat16."})
    batch_size: int = field(default=16, metadata={"help": "Local model: sequences generated together."})
    base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible server, e.g. http://localhost:8000/v1 (instead of --model)."})
    api_model: str | None = field(default=None, metadata={"help": "Model name on that server."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the API key."})
    concurrency: int = field(default=8, metadata={"help": "HTTP requests at once."})
    timeout: float = field(default=120.0, metadata={"help": "Seconds per HTTP request."})
    max_retries: int = field(default=5, metadata={"help": "Retries of a failed HTTP request."})

    def __post_init__(self):
        problems = []
        if self.base_url and not self.api_model:
            problems.append("--base-url needs --api-model (the model's name on that server).")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            problems.append(f"--dtype: '{self.dtype}' is not auto, float32 or bfloat16.")
        for name in ("batch_size", "concurrency"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}: must be >= 1.")
        if problems:
            raise ConfigError(problems, what="backend options")


def make_backend(options: BackendOptions):
    """An OpenAI-compatible HTTP backend (--base-url), or the local model."""
    if options.base_url:
        return OpenAIBackend(options.base_url, options.api_model, options.api_key_env, options.concurrency,
                             options.timeout, options.max_retries)
    from llmft.config import ModelConfig, PeftSettings
    from llmft.model import load_model, load_tokenizer, on_gpu_if_any

    model_cfg = ModelConfig(name_or_path=options.model, dtype=options.dtype)
    backend = LocalBackend(on_gpu_if_any(load_model(model_cfg, PeftSettings(method="full"))),
                           load_tokenizer(model_cfg), options.batch_size)
    backend.name = options.model
    return backend


class LocalBackend:
    """A transformers model on this machine: one padded batch per call, KV cache on."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.generated_tokens = 0
        self.name = str(getattr(model.config, "_name_or_path", "local model"))

    def complete(self, prompts: list[str], sampling: Sampling, stop: list[str] | None = None) -> list[str]:
        return self._generate(prompts, sampling, stop, add_special_tokens=True)

    def chat(self, conversations: list[list[dict]], sampling: Sampling, stop: list[str] | None = None) -> list[str]:
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        return self._generate(texts, sampling, stop, add_special_tokens=False)

    def chat_n(self, conversations: list[list[dict]], n: int, sampling: Sampling) -> list[list[str]]:
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        flat = self._generate(texts, sampling, None, add_special_tokens=False, n=n)
        return [flat[i * n: (i + 1) * n] for i in range(len(conversations))]

    def _generate(self, texts, sampling: Sampling, stop, add_special_tokens: bool, n: int = 1) -> list[str]:
        from llmft.model import generate_texts

        out = []
        per_batch = max(1, self.batch_size // n)  # batch_size counts sequences, n of them per text
        for start in range(0, len(texts), per_batch):
            answers, generated = generate_texts(
                self.model, self.tokenizer, texts[start : start + per_batch],
                max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                stop=stop, add_special_tokens=add_special_tokens, num_return_sequences=n)
            out += answers
            self.generated_tokens += generated
        return out


class OpenAIBackend:
    """An OpenAI-compatible server (vLLM, TGI, llama.cpp, OpenAI): /v1/chat/completions and /v1/completions.

    The API key is read from the environment variable `api_key_env` and sent only in the Authorization header:
    it is never logged, stored, or put in an error message. Up to `concurrency` requests run at once; 429, 5xx,
    timeouts and dropped connections are retried with exponential backoff (honouring Retry-After).
    """

    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 1.0):
        self.base_url, self.model, self.name = base_url.rstrip("/"), model, model
        self._api_key_env = api_key_env
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.generated_tokens = 0
        self.retries = 0

    def chat(self, conversations: list[list[dict]], sampling: Sampling, stop: list[str] | None = None) -> list[str]:
        payloads = [{"messages": c, **self._sampling(sampling, stop)} for c in conversations]
        return self._run("/chat/completions", payloads, lambda choice: choice["message"]["content"] or "")

    def chat_n(self, conversations: list[list[dict]], n: int, sampling: Sampling) -> list[list[str]]:
        payloads = [{"messages": c, "n": n, **self._sampling(sampling, None)} for c in conversations]
        results = self._results("/chat/completions", payloads)
        try:
            answers = [[(choice["message"]["content"] or "").strip() for choice in r["choices"]] for r in results]
        except (KeyError, TypeError, AttributeError) as err:
            raise GenerationError(f"{self.base_url}/chat/completions answered choices of another shape than OpenAI's "
                                  f"({err!r}): {str(results[0])[:200]}") from err
        short = [i for i, a in enumerate(answers) if len(a) != n]
        if short:
            raise GenerationError(f"{self.base_url} answered {len(answers[short[0]])} choices where n={n} were asked "
                                  "(the server may not support n): use a local --model, or n 1.")
        return answers

    def complete(self, prompts: list[str], sampling: Sampling, stop: list[str] | None = None) -> list[str]:
        payloads = [{"prompt": p, **self._sampling(sampling, stop)} for p in prompts]
        return self._run("/completions", payloads, lambda choice: choice["text"])

    def _sampling(self, sampling: Sampling, stop) -> dict:
        body = {"model": self.model, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                "top_p": sampling.top_p}
        if stop:
            body["stop"] = stop
        return body

    def _run(self, path: str, payloads: list[dict], pick) -> list[str]:
        results = self._results(path, payloads)
        try:
            return [(pick(result["choices"][0]) or "").strip() for result in results]
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise GenerationError(f"{self.base_url}{path} answered choices of another shape than OpenAI's ({err!r}): "
                                  f"{str(results[0])[:200]}") from err

    def _results(self, path: str, payloads: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(lambda body: self._post(path, body), payloads))
        for result in results:
            self.generated_tokens += int((result.get("usage") or {}).get("completion_tokens", 0))
            if not result.get("choices"):
                raise GenerationError(f"{self.base_url}{path} answered without choices: {str(result)[:200]}")
        return results

    def _post(self, path: str, body: dict) -> dict:
        import requests

        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self._api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}{path}"
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2**attempt * (0.5 + random.random() / 2)
            try:
                response = requests.post(url, json=body, headers=headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as err:
                problem = f"{type(err).__name__}"
            else:
                if response.status_code == 200:
                    try:
                        result = response.json()
                    except ValueError:  # a proxy's HTML page, a cut-short body
                        raise GenerationError(f"{url} answered 200 with something other than JSON: "
                                              f"{response.text[:200]!r}") from None
                    if not isinstance(result, dict):
                        raise GenerationError(f"{url} answered JSON that is not an object: {str(result)[:200]}")
                    return result
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in self.RETRY_STATUS:
                    raise GenerationError(f"{url} answered {problem}")
                wait = _retry_after(response.headers.get("Retry-After"), wait)
            if attempt < self.max_retries:
                self.retries += 1
                log.warning("%s: %s; retrying in %.1f s (%d/%d)", url, problem, wait, attempt + 1, self.max_retries)
                time.sleep(wait)
        raise GenerationError(f"{url} failed after {self.max_retries} retries: {problem}")


def _retry_after(header: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header: a number of seconds, or an HTTP date (RFC 9110)."""
    if not header:
        return default
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(header).timestamp() - time.time())
    except (TypeError, ValueError):
        return default
