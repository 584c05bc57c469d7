"""The run directory: the contract between training and every later stage, written and read here only.

A later stage (eval, check, merge, push, compare) needs nothing but the directory: it may have moved to another
machine and the training data may be gone.

run_dir/
  adapter_model.safetensors + adapter_config.json   (LoRA)  or  model*.safetensors + config.json  (full)
  tokenizer files + chat_template.jinja               the exact tokenizer and template used in training
  recipe.yaml             the recipe as parsed, every value; `llmft train RUN/recipe.yaml --overwrite_output_dir
                          true` reruns it
  run.json                RunInfo: stage, base model, data fingerprints and tokenisation counts, the values derived
                          at launch (batch arithmetic), versions, git SHA, hardware, timings
  metrics.json            Metrics: the Trainer's metrics of the evaluations before and after training, and of training
  data/eval/              the held-out rows evaluated in training (a `save_to_disk` dataset; sha256 in run.json)
  data/few_shot/          the training rows shown as worked examples, when eval.few_shot > 0
  metrics/                copies of local `evaluate:` metric scripts named in eval.metrics
  eval_samples.jsonl      per held-out prompt: reference, answer after training, baseline_answer before it
  eval_samples/step-N.jsonl   the answers at each evaluation during training
  trainer_state.json      the Trainer's log history (with checkpoint events);  loss_curve.png  train and eval loss
  report.html             the run's page (llmft report): written after training, refreshed by llmft eval
  data/manifest.json      the build manifest of the training data (sources, counts, drops), when it had one
  eval_results.json + eval_report.md                 written by `llmft eval`
Metric names follow the Trainer everywhere: eval_loss, eval_exact_match, eval_rouge_l, eval_general_ppl, ...
Samples have one shape everywhere: prompt, reference, answer, exact_match, and baseline_answer /
baseline_exact_match when a baseline was evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from llmft.errors import RunDirError
from llmft.schema import file_fingerprint

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # llmft.config imports TRL (seconds): a missing or half-written run is reported before that
    from llmft.config import Recipe

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
STATE_FILE = "trainer_state.json"
SAMPLES_FILE = "eval_samples.jsonl"
SAMPLES_DIR = "eval_samples"
EVAL_RESULTS_FILE = "eval_results.json"
EVAL_REPORT_FILE = "eval_report.md"
LOSS_CURVE_FILE = "loss_curve.png"
REWARD_CURVE_FILE = "reward_curve.png"  # RL runs: each reward's mean by step
REPORT_FILE = "report.html"  # llmft report: curves, metrics, samples, data, speed, recipe in one page
MANIFEST_COPY = "data/manifest.json"  # the training data's build manifest, when it came from llmft data convert|build
EVAL_SPLIT = "data/eval"
FEW_SHOT_SPLIT = "data/few_shot"
METRIC_SCRIPTS = "metrics"  # copies of the local `evaluate:` metric scripts the run was evaluated with
LIBRARIES = ("llmft", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed",
             "torch-optimi")
# Files a complete run directory has, whatever the method.
REQUIRED = (RECIPE_FILE, RUN_FILE, METRICS_FILE, STATE_FILE, "tokenizer_config.json")
LOWER_IS_BETTER = ("eval_loss", "eval_general_ppl", "eval_forgetting_ppl_ratio", "eval_perplexity")


# What run.json and metrics.json hold ----------------------------------------------------------------------------


@dataclass
class BaseModelRecord:
    """The model training started from: as the recipe named it, and the path it was loaded from."""

    name_or_path: str
    revision: str | None = None
    resolved: str | None = None
    init: str = "pretrained"


@dataclass
class DataRecord:
    """A data file as training read it (sha256 of its bytes) and what tokenisation kept. For the eval split,
    `saved` is the copy of the held-out rows inside the run directory, with its own sha256."""

    path: str
    sha256: str
    bytes: int
    files: int
    tokenized: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    saved: str | None = None
    saved_sha256: str | None = None


@dataclass(frozen=True)
class Launch:
    """Values derived at launch from the recipe and the process count; the recipe itself is never changed."""

    world_size: int
    per_device_train_batch_size: int  # as the Trainer runs it (1 with CPU micro-batches)
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int  # as the Trainer runs it
    global_batch_size: int  # examples per optimizer step over all processes
    cpu_micro_batches: bool  # each device batch of the recipe runs one example at a time


@dataclass
class RunInfo:
    """run.json."""

    stage: str
    base_model: BaseModelRecord
    data: dict[str, DataRecord | None]
    launch: Launch
    chat_template_sha256: str | None
    end_of_turn_token: str | None
    masking: dict[str, Any] = field(default_factory=dict)  # llmft.masking.Masking.record(): how the loss was masked
    trainable_parameters: int = 0
    total_parameters: int = 0
    trainable_tensors: dict[str, Any] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    param_groups: list[dict[str, Any]] | None = None
    resumed_from: str | None = None
    skipped_nonfinite_steps: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    versions: dict[str, str | None] = field(default_factory=dict)
    git_sha: str | None = None
    hardware: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["base_model"] = BaseModelRecord(**raw["base_model"])
        values["data"] = {k: DataRecord(**v) if v else None for k, v in raw["data"].items()}
        values["launch"] = Launch(**raw["launch"])
        return cls(**values)


@dataclass
class Metrics:
    """metrics.json: the Trainer's metrics of training and of the evaluations before and after it."""

    train: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


# Reading a run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A finished run directory, typed: the recipe as its dataclasses, run.json, metrics.json."""

    path: Path
    recipe: Recipe
    info: RunInfo
    metrics: Metrics

    @property
    def is_adapter(self) -> bool:
        return (self.path / "adapter_config.json").exists()

    def eval_rows(self):
        """The held-out rows evaluated in training (None when the run held out none)."""
        record = self.info.data.get("eval")
        if record is None or not record.saved:
            return None
        return self._rows(record.saved, record.saved_sha256)

    def few_shot_rows(self):
        """The training rows shown as worked examples (None without eval.few_shot)."""
        record = self.info.data.get("few_shot")
        return self._rows(record.saved, record.saved_sha256) if record and record.saved else None

    def metric(self, name: str) -> str:
        """An eval.metrics entry as usable from this run directory: a local `evaluate:` script that is not where
        the recipe says, but whose copy the run holds, points at the copy."""
        script = Path(name[len("evaluate:"):]) if name.startswith("evaluate:") else None
        copy = self.path / METRIC_SCRIPTS / script.name if script else None
        return f"evaluate:{copy}" if copy and not script.exists() and copy.exists() else name

    def _rows(self, relative: str, sha256: str | None = None):
        import datasets

        folder = self.path / relative
        if not folder.is_dir():
            raise RunDirError(f"{self.path}: {relative}/ is missing (the rows evaluated in training). Copy the whole "
                              "run directory, or pass --data FILE.")
        if sha256 and _split_sha256(folder) != sha256:
            raise RunDirError(f"{folder} changed since training (its sha256 differs from run.json's); restore it, or "
                              "pass --data FILE to evaluate on other rows.")
        return datasets.load_from_disk(str(folder), keep_in_memory=True)

    def eval_results(self) -> dict[str, Any] | None:
        path = self.path / EVAL_RESULTS_FILE
        return read_json(path) if path.exists() else None


def missing_files(out: Path) -> list[str]:
    """Required files absent from a run directory (the weights count as one, in either form)."""
    missing = [name for name in REQUIRED if not (out / name).exists()]
    if not ((out / "adapter_model.safetensors").exists() or any(out.glob("model*.safetensors"))):
        missing.append("adapter_model.safetensors or model.safetensors")
    return missing


def is_run(path: Path) -> bool:
    return (path / RUN_FILE).exists()


def read_run(out: Path) -> Run:
    """The run in `out`; raises naming the missing files and how to make a run."""
    out = Path(out)
    missing = missing_files(out)
    if missing:
        raise RunDirError(f"{out} is not a complete run directory; missing: {', '.join(missing)}. "
                          "Train one with: llmft train RECIPE")
    raw_info, raw_metrics = read_json(out / RUN_FILE), read_json(out / METRICS_FILE)
    for name in (STATE_FILE, "adapter_config.json", EVAL_RESULTS_FILE):  # read later by the stages that need them
        if (out / name).exists():
            read_json(out / name)
    for weights in [out / "adapter_model.safetensors", *out.glob("model*.safetensors")]:
        if weights.exists():
            _check_safetensors(weights)
    try:
        info = RunInfo.from_dict(raw_info)
        metrics = Metrics(**raw_metrics)
    except (KeyError, TypeError, AttributeError) as err:
        raise RunDirError(f"{out}: run.json or metrics.json is not what this llmft writes ({err!r}); the run may "
                          "come from an older llmft: retrain it with llmft train RUN/recipe.yaml --output_dir NEW_DIR.") from err
    from llmft.config import read_recipe_file

    return Run(out, read_recipe_file(out / RECIPE_FILE), info, metrics)


DAMAGED = "the file is damaged or cut short (a copy that did not finish?): copy the run directory again"


def read_json(path: Path) -> Any:
    """A JSON file of a run directory; one that cannot be read is a RunDirError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: not readable JSON ({err}); {DAMAGED}.") from err


def read_jsonl(path: Path) -> list[Any]:
    """The rows of a JSON-lines file of a run directory; a line that cannot be read is a RunDirError naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise RunDirError(f"{path}: not UTF-8 text ({err}); {DAMAGED}.") from err
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RunDirError(f"{path}, line {number}: not readable JSON ({err}); {DAMAGED}.") from err
    return rows


def _check_safetensors(path: Path) -> None:
    """The file holds the whole of what its header describes (safetensors' layout: an 8-byte little-endian header
    length, a JSON header of tensor offsets, then the data): a cut-short copy is found here, by name, rather than as
    a deserialising error in whichever stage loads it first."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 8 + length <= size else None
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, UnicodeDecodeError):
        header = None
    if header is None or 8 + length + end != size:
        raise RunDirError(f"{path}: not a whole safetensors file ({size:,} bytes); {DAMAGED}.")


# Writing a run -------------------------------------------------------------------------------------------------


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse to write over a finished run unless asked to (runs are evidence and should not vanish), and find out
    now, not after loading data and model, if the folder cannot be made."""
    if (out / RUN_FILE).exists() and not overwrite:
        raise RunDirError(
            f"{out} already holds a finished run. Choose another --output_dir, or pass --overwrite_output_dir true."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder should be, no permission, read-only disk
        raise RunDirError(f"cannot make the output folder {out}: {err.strerror or err}. Choose another "
                          "--output_dir.") from err


def clear_finished_run(out: Path) -> None:
    """Overwriting a finished run removes everything it holds first: a file the new run does not write (a LoRA
    adapter where a full fine-tune follows, an earlier eval_results.json) would otherwise be read as the new run's."""
    import shutil

    if not (out / RUN_FILE).exists():
        return
    for entry in out.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    log.info("Overwriting the finished run in %s: its files were removed.", out)


def save_rows(out: Path, relative: str, rows) -> tuple[str, str]:
    """Rows saved inside the run directory (without the tokenizer's columns); (relative path, sha256)."""
    import shutil

    target = out / relative
    if target.exists():
        shutil.rmtree(target)
    rows.save_to_disk(str(target))
    return relative, _split_sha256(target)


def _split_sha256(folder: Path) -> str:
    """sha256 of a saved split; the cache files `datasets` may add beside it later (cache-*.arrow) do not count."""
    return file_fingerprint(folder, skip="cache-")["sha256"]


def write_run(out: Path, recipe: Recipe, info: RunInfo, metrics: Metrics) -> None:
    """recipe.yaml (as parsed: rerunning it derives the same launch values again), run.json and metrics.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(
        f"# Recipe of this run (from {recipe.source}); retrain with: llmft train {out / RECIPE_FILE} "
        "--overwrite_output_dir true (or another --output_dir)\n"
        + yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    )
    info = dataclasses.replace(info, versions=library_versions(), git_sha=git_sha(Path(__file__).parent),
                               hardware=hardware())
    (out / RUN_FILE).write_text(json.dumps(dataclasses.asdict(info), indent=2, default=str))
    (out / METRICS_FILE).write_text(json.dumps(dataclasses.asdict(metrics), indent=2))


def save_manifest(out: Path, source: str) -> None:
    """A copy of the training data's build manifest (a folder llmft data convert|build wrote, or its train/)."""
    import shutil

    path = Path(source)
    for folder in (path, path.parent):
        manifest = folder / "manifest.json"
        if manifest.is_file() and path.is_dir() and _is_build_manifest(manifest):
            (out / MANIFEST_COPY).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(manifest, out / MANIFEST_COPY)
            return


def _is_build_manifest(path: Path) -> bool:
    """Only llmft's own manifests (a dict with its sources listed): another tool's manifest.json stays behind."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("sources"), list) and all(
        isinstance(s, dict) for s in raw["sources"])


def save_metric_scripts(out: Path, metrics: list[str]) -> None:
    """Copies of the local `evaluate:` metric scripts (a Hub id is not a file, and stays a name)."""
    import shutil

    for name in metrics:
        script = Path(name[len("evaluate:"):]) if name.startswith("evaluate:") else None
        if script and script.is_file():
            (out / METRIC_SCRIPTS).mkdir(parents=True, exist_ok=True)
            shutil.copy2(script, out / METRIC_SCRIPTS / script.name)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_eval_results(out: Path, results: dict[str, Any], report: str) -> tuple[Path, Path]:
    """eval_results.json and eval_report.md (into a run directory, or any folder for a bare model)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / EVAL_REPORT_FILE).write_text(report)
    return out / EVAL_RESULTS_FILE, out / EVAL_REPORT_FILE


def metrics_table(results: dict[str, float], baseline: dict[str, float] | None = None,
                  name: str = "model", baseline_name: str = "baseline") -> list[str]:
    """A Markdown table of eval_* metrics, side by side with a baseline and deltas when there is one."""
    keys = sorted((k for k in results if k.startswith("eval_") and isinstance(results[k], (int, float))),
                  key=lambda k: (k != "eval_loss", k.startswith("eval_lm_eval/"), k))
    if baseline is None:
        return ["| metric | value |", "|---|---|"] + [f"| {k} | {results[k]:.4f} |" for k in keys]
    lines = [f"| metric | {baseline_name} | {name} | delta |", "|---|---|---|---|"]
    for k in keys:
        base = baseline.get(k)
        cells = (f"{base:.4f}", f"{results[k] - base:+.4f}") if isinstance(base, (int, float)) else ("-", "-")
        lines.append(f"| {k} | {cells[0]} | {results[k]:.4f} | {cells[1]} |")
    return lines


def write_loss_curve(out: Path) -> Path | None:
    """loss_curve.png from trainer_state.json (train and eval loss by step); None when nothing was logged."""
    history = json.loads((out / STATE_FILE).read_text())["log_history"]
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train:
        return None
    lines = [(train, "-", "train loss")] + ([(evals, "o-", "eval loss")] if evals else [])
    return _plot(out / LOSS_CURVE_FILE, lines, None)


def write_reward_curve(out: Path) -> Path | None:
    """reward_curve.png from trainer_state.json: the total reward and each named reward's mean by step (GRPO runs);
    None when no reward was logged."""
    history = json.loads((out / STATE_FILE).read_text())["log_history"]
    names = sorted({k for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    if not names:
        return None
    lines = []
    for key in ["reward", *names]:
        points = [(h["step"], h[key]) for h in history if key in h and "eval_runtime" not in h]
        if points:
            lines.append((points, "-", "total (weighted)" if key == "reward" else key.split("/")[1]))
    return _plot(out / REWARD_CURVE_FILE, lines, "mean reward")


def _plot(path: Path, lines: list[tuple[list, str, str]], ylabel: str | None) -> Path:
    """One PNG of (points, style, label) lines against the step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for points, style, label in lines:
        ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# Provenance ----------------------------------------------------------------------------------------------------


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
    import torch

    from llmft.hardware import allocator_in_use

    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "peak_rss_mb": _peak_rss_mb(),
            "allocator": allocator_in_use()}
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
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # kB on Linux


def template_hash(template: str | None) -> str | None:
    import hashlib

    return hashlib.sha256(template.encode()).hexdigest() if template else None
