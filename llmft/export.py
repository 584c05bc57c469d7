"""`llmft export RUN --format gguf [--quant q8_0]`: a run as one GGUF file for llama.cpp and Ollama.

A LoRA run is merged into its base first (llmft.merge, shard by shard). The conversion is llama.cpp's own
`convert_hf_to_gguf.py` with its `gguf-py`, as shipped in the pinned source distribution of llama-cpp-python
(fetched from PyPI once, checked against its sha256, into llmft's cache: `make setup` does it); the converter
writes the chat template and the end-of-turn token into the file's metadata. Its own types (f32, f16, bf16, q8_0)
come straight from it; llama.cpp's k-quants (q4_k_m, q5_k_m, q6_k, ...) are made from the f16 file by llama.cpp's
quantizer through llama-cpp-python. An Ollama `Modelfile` is written beside the file: FROM, the chat template as
an Ollama template, the stop token and parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from llmft.errors import ConfigError, HubError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
K_QUANTS = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15,
            "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}  # llama.cpp's llama_ftype numbers


@dataclass
class ExportOptions:
    run: str | None = field(default=None, metadata={"positional": True, "help": "A run directory."})
    format: str = field(default="gguf", metadata={"help": "gguf (llama.cpp, Ollama)."})
    quant: str = field(default="q8_0", metadata={"help": f"{', '.join(CONVERTER_TYPES + tuple(K_QUANTS))}."})
    out: str | None = field(default=None, metadata={"help": "Output folder (default: RUN/gguf)."})
    fetch_converter: bool = field(default=False, metadata={"help": "Only fetch llama.cpp's converter into the cache "
                                                                   "(make setup runs this once)."})

    def __post_init__(self):
        problems = []
        if self.format != "gguf":
            problems.append(f"--format {self.format}: only gguf.")
        if self.quant not in CONVERTER_TYPES and self.quant not in K_QUANTS:
            problems.append(f"--quant {self.quant}: one of {', '.join(CONVERTER_TYPES + tuple(K_QUANTS))}.")
        if not self.run and not self.fetch_converter:
            problems.append("give a run directory (or --fetch-converter true).")
        if problems:
            raise ConfigError(problems, what="the options of llmft export")


def export_command(options: ExportOptions) -> None:
    if options.fetch_converter:
        print(f"llama.cpp converter: {converter_dir()}")
        return
    out = Path(options.out) if options.out else Path(options.run) / "gguf"
    path = export_gguf(Path(options.run), out, options.quant)
    print(f"GGUF: {path}\nOllama: ollama create NAME -f {out / 'Modelfile'}")


def export_gguf(run_path: Path, out: Path, quant: str = "q8_0") -> Path:
    from llmft.run_dir import read_run

    run = read_run(run_path)
    out.mkdir(parents=True, exist_ok=True)
    name = run_path.name
    with tempfile.TemporaryDirectory(prefix="llmft-export-") as tmp:
        model = run_path
        if run.is_adapter:
            from llmft.merge import merge

            model = merge(run_path, Path(tmp) / "merged")
        first = quant if quant in CONVERTER_TYPES else "f16"
        # a k-quant's f16 step goes in the temporary folder: an f16 export the user made earlier stays
        converted = (out if quant in CONVERTER_TYPES else Path(tmp)) / f"{name}-{first}.gguf"
        convert(model, converted, first)
        target = converted
        if quant in K_QUANTS:
            target = out / f"{name}-{quant}.gguf"
            quantize(converted, target, quant)
    write_modelfile(target, run_path)
    return target


# llama.cpp's converter ----------------------------------------------------------------------------------------


def converter_dir() -> Path:
    """llama.cpp's converter from the pinned llama-cpp-python source distribution, fetched once into the cache."""
    from llmft.model import cache_dir

    target = cache_dir() / f"llama.cpp-converter-{LLAMA_CPP_PYTHON}"
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="llmft-llama.cpp-") as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                 "--quiet", "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
                                capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise HubError(f"cannot fetch llama.cpp's converter (llama-cpp-python=={LLAMA_CPP_PYTHON} from PyPI): "
                           f"{result.stderr.strip()[-500:]}. Run `make setup` (or llmft export --fetch-converter "
                           "true) where PyPI is reachable.")
        digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise HubError(f"llama-cpp-python {LLAMA_CPP_PYTHON}'s source has sha256 {digest}, not the pinned "
                           f"{SDIST_SHA256}: not using it.")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(CONVERTER_FILES) and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(partial, members=members, filter="data")
        partial.replace(target)
    return target


def convert(model: Path, target: Path, outtype: str) -> None:
    """A Hugging Face model folder to GGUF with llama.cpp's converter, in a child process."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    result = subprocess.run([sys.executable, str(script), str(model), "--outfile", str(target), "--outtype", outtype],
                            capture_output=True, text=True)
    if result.returncode != 0 or not target.exists():
        raise HubError(f"llama.cpp's converter failed on {model}: {result.stderr.strip()[-1500:]}")
    log.info("Converted %s to %s (%s)", model, target, outtype)


def quantize(source: Path, target: Path, quant: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize) through llama-cpp-python, in a child process: llama.cpp's
    threads and PyTorch's OpenMP runtime do not share a process safely."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise HubError(f"--quant {quant} needs llama.cpp's quantizer: pip install 'llmft[gguf]' (builds "
                       f"llama-cpp-python), or export --quant q8_0 / f16, which need no build.")
    result = subprocess.run([sys.executable, "-c", QUANTIZE, str(source), str(target), str(K_QUANTS[quant])],
                            capture_output=True, text=True)
    if result.returncode != 0 or not target.exists():
        raise HubError(f"llama.cpp could not quantize {source} to {quant}: {result.stderr.strip()[-800:]}")


QUANTIZE = """
import ctypes, sys
import llama_cpp
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


# Ollama -----------------------------------------------------------------------------------------------------------


def write_modelfile(gguf: Path, run_path: Path) -> Path:
    """An Ollama Modelfile beside the GGUF: the run's chat template as an Ollama (Go) template, its stop token."""
    from llmft.config import ModelConfig
    from llmft.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(run_path)))
    lines = [f"FROM ./{gguf.name}", "", f'TEMPLATE """{ollama_template(tokenizer)}"""', "",
             f"PARAMETER stop {json.dumps(tokenizer.eos_token)}", "PARAMETER temperature 0.7", "PARAMETER top_p 0.9"]
    path = gguf.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


SENTINEL = {"system": "\x00S\x00", "user": "\x00U1\x00", "assistant": "\x00A1\x00", "user2": "\x00U2\x00",
            "assistant2": "\x00A2\x00"}


def template_pieces(tokenizer) -> dict[str, str]:
    """The text the chat template puts around each role's content, found by rendering it around sentinels:
    system_prefix SYSTEM system_end, then per turn user_prefix USER user_to_assistant ANSWER assistant_suffix."""
    s = SENTINEL
    turns = [{"role": "system", "content": s["system"]}, {"role": "user", "content": s["user"]},
             {"role": "assistant", "content": s["assistant"]}, {"role": "user", "content": s["user2"]},
             {"role": "assistant", "content": s["assistant2"]}]
    try:
        full = _without_bos(tokenizer, tokenizer.apply_chat_template(turns, tokenize=False))
        prompt = _without_bos(tokenizer, tokenizer.apply_chat_template(turns[:2], tokenize=False,
                                                                        add_generation_prompt=True))
    except Exception as err:  # jinja2's TemplateError and what templates raise themselves ("System role not ...")
        raise HubError(f"the chat template refuses a system, user, assistant conversation ({err}); write the "
                       "Modelfile's TEMPLATE by hand.") from err
    if any(value not in full for value in s.values()) or s["user"] not in prompt:
        raise HubError("the chat template drops messages (e.g. the system prompt), so no Ollama template can be "
                       "derived from it; write the Modelfile's TEMPLATE by hand.")

    def between(a: str, b: str) -> str:
        return full[full.index(s[a]) + len(s[a]): full.index(s[b])]

    after_first_answer = between("assistant", "user2")
    last_suffix = full[full.index(s["assistant2"]) + len(s["assistant2"]):]
    assistant_suffix = _common_head(after_first_answer, last_suffix) or last_suffix
    user_prefix = after_first_answer[len(assistant_suffix):]
    system_to_user = between("system", "user")
    if not system_to_user.endswith(user_prefix):
        raise HubError("the chat template renders the first user turn unlike the others; write the Modelfile's "
                       "TEMPLATE by hand.")
    pieces = {"system_prefix": full[: full.index(s["system"])],
              "system_end": system_to_user[: len(system_to_user) - len(user_prefix)],
              "user_prefix": user_prefix,
              "user_to_assistant": prompt[prompt.index(s["user"]) + len(s["user"]):],
              "assistant_suffix": assistant_suffix}
    # What the template writes when there is no system message (SmolLM2's default system prompt; nothing for most)
    plain = _without_bos(tokenizer, tokenizer.apply_chat_template(turns[1:2], tokenize=False,
                                                                   add_generation_prompt=True))
    first_turn = user_prefix + s["user"] + pieces["user_to_assistant"]
    if not plain.endswith(first_turn):
        raise HubError("the chat template renders a conversation without a system prompt unlike one with it; write "
                       "the Modelfile's TEMPLATE by hand.")
    pieces["default_system"] = plain[: len(plain) - len(first_turn)]
    check = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2 plus 2?"}]
    if any(render_pieces(pieces, c) != _without_bos(tokenizer, tokenizer.apply_chat_template(
            c, tokenize=False, add_generation_prompt=True)) for c in (check, check[1:])):
        raise HubError("the chat template renders some turns unlike the others (reasoning blocks, dates, turn "
                       "numbers), which one pattern per role cannot express; write the Modelfile's TEMPLATE by hand.")
    return pieces


def render_pieces(pieces: dict[str, str], messages: list[dict[str, str]]) -> str:
    """What the Ollama template renders for `messages` with the generation prompt (BOS left to llama.cpp)."""
    out = [] if messages and messages[0]["role"] == "system" else [pieces["default_system"]]
    for m in messages:
        if m["role"] == "system":
            out.append(pieces["system_prefix"] + m["content"] + pieces["system_end"])
        elif m["role"] == "user":
            out.append(pieces["user_prefix"] + m["content"] + pieces["user_to_assistant"])
        else:
            out.append(m["content"] + pieces["assistant_suffix"])
    return "".join(out)


def _without_bos(tokenizer, text: str) -> str:
    """A template's leading BOS left out where the tokenizer adds it to every text itself, as llama.cpp then does (the
    GGUF's add_bos_token). Where it does not (SmolLM2's BOS is <|im_start|>, which its template writes), it stays."""
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def ollama_template(tokenizer) -> str:
    """The run's chat template as an Ollama (Go) template over .System and .Messages."""
    p = template_pieces(tokenizer)
    return ("{{- if .System }}" + p["system_prefix"] + "{{ .System }}" + p["system_end"]
            + ("{{- else }}" + p["default_system"] if p["default_system"] else "") + "{{ end }}"
            "{{- range .Messages }}"  # Ollama passes the system prompt as .System
            "{{- if eq .Role \"user\" }}" + p["user_prefix"] + "{{ .Content }}" + p["user_to_assistant"]
            + "{{- else if eq .Role \"assistant\" }}{{ .Content }}" + p["assistant_suffix"]
            + "{{- end }}{{- end }}")


def _common_head(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
