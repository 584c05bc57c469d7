"""`llmft estimate RECIPE`: will it fit, and how long will it take, before any weight is loaded.

The model is built on PyTorch's meta device from its config (shapes, no memory), with the recipe's LoRA adapters, so
parameter counts are exact for any architecture transformers knows. Memory per device is the sum of:

  weights      parameters x bytes of their dtype (qlora: 4-bit linear layers at 0.5 byte + their quantisation
               constants; embeddings, norms and head in the compute dtype; adapters float32)
  gradients    trainable parameters x their dtype's bytes
  optimizer    AdamW: two states per trainable parameter in its dtype (8-bit optimizers: 2 bytes in all)
  activations  the longest micro-batch (from the data's token lengths, or max_length): per layer and token the
               tensors autograd keeps (norm outputs, q/k/v, attention output, the SwiGLU MLP's four, LoRA's dropout
               copies), only each layer's input under activation checkpointing (plus one layer being recomputed);
               and the LM head's logits with their float32 loss copies and gradients
  generation   the evaluation's answers to held-out prompts (KV cache on a GPU; the allocator's working set on a
               CPU, fitted); a training step and generation never run at once, so the larger of the two counts
  runtime      the CUDA context and allocator reserve on a GPU; on a CPU the process (Python, PyTorch and the
               libraries), the tokenised data and a converted checkpoint's pages; a CPU's training step counts
               with the allocator's growth over a run, calibrated against run.json peaks
               (benchmarks/README.md#llmft-estimate)

DeepSpeed ZeRO-1/2/3 and FSDP divide optimizer states, gradients and weights over the processes as they do;
CPU offload moves them off the GPU. Time per epoch is tokens x FLOPs per token (6 per parameter for full training,
4 when only adapters train, +2 with activation checkpointing, plus attention) over the device's peak at a stated
MFU. docs/estimate.md checks the formulas against published figures for 7B models.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from llmft.config import Recipe, bf16_full_training, load_recipe
from llmft.errors import ConfigError

GB = 2**30
# Dense bf16 peak TFLOP/s (vendor data sheets) and memory, for --gpu NAME; MFU is a fraction of this peak.
GPUS = {"H200": (989.0, 141), "H100": (989.0, 80), "A100": (312.0, 80), "A100-40GB": (312.0, 40),
        "L40S": (362.0, 48), "L4": (121.0, 24), "A10": (125.0, 24), "RTX4090": (165.0, 24), "RTX3090": (71.0, 24),
        "T4": (65.0, 16), "V100": (125.0, 32)}
NO_BF16 = ("T4", "V100")  # fp16-only GPUs: llmft refuses fp16, so they train in float32
CUDA_RUNTIME_GB = 1.0  # CUDA context, cuBLAS workspaces, allocator reserve (measured on H100/A100: 0.7-1.2 GB)
CPU_PROCESS_GB = 0.55  # Python + torch + transformers + TRL + datasets imported (measured: 0.52 GB RSS)
# A CPU run's resident memory grows past its live tensors (glibc's heap keeps freed blocks of varying sizes):
# the tensor total is multiplied by this, fitted to run.json peaks of the shipped CPU recipes.
CPU_ALLOCATOR_GROWTH = 1.5
DATA_BYTES_PER_TOKEN = 100  # the tokenised splits as Python lists while they are built and reported
# Generation on a CPU: bytes per sequence in the batch and vocabulary entry, plus per generated token (fitted).
CPU_GENERATION_BYTES, CPU_GENERATION_BYTES_PER_TOKEN = 1288, 6.9
SHIPPED_CONFIGS = ("multi_gpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp2.yaml",
                   "deepspeed_zero3_offload.yaml")


@dataclass
class EstimateOptions:
    recipe: str = field(metadata={"positional": True, "help": "The recipe YAML to estimate."})
    gpus: int | None = field(default=None, metadata={"help": "Processes (GPUs) the run will use (default: the "
                                                               "config's num_processes, else 1)."})
    gpu: str | None = field(default=None, metadata={"help": f"Estimate for this GPU: {', '.join(GPUS)} (default: "
                                                           "the GPU here, else this CPU unless --gpu-memory)."})
    gpu_memory: str | None = field(default=None, metadata={"help": "Memory per GPU, e.g. 80GB (default: the "
                                                                   "GPU's)."})
    config: str | None = field(default=None, metadata={"help": "The accelerate config the run will launch with "
                                                               "(its ZeRO stage, FSDP, offload, processes)."})
    mfu: float | None = field(default=None, metadata={"help": "Model FLOPs utilisation for the time estimate "
                                                              "(default 0.4 on GPUs, 0.05 on CPUs: measured for the shipped recipes)."})
    data: bool = field(default=True, metadata={"help": "Read the recipe's data for token lengths and counts "
                                                       "(false: assume every example is max_length long)."})
    json: bool = field(default=False, metadata={"help": "Print the estimate as JSON."})

    def __post_init__(self):
        problems = []
        if self.gpus is not None and self.gpus < 1:
            problems.append("--gpus must be 1 or more.")
        if self.gpu and _gpu_key(self.gpu) is None:
            problems.append(f"--gpu {self.gpu}: not one of {', '.join(GPUS)}; give --gpu-memory instead.")
        if self.gpu_memory and _gigabytes(self.gpu_memory) is None:
            problems.append(f"--gpu-memory {self.gpu_memory}: write a size such as 24GB or 80GB.")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            problems.append("--mfu must be between 0 and 1.")
        if problems:
            raise ConfigError(problems, what="the options of llmft estimate")


@dataclass(frozen=True)
class Target:
    """The device the run is estimated for."""

    name: str
    memory_gb: float
    peak_tflops: float  # of the compute dtype
    gpu: bool


@dataclass(frozen=True)
class Sharding:
    """How the processes split the training state (from an accelerate config)."""

    name: str = "single device"
    processes: int = 1
    zero_stage: int = 0  # 1 optimizer, 2 + gradients, 3 + weights (FSDP full shard counts as 3)
    offload_optimizer: bool = False
    offload_params: bool = False

    @classmethod
    def from_config(cls, path: str, processes: int | None) -> Sharding:
        """`processes` given (--gpus) wins over the config's num_processes."""
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError([f"--config {path}: cannot read it as an accelerate config ({err})."],
                              what="the options of llmft estimate") from err
        ds, fsdp = raw.get("deepspeed_config") or {}, raw.get("fsdp_config") or {}
        processes = processes or int(raw.get("num_processes") or 1)
        kind = str(raw.get("distributed_type", "NO"))
        if kind == "DEEPSPEED":
            return cls(Path(path).name, processes, int(ds.get("zero_stage", 0)),
                       ds.get("offload_optimizer_device", "none") not in ("none", None),
                       ds.get("offload_param_device", "none") not in ("none", None))
        if kind == "FSDP":
            offload = bool(fsdp.get("fsdp_offload_params", False))
            return cls(Path(path).name, processes, 3, offload, offload)
        return cls(Path(path).name, processes)


@dataclass
class Shape:
    """What the meta-device model says."""

    parameters: int
    trainable: int
    quantisable: int  # parameters of the linear layers a 4/8-bit base quantises (not the LM head)
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    vocab: int
    adapted_inputs: int  # per token and layer, the input elements LoRA's dropout copies


def estimate_command(options: EstimateOptions, overrides: list[str] | None = None) -> None:
    result = estimate(options, overrides)
    print(json.dumps(result, indent=2) if options.json else format_estimate(result))


def estimate(options: EstimateOptions, overrides: list[str] | None = None) -> dict[str, Any]:
    target = find_target(options)
    recipe = _recipe_for(options.recipe, target, overrides or [])
    gpus = options.gpus or 1
    sharding = Sharding.from_config(options.config, options.gpus) if options.config else Sharding(
        "multi_gpu.yaml (DDP)" if gpus > 1 else "single device", gpus)
    shape = model_shape(recipe)
    lengths = token_lengths(recipe, options.data)
    memory = memory_per_device(recipe, shape, lengths, target, sharding)
    result = {"recipe": options.recipe, "device": asdict(target), "sharding": asdict(sharding),
              "model": asdict(shape), "data": lengths, "memory_gb": memory,
              "fits": memory["total"] <= target.memory_gb, "time": time_per_epoch(recipe, shape, lengths, target,
                                                                                 sharding, options.mfu)}
    if not result["fits"]:
        result["try"] = suggestions(recipe, shape, lengths, target, sharding)
    return result


# The device and the recipe ----------------------------------------------------------------------------------------


def find_target(options: EstimateOptions) -> Target:
    import torch

    if options.gpu or options.gpu_memory:
        key = _gpu_key(options.gpu) if options.gpu else None
        peak, memory = GPUS[key] if key else (GPUS["A100"][0], None)
        memory = _gigabytes(options.gpu_memory) if options.gpu_memory else memory
        return Target(key or f"GPU with {memory:g} GB (A100's peak assumed)", memory, peak, True)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        key = _gpu_key(name)
        return Target(name, torch.cuda.get_device_properties(0).total_memory / GB,
                      GPUS[key][0] if key else GPUS["A100"][0], True)
    import psutil

    from llmft.hardware import cpu_has_fast_bf16

    return Target(f"this CPU ({psutil.cpu_count()} cores, {'bf16' if cpu_has_fast_bf16() else 'fp32'} matmuls)",
                  psutil.virtual_memory().total / GB, _cpu_peak_tflops(cpu_has_fast_bf16()), False)


def _recipe_for(path: str, target: Target, overrides: list[str]) -> Recipe:
    """The recipe (with the command line's overrides) as it would run on the target: on a GPU, bf16 and activation
    checkpointing unless it says otherwise (llmft's GPU defaults), whatever this machine's defaults are."""
    recipe = load_recipe(path, overrides)  # a missing or broken recipe is reported here, with every problem
    if not target.gpu:
        return recipe
    written = {*((yaml.safe_load(Path(path).read_text()) or {}).get("training") or {}),
               *(a.lstrip("-").split("=")[0].removeprefix("training.") for a in overrides if a.startswith("--"))}
    if "gradient_checkpointing" in written:  # the old name said alone decides, as in llmft train
        written.add("activation_checkpointing")
    bf16 = not recipe.training.fp16 and _gpu_key(target.name) not in NO_BF16
    defaults = [f"--{k}={v}" for k, v in (("bf16", str(bf16).lower()), ("activation_checkpointing", "true"))
                if k not in written]
    return load_recipe(path, defaults + overrides)


def model_shape(recipe: Recipe) -> Shape:
    """Parameter counts and sizes of the recipe's model with its adapters, built on the meta device."""
    import torch

    from llmft.model import HEADS, add_lora, model_config, resolve_model_path
    from llmft.stages import STAGES

    head = STAGES[recipe.training.stage].head
    path = _config_path(resolve_model_path(recipe.model.name_or_path))
    config = model_config(path, recipe.model, recipe.training.trust_remote_code, always=True)
    if head == "sequence_classification":
        config.num_labels = 1
    with torch.device("meta"):
        model = HEADS[head].from_config(config, trust_remote_code=recipe.training.trust_remote_code)
        if recipe.peft.method in ("lora", "qlora"):
            model = add_lora(model, recipe.peft, "SEQ_CLS" if head == "sequence_classification" else "CAUSAL_LM")
    text = getattr(config, "text_config", config)
    hidden = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", heads) * getattr(text, "head_dim", hidden // heads)
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and not any(k in n for k in ("lm_head", "score", "lora_"))]
    adapted = sum(m.in_features for n, m in model.named_modules() if hasattr(m, "lora_A") and ".layers.0." in n)
    return Shape(parameters=sum(p.numel() for p in model.parameters()),
                 trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                 quantisable=sum(m.weight.numel() for m in linear), layers=text.num_hidden_layers, hidden=hidden,
                 kv_hidden=kv, intermediate=getattr(text, "intermediate_size", 4 * hidden),
                 vocab=text.vocab_size if head == "causal_lm" else 1,
                 adapted_inputs=adapted if recipe.peft.lora_dropout > 0 else 0)


def _config_path(path: str) -> str:
    """A run directory as the base: its own config (a full run) or its base model's (an adapter run)."""
    run = Path(path) / "run.json"
    if run.exists() and not (Path(path) / "config.json").exists():
        from llmft.model import resolve_model_path

        return _config_path(resolve_model_path(json.loads(run.read_text())["base_model"]["name_or_path"]))
    return path


def token_lengths(recipe: Recipe, read_data: bool) -> dict[str, Any]:
    """Token lengths of the training examples as training will make them (llmft's own tokenisation), or
    max_length for every example when the data is not read."""
    limit = recipe.training.max_length or 2048
    if not read_data:
        return {"source": "max_length (data not read)", "examples": None, "tokens": None, "max": limit,
                "p95": limit, "mean": limit}
    from llmft.data import load_splits
    from llmft.model import load_tokenizer
    from llmft.stages import STAGES

    data = recipe.data
    train_rows, _ = load_splits(data.train_data, data.eval_data, data.eval_fraction, recipe.training.seed,
                                data.max_train_examples, data.max_eval_examples)
    tokenizer = load_tokenizer(recipe.model, recipe.training.trust_remote_code)
    _, report = STAGES[recipe.training.stage].prepare(train_rows, tokenizer, recipe, data.train_data)
    summary = report.to_dict().get("length", {})
    grpo = recipe.training.stage == "grpo"  # prompts here; a sequence adds its generated completion
    extra = getattr(recipe.training, "max_completion_length", 0) or 0 if grpo else 0
    return {"source": data.train_data, "examples": report.examples, "tokens": report.tokens,
            "max": min(limit + extra, summary.get("max", limit) + extra), "p95": summary.get("p95", limit) + extra,
            "mean": summary.get("mean", limit) + extra}


# Memory ---------------------------------------------------------------------------------------------------------


def memory_per_device(recipe: Recipe, shape: Shape, lengths: dict[str, Any], target: Target,
                      sharding: Sharding) -> dict[str, float]:
    """GB per device by component, and their total."""
    method, training = recipe.peft.method, recipe.training
    compute = 2 if training.bf16 else 4
    weight_bytes = _weight_bytes(recipe, target)
    frozen = shape.parameters - shape.trainable
    if method == "qlora":
        per_quantised = 0.5 + (0.127 / 8 if recipe.peft.double_quant else 4 / 64) if recipe.peft.quant_bits == 4 else 1
        weights = shape.quantisable * per_quantised + (frozen - shape.quantisable) * compute + shape.trainable * 4
    else:
        weights = frozen * weight_bytes + shape.trainable * (weight_bytes if method == "full" else 4)
    trainable_bytes = weight_bytes if method == "full" else 4
    grads = shape.trainable * trainable_bytes
    optimizer = shape.trainable * _optimizer_bytes(training.optim, trainable_bytes)
    if bf16_full_training(recipe.model, recipe.peft):  # and a bf16 Kahan compensation buffer per weight
        optimizer += shape.trainable * 2
    n = sharding.processes
    if sharding.zero_stage >= 1:
        optimizer = 0 if sharding.offload_optimizer else optimizer / n
    if sharding.zero_stage >= 2:
        grads /= n
    if method == "full" and _needs_reference(recipe):  # TRL's frozen second copy (an adapter run disables its adapter)
        weights += shape.parameters * compute
    if sharding.zero_stage >= 3:
        weights = 0.05 * weights if sharding.offload_params else weights / n  # one layer gathered at a time
    acts, logits = activations(recipe, shape, lengths, compute, target)
    answering = generation(recipe, shape, lengths, compute, target)
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": acts, "logits": logits,
             "generation": answering}
    growth = 1.0 if target.gpu else CPU_ALLOCATOR_GROWTH
    # A training step and the evaluation's generation never run at once: the larger of the two counts.
    transient = max(growth * (acts + logits), answering)
    if target.gpu:
        runtime = CUDA_RUNTIME_GB * GB
    else:
        runtime = (CPU_PROCESS_GB * GB + (lengths.get("tokens") or 0) * DATA_BYTES_PER_TOKEN
                   + _load_transient(recipe, shape, weight_bytes))
    parts["runtime"] = runtime
    gb = {k: round(v / GB, 3) for k, v in parts.items()}
    gb["total"] = round((weights + grads + optimizer + transient + runtime) / GB, 3)
    return gb


def _needs_reference(recipe: Recipe) -> bool:
    stage = recipe.training.stage
    return stage in ("dpo", "kto") or (stage == "grpo" and getattr(recipe.training, "beta", 0) > 0)


def _weight_bytes(recipe: Recipe, target: Target) -> int:
    """Bytes per weight as llmft loads them (llmft.model.weights_dtype, for the target's bf16 support)."""
    if recipe.model.dtype == "bfloat16":
        return 2
    if recipe.model.dtype == "float32" or recipe.peft.method == "full":
        return 4
    return 2 if (target.gpu or recipe.training.bf16) else 4


def _optimizer_bytes(optim: str, param_bytes: int) -> float:
    optim = str(optim).lower()
    if "8bit" in optim:
        return 2
    if "adafactor" in optim:
        return 0.1 * param_bytes  # factored second moments: rows + columns, not the matrix
    if "sgd" in optim:
        return param_bytes
    return 2 * param_bytes  # AdamW: exp_avg and exp_avg_sq in the parameter's dtype


def activations(recipe: Recipe, shape: Shape, lengths: dict[str, Any], compute: int,
                target: Target) -> tuple[float, float]:
    """(activations, logits) in bytes for the longest micro-batch (one example at a time with CPU micro-batches)."""
    from llmft.stages import STAGES

    training = recipe.training
    packed = bool(getattr(training, "packing", False))
    one_at_a_time = (training.cpu_micro_batches and not target.gpu and not packed
                     and STAGES[training.stage].micro_batches)
    micro = 1 if one_at_a_time else training.per_device_train_batch_size  # GRPO: completions per device step
    if training.stage in ("dpo", "orpo", "cpo", "reward"):
        micro *= 2  # chosen and rejected run as one batch
    # Padding makes a batch as long as its longest example; packed rows are max_length long; with CPU micro-batches
    # in bf16 on llmft's attention, SFT and pretraining pack a step's short examples into rows of up to PACK_TOKENS.
    tokens = micro * (training.max_length or lengths["max"] if packed else lengths["max"])
    if (one_at_a_time and training.stage in ("sft", "pretrain") and compute == 2
            and recipe.model.attn_implementation == "auto"):  # bf16 on llmft's attention: packed_micro_batches
        from llmft.cpu_speed import PACK_TOKENS

        tokens = max(min(training.max_length or PACK_TOKENS, PACK_TOKENS), lengths["max"])
    h, kv, inter = shape.hidden, shape.kv_hidden, shape.intermediate
    per_token_layer = 8 * h + 2 * kv + 4 * inter + shape.adapted_inputs  # elements autograd keeps
    if training.activation_checkpointing:
        acts = tokens * (shape.layers * h + per_token_layer) * compute
    else:
        acts = tokens * shape.layers * per_token_layer * compute
    logits = tokens * shape.vocab * (2 * compute + 8)  # logits, their float32 copy for the loss, both gradients
    if recipe.training.stage == "grpo":
        logits *= 2  # the policy's and the old policy's log-probabilities over the completions
    return acts, logits


def generation(recipe: Recipe, shape: Shape, lengths: dict[str, Any], compute: int, target: Target) -> float:
    """The evaluation's generation (eval.num_generate held-out prompts, eval.generate_batch_size at a time). On a
    GPU its KV cache and last-token logits; on a CPU the allocator's working set while decoding, which grows with
    the batch, the vocabulary and the tokens generated (fitted to run.json peaks: benchmarks/README.md)."""
    settings = recipe.eval
    if not settings.num_generate or recipe.training.stage in ("reward", "pretrain"):
        return 0.0
    batch, new = min(settings.generate_batch_size, settings.num_generate), settings.max_new_tokens
    if target.gpu:
        cache = batch * (lengths["p95"] + new) * shape.layers * 2 * shape.kv_hidden * compute
        return cache + batch * shape.vocab * 4 * 2
    return batch * shape.vocab * (CPU_GENERATION_BYTES + CPU_GENERATION_BYTES_PER_TOKEN * new)


def _load_transient(recipe: Recipe, shape: Shape, weight_bytes: int) -> float:
    """On a CPU, a LoRA base converted while loading (a float32 checkpoint to bf16 weights) holds the checkpoint's
    pages beside the weights being built; full fine-tuning maps the file as it is, QLoRA quantises layer by layer."""
    return 0.0 if recipe.peft.method in ("full", "qlora") else shape.parameters * max(0, 4 - weight_bytes)


# Time -----------------------------------------------------------------------------------------------------------


def time_per_epoch(recipe: Recipe, shape: Shape, lengths: dict[str, Any], target: Target, sharding: Sharding,
                   mfu: float | None) -> dict[str, Any]:
    mfu = mfu or (0.4 if target.gpu else 0.05)
    full = recipe.peft.method == "full"
    per_token = (6 if full else 4) * shape.parameters + (2 * shape.parameters if recipe.training.activation_checkpointing else 0)
    per_token += 12 * shape.layers * shape.hidden * lengths["mean"] / 2  # causal attention scores and values
    tokens = lengths.get("tokens")
    if not tokens:
        return {"flops_per_token": per_token, "seconds": None, "mfu": mfu,
                "note": "no token count (the data was not read)"}
    if recipe.training.stage == "grpo":  # every prompt's completions are generated (2 FLOPs a parameter), then trained
        tokens = lengths["examples"] * getattr(recipe.training, "num_generations", 1) * lengths["mean"]
        per_token += 2 * shape.parameters
    seconds = tokens * per_token / (target.peak_tflops * 1e12 * mfu * sharding.processes)
    return {"flops_per_token": per_token, "tokens": tokens, "seconds": round(seconds, 1), "mfu": mfu,
            "peak_tflops": target.peak_tflops}


# When it does not fit ----------------------------------------------------------------------------------------------


def suggestions(recipe: Recipe, shape: Shape, lengths: dict[str, Any], target: Target,
                sharding: Sharding) -> list[dict[str, Any]]:
    """Single changes that make the run fit, cheapest in speed first."""
    t = recipe.training
    changes: list[tuple[str, Recipe, Sharding, Shape]] = []
    if not t.activation_checkpointing:
        changes.append(("training.activation_checkpointing: true",
                        replace(recipe, training=replace(t, activation_checkpointing=True)), sharding, shape))
    if t.per_device_train_batch_size > 1:
        changes.append((f"training.per_device_train_batch_size: 1 with gradient_accumulation_steps: "
                        f"{t.per_device_train_batch_size * t.gradient_accumulation_steps}",
                        replace(recipe, training=replace(t, per_device_train_batch_size=1)), sharding, shape))
    if "8bit" not in str(t.optim) and not bf16_full_training(recipe.model, recipe.peft):  # bf16 full fine-tuning needs its Kahan AdamW
        changes.append(("training.optim: paged_adamw_8bit",
                        replace(recipe, training=replace(t, optim="paged_adamw_8bit")), sharding, shape))
    if recipe.peft.method == "full":
        lora = replace(recipe, peft=replace(recipe.peft, method="lora"))
        changes.append(("peft.method: lora", lora, sharding, model_shape(lora)))
    if recipe.peft.method in ("full", "lora"):
        qlora = replace(recipe, peft=replace(recipe.peft, method="qlora"))
        changes.append(("peft.method: qlora", qlora, sharding, model_shape(qlora)))
    configs = Path(__file__).parent.parent / "accelerate_configs"  # in a source checkout; not in a wheel
    if sharding.processes > 1 and configs.is_dir():
        for name in SHIPPED_CONFIGS:
            other = Sharding.from_config(str(configs / name), sharding.processes)
            if other.zero_stage > sharding.zero_stage or other.offload_optimizer > sharding.offload_optimizer:
                changes.append((f"accelerate launch --config_file accelerate_configs/{name}", recipe,
                                replace(other, processes=sharding.processes), shape))
    fits = []
    for what, changed, shard, shp in changes:
        total = memory_per_device(changed, shp, lengths, target, shard)["total"]
        if total <= target.memory_gb:
            fits.append({"change": what, "total_gb": total})
    return fits


# Output -----------------------------------------------------------------------------------------------------------


def format_estimate(r: dict[str, Any]) -> str:
    m, dev, shard = r["memory_gb"], r["device"], r["sharding"]
    lines = [f"llmft estimate: {r['recipe']}",
             f"  model: {r['model']['parameters']:,} parameters, {r['model']['trainable']:,} trainable",
             f"  data: {r['data']['source']}: {r['data']['examples'] or '-'} examples, longest {r['data']['max']} "
             f"tokens, p95 {r['data']['p95']}",
             f"  device: {dev['name']}, {dev['memory_gb']:.0f} GB; {shard['name']}, {shard['processes']} process(es)",
             "", "  memory per device (GB)"]
    lines += [f"    {k:<12} {v:8.2f}" for k, v in m.items() if k != "total"]
    lines += [f"    {'total':<12} {m['total']:8.2f}   (a training step or generation, whichever is larger)", ""]
    t = r["time"]
    if t.get("seconds") is not None:
        lines.append(f"  time per epoch: {_hours(t['seconds'])} ({t['tokens']:,} tokens x "
                     f"{t['flops_per_token'] / 1e9:.2f} GFLOP/token at {t['mfu']:.0%} of {t['peak_tflops']:g} TFLOP/s"
                     f"{' per device' if shard['processes'] > 1 else ''})")
    if r["fits"]:
        lines.append(f"  verdict: fits ({m['total']:.1f} of {dev['memory_gb']:.0f} GB)")
    else:
        lines.append(f"  verdict: does not fit ({m['total']:.1f} GB needed, {dev['memory_gb']:.0f} GB available)")
        lines += [f"    try: {s['change']}  ->  {s['total_gb']:.1f} GB" for s in r.get("try", [])] or [
            "    no single change fits: combine them, use more or larger GPUs, or a smaller model."]
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _gpu_key(name: str | None) -> str | None:
    """The GPUS entry a device name or --gpu value means (longest match first: A100-40GB before A100)."""
    squashed = re.sub(r"[\s_]", "", (name or "").upper())
    return next((k for k in sorted(GPUS, key=len, reverse=True) if k.replace("-", "") in squashed.replace("-", "")),
                None)


def _gigabytes(text: str) -> float | None:
    match = re.fullmatch(r"\s*([\d.]+)\s*(G|GB|GIB|T|TB)?\s*", str(text).upper())
    if not match:
        return None
    return float(match.group(1)) * (1024 if (match.group(2) or "G").startswith("T") else 1)


def _cpu_peak_tflops(bf16: bool) -> float:
    """This CPU's matmul peak in the compute dtype, measured in about half a second."""
    import time

    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        a @ b
        runs += 1
    return 2 * 1024**3 * runs / (time.perf_counter() - start) / 1e12
