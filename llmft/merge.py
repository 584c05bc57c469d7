"""`llmft merge RUN --out DIR`: a LoRA run folded into its base, one safetensors shard at a time.

Each shard of the base checkpoint is read, the adapter's deltas are added to the tensors it holds (in float32), and
the shard is written in the chosen dtype before the next is read: peak memory is a few shards' worth (read,
merged, serialised) plus the adapter, not the model, so 7B-70B bases merge on a machine that could not load them. The arithmetic is peft's own
(`get_delta_weight`): W + scale * B @ A with scale = alpha / r (alpha / sqrt(r) for rsLoRA), transposed for
fan-in-fan-out layers and embeddings; DoRA rescales each output row to the learned magnitude. Modules the adapter
saved whole (`modules_to_save`) replace the base's. What peft allows but this does not handle (per-module rank or
alpha patterns, LoRA biases, adapters on layers the checkpoint lacks) is refused by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from llmft.errors import ConfigError, HubError
from llmft.run_dir import Run, read_run

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFIX = "base_model.model."  # peft's prefix on the saved adapter's tensor names
INDEX = "model.safetensors.index.json"
COPIED = ("config.json", "generation_config.json")  # from the base; the tokenizer comes from the run
MERGE_MARK = "llmft_merge.json"  # marks a folder a merge wrote, which a later merge may replace


@dataclass
class MergeOptions:
    out: str = field(metadata={"help": "Folder for the merged model."})
    dtype: str = field(default="auto", metadata={"help": "auto (each tensor keeps the base checkpoint's dtype) | "
                                                         "float32 | bfloat16 | float16."})

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError([f"--dtype: '{self.dtype}' is not auto, {', '.join(DTYPES)}."],
                              what="the options of llmft merge")


def merge_command(run: str, options: MergeOptions) -> None:
    print(f"merged model: {merge(Path(run), Path(options.out), options.dtype)}")


def merge(run_path: Path, out: Path, dtype: str = "auto") -> Path:
    """The run's adapter folded into its base, written to `out` as a standalone model; returns `out`."""
    out = Path(os.path.abspath(out))
    _check_out(out, run_path)
    run = read_run(run_path)
    if not run.is_adapter:
        raise HubError(f"{run_path} holds a full model, not an adapter: it loads as it is, there is nothing to merge.")
    if run.recipe.peft.method == "qlora":
        log.warning("The adapter was trained on a 4-bit base; merging into the unquantised base weights.")
    from llmft.stages import STAGES

    if STAGES[run.info.stage].head != "causal_lm":  # a reward model's new score head has no tensor in the base
        return merge_in_memory(run, out, dtype)
    config = json.loads((run.path / "adapter_config.json").read_text())
    _refuse_unsupported(config, run.path)
    adapter = load_file(str(run.path / "adapter_model.safetensors"))
    deltas = Deltas(adapter, config)
    base = base_folder(run)
    shards = checkpoint_shards(base)
    target = _target_dtype(dtype, base)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    merged: set[str] = set()
    for shard in tqdm(shards, desc="Merging shards", unit="shard"):
        merged |= _merge_shard(shard, partial / shard.name, deltas, target)
    missing = deltas.names() - merged
    if missing:  # checkpoints that name tensors unlike the model (GPT-2's, saved without "transformer.")
        shutil.rmtree(partial)
        log.warning("The base checkpoint in %s names %d of the tensors the adapter changes otherwise (e.g. %s): merging "
                    "in memory with peft instead (memory: one copy of the model)", base, len(missing), sorted(missing)[0])
        return merge_in_memory(run, out, dtype)
    _write_metadata(base, partial, shards, target, run)
    _finish(partial, out, run, str(target))
    return out


def merge_in_memory(run: Run, out: Path, dtype: str) -> Path:
    """peft's merge_and_unload on the whole model (a reward model: the base checkpoint has no score head to merge
    into); memory is one copy of the model."""
    from llmft.config import ModelConfig
    from llmft.model import load_run_model, load_tokenizer

    log.info("Merging %s in memory with peft", run.path)
    model = load_run_model(run, "float32" if dtype in ("auto", "float32") else dtype).merge_and_unload()
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(partial)
    load_tokenizer(ModelConfig(name_or_path=str(run.path))).save_pretrained(partial)
    _finish(partial, out, run, dtype)
    return out


def _finish(partial: Path, out: Path, run: Run, dtype: str) -> None:
    """The merged folder marked as a merge and moved into place: complete or absent (a killed merge leaves only the
    .partial folder)."""
    (partial / MERGE_MARK).write_text(json.dumps({"run": str(run.path), "dtype": dtype}))
    if out.exists():
        shutil.rmtree(out)
    partial.replace(out)


def _check_out(out: Path, run_path: Path) -> None:
    """A merge replaces its output folder whole: never the run itself or a folder around it, and never a folder
    that holds something other than an earlier merge."""
    run = Path(os.path.abspath(run_path))
    if out == run or run in out.parents or out in run.parents:
        raise HubError(f"--out {out} is the run directory or holds it: merging there would delete the run. Choose a "
                       f"folder outside {run_path}.")
    if out.exists() and not (out / MERGE_MARK).exists() and (not out.is_dir() or any(out.iterdir())):
        raise HubError(f"--out {out} already holds files that are not an earlier llmft merge: a merge would replace "
                       "them. Choose a new folder, or empty this one first.")


class Deltas:
    """What the adapter changes, by the base checkpoint's tensor name."""

    def __init__(self, adapter: dict[str, torch.Tensor], config: dict):
        self.adapter, self.config = adapter, config
        rank = config["r"]
        alpha = config["lora_alpha"]
        self.scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        self.lora = {}  # base name -> (A, B, kind, magnitude or None)
        self.whole = {}  # base name -> replacement tensor (modules_to_save)
        for key, tensor in adapter.items():
            name = key.removeprefix(PREFIX)
            match = re.fullmatch(r"(.+)\.lora_(A|B|embedding_A|embedding_B)(?:\.weight)?", name)
            if match:
                module, part = match.groups()
                entry = self.lora.setdefault(f"{module}.weight", {})
                entry[part] = tensor
            elif ".lora_magnitude_vector" in name:
                module = name.split(".lora_magnitude_vector")[0]
                self.lora.setdefault(f"{module}.weight", {})["magnitude"] = tensor
            else:  # a module saved whole (modules_to_save: a new head; embeddings peft saved with their adapter)
                for part in (".modules_to_save", ".original_module", ".base_layer"):
                    name = name.replace(part, "")
                self.whole[name] = tensor

    def names(self) -> set[str]:
        return set(self.lora) | set(self.whole)

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The merged tensor for base tensor `name` (float32), or the tensor itself when the adapter leaves it."""
        entry = self.lora.get(name)
        if name in self.whole:  # the saved module replaces the base's, then its adapter applies on top
            weight = self.whole[name]
        if entry is None:
            return weight
        weight = weight.float()
        if "embedding_A" in entry:  # peft's Embedding: delta = (B @ A).T * scale, (vocabulary, hidden)
            return weight + (entry["embedding_B"].float() @ entry["embedding_A"].float()).T * self.scale
        delta = entry["B"].float() @ entry["A"].float() * self.scale
        if self.fan_in_fan_out:
            delta = delta.T
        if "magnitude" not in entry:
            return weight + delta
        # DoRA: each output row of W + delta rescaled to the learned magnitude (peft's Linear.merge).
        combined = weight + delta
        rows = combined.T if self.fan_in_fan_out else combined
        factor = entry["magnitude"].float() / torch.linalg.norm(rows, dim=1)
        return (rows * factor.view(-1, 1)).T if self.fan_in_fan_out else rows * factor.view(-1, 1)


def _merge_shard(source: Path, target: Path, deltas: Deltas, dtype: torch.dtype | None) -> set[str]:
    """One shard read, merged and written; the names of the tensors the adapter changed in it."""
    tensors, changed = {}, set()
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata() or {}
        for name in f.keys():
            weight = f.get_tensor(name)
            merged = deltas.apply(name, weight)
            if merged is not weight:
                changed.add(name)
            keep = weight.dtype if dtype is None or not weight.is_floating_point() else dtype
            tensors[name] = merged.to(keep).contiguous()
    save_file(tensors, str(target), metadata={**metadata, "format": "pt"})
    return changed


def _refuse_unsupported(config: dict, run: Path) -> None:
    problems = []
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module ranks or alphas (rank_pattern/alpha_pattern)")
    if config.get("lora_bias"):
        problems.append("LoRA biases (lora_bias)")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"{config.get('peft_type')} adapters (only LoRA)")
    if problems:
        raise HubError(f"{run}: the shard-by-shard merge does not handle {'; '.join(problems)}. Load the adapter with "
                       "peft and call merge_and_unload() instead.")


# The base checkpoint -----------------------------------------------------------------------------------------------


def base_folder(run: Run) -> Path:
    """A local folder with the base's safetensors: a folder as it is, a run directory merged as a base, a Hub id
    downloaded (weights and configs only)."""
    from llmft.model import base_source, weights_path

    base = run.info.base_model
    path = Path(weights_path(base_source(base)))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base.name_or_path, revision=base.revision,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception as err:  # the Hub client's errors have many types; report, do not trace
        raise HubError(f"cannot fetch the base model {base.name_or_path}: {err}") from err


def checkpoint_shards(base: Path) -> list[Path]:
    """The base's safetensors files, in the index's order when it is sharded."""
    index = base / INDEX
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base / name for name in names]
    single = base / "model.safetensors"
    if single.exists():
        return [single]
    raise HubError(f"{base} has no model.safetensors or {INDEX}: the shard-by-shard merge reads safetensors only "
                   "(pickled .bin checkpoints can run code when loaded); convert the base first.")


def _target_dtype(dtype: str, base: Path) -> torch.dtype | None:
    """The chosen dtype, or None for auto: each tensor keeps the base checkpoint's dtype."""
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise HubError(f"--dtype {dtype}: not one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _write_metadata(base: Path, out: Path, shards: list[Path], dtype: torch.dtype | None, run: Run) -> None:
    """The index (same layout as the base), the base's configs (the dtype updated) and the run's tokenizer."""
    from llmft.config import ModelConfig
    from llmft.model import load_tokenizer

    if (base / INDEX).exists():
        index = json.loads((base / INDEX).read_text())
        index["metadata"] = {"total_size": sum(_tensor_bytes(out / s.name) for s in shards)}
        (out / INDEX).write_text(json.dumps(index, indent=2))
    for name in COPIED:
        if (base / name).exists():
            shutil.copy2(base / name, out / name)
    if dtype is not None and (out / "config.json").exists():
        config = json.loads((out / "config.json").read_text())
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "dtype":
                config[key] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(config, indent=2))
    load_tokenizer(ModelConfig(name_or_path=str(run.path))).save_pretrained(out)


def _tensor_bytes(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) * ITEMSIZE.get(f.get_slice(k).get_dtype(), 4) for k in f.keys())


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
