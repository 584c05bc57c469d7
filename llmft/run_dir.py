"""What a run directory holds, written and read in one place.

run_dir/
  adapter_model.safetensors + adapter_config.json   (LoRA)  or  model*.safetensors + config.json  (full)
  tokenizer files + chat_template.jinja               the exact tokenizer and template used in training
  recipe.yaml          the resolved recipe: every value, as training saw it
  run.json             llmft/library versions, git SHA, hardware, data fingerprints and prep counts, timings
  metrics.json         train and eval metrics (and the before/after generation eval when configured)
  trainer_state.json   the Trainer's log history
  eval_samples.jsonl   side-by-side answers, when the generation eval ran
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from llmft.config import Recipe

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "eval_samples.jsonl"
LIBRARIES = ("llmft", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed")
# Files a complete run directory has, whatever the method.
REQUIRED = (RECIPE_FILE, RUN_FILE, METRICS_FILE, "trainer_state.json", "tokenizer_config.json")


class RunDirError(RuntimeError):
    """A run directory that is missing files, or one that would be overwritten."""


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def git_sha(cwd: Path | None = None) -> str | None:
    """The commit of the code that ran (with '-dirty' if it had uncommitted changes), or None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.strip() + ("-dirty" if dirty.strip() else "")


def hardware() -> dict[str, Any]:
    """The machine, and this process's peak memory so far."""
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "peak_rss_mb": _peak_rss_mb()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return info


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return round(kilobytes / 1024)


def template_hash(template: str | None) -> str | None:
    import hashlib

    return hashlib.sha256(template.encode()).hexdigest() if template else None


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse to write over a finished run unless asked to: runs are evidence and should not vanish."""
    if (out / RUN_FILE).exists() and not overwrite:
        raise RunDirError(
            f"{out} already holds a finished run. Choose another --output_dir, or pass --overwrite_output_dir true."
        )


def write_metadata(out: Path, recipe: Recipe, run_info: dict[str, Any], metrics: dict[str, Any],
                   resolved: dict[str, Any] | None = None) -> None:
    """recipe.yaml (`resolved`: the recipe as parsed, before training derived the batch arithmetic from it, so
    rerunning it derives the same again), run.json and metrics.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(
        f"# Resolved recipe of this run (from {recipe.source}); retrain with: llmft train {out / RECIPE_FILE}\n"
        + yaml.safe_dump(resolved or recipe.to_dict(), sort_keys=False)
    )
    info = {"versions": library_versions(), "git_sha": git_sha(Path(__file__).parent), "hardware": hardware(),
            **run_info}
    (out / RUN_FILE).write_text(json.dumps(info, indent=2, default=str))
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))


def write_samples(out: Path, samples: list[dict[str, Any]]) -> None:
    with (out / SAMPLES_FILE).open("w") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")


def missing_files(out: Path) -> list[str]:
    """Required files absent from a run directory (the weights count as one, in either form)."""
    missing = [name for name in REQUIRED if not (out / name).exists()]
    has_adapter = (out / "adapter_model.safetensors").exists()
    has_model = any(out.glob("model*.safetensors"))
    if not (has_adapter or has_model):
        missing.append("adapter_model.safetensors or model.safetensors")
    return missing


def read_run(out: Path) -> dict[str, Any]:
    """The run's metadata, recipe and metrics; raises naming the missing files."""
    missing = missing_files(out)
    if missing:
        raise RunDirError(f"{out} is not a complete run directory; missing: {', '.join(missing)}. "
                          "Train one with: llmft train RECIPE")
    return {
        "run": json.loads((out / RUN_FILE).read_text()),
        "recipe": yaml.safe_load((out / RECIPE_FILE).read_text()),
        "metrics": json.loads((out / METRICS_FILE).read_text()),
    }
