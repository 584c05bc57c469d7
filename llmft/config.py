"""Recipes: one YAML file parsed into a few typed dataclasses, one per concern.

A recipe has the sections ``model``, ``data``, ``peft``, ``tuning``, ``training``, ``eval`` and ``hub``. ``training`` is
``trl.SFTConfig`` (every TRL / Trainer argument keeps its usual name); the others are small dataclasses here.
Values come from, in order of precedence: the command line, the YAML file, the defaults below. Unknown keys
anywhere are errors that name the closest valid key, and every problem found is reported at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import DPOConfig, GRPOConfig, KTOConfig, RewardConfig, SFTConfig

with warnings.catch_warnings():  # TRL keeps ORPO and CPO in trl.experimental; docs/preference.md says so, once
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

from llmft.errors import ConfigError
from llmft.hardware import cuda_available, fast_bf16_available
from llmft.parsing import (OptionParser, build, coerce, field_names, field_types, read_yaml_mapping, suggest,
                           unknown_flags, without_none)

EMBEDDED_MODEL = "smollm2-135m-instruct"
METHODS = ("full", "lora", "qlora")
DTYPES = ("auto", "float32", "bfloat16")
OVERLONG = ("drop", "truncate")
REASONING = ("keep", "drop")
EVAL_METRICS = ("exact_match", "rouge_l", "bleu", "chrf")  # built in, offline; or evaluate:<metric id>
EXTRACTORS = ("none", "gsm8k", "last_number")  # or regex:PATTERN
STAGES = ("sft", "pretrain", "dpo", "orpo", "cpo", "kto", "reward", "grpo")  # training.stage: the keys of llmft.stages.STAGES (a test keeps them equal)
QUANT_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
ON_NONFINITE = ("stop", "skip")
INITS = ("pretrained", "scratch")
INIT_LINEAR = ("model", "xavier", "he")
UNFREEZE_BY = ("steps", "epochs")


def range_problems(section: str, obj: Any, bounds: dict[str, tuple[float, bool]]) -> list[str]:
    """A problem for each numeric setting below its floor: bounds map a field to (floor, floor allowed?); None
    always passes (it means "not set")."""
    problems = []
    for name, (floor, inclusive) in bounds.items():
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not math.isfinite(value):  # nan passes every comparison, so it is checked first
            problems.append(f"{section}.{name}: {value} is not a finite number.")
        elif value < floor or (value == floor and not inclusive):
            problems.append(f"{section}.{name}: {value} must be {'>=' if inclusive else '>'} {floor:g}.")
    return problems


POSITIVE, NON_NEGATIVE = (0, False), (0, True)
TRAINING_BOUNDS = {
    "per_device_train_batch_size": POSITIVE, "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE, "learning_rate": NON_NEGATIVE, "num_train_epochs": NON_NEGATIVE,
    "max_length": POSITIVE, "logging_steps": POSITIVE, "eval_steps": POSITIVE, "save_steps": POSITIVE,
    "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE, "seed": NON_NEGATIVE,
    "dataloader_num_workers": NON_NEGATIVE, "save_total_limit": POSITIVE, "eval_accumulation_steps": POSITIVE,
    "neftune_noise_alpha": NON_NEGATIVE,
}


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


@dataclass
class ModelConfig:
    """Which base model to fine-tune and how to load it (`training.trust_remote_code` applies too)."""

    _argument_group_name = "model"

    name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": f"Hub id, local directory, or '{EMBEDDED_MODEL}' (the embedded default model)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit of the model."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto | float32 | bfloat16. auto = bfloat16 frozen base weights for LoRA where "
            "bf16 is fast (CUDA, or a CPU with avx512_bf16/AMX that ONEDNN_MAX_CPU_ISA does not hold below them), "
            "float32 otherwise and for full fine-tuning "
            "(training.bf16 then gives mixed precision). bfloat16 with full fine-tuning trains bf16 weights with "
            "Kahan-summed AdamW (less memory, slower learning)."
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto | sdpa | eager | flash_attention_2 ... auto = sdpa, except bf16 training on a CPU, "
                          "which runs llmft's matmul attention recomputed in the backward (llmft.attention: the "
                          "attention itself 1.5-2x faster there than SDPA's, whole runs 1.05-1.17x, the same "
                          "memory)."},
    )
    init: str = field(
        default="pretrained",
        metadata={"help": "pretrained: the model's weights; scratch: the same architecture and tokenizer with fresh "
                          "random weights (needs peft.method: full), to compare against fine-tuning."},
    )
    init_linear: str = field(
        default="model",
        metadata={"help": "init scratch: linear layers initialised the architecture's own way (model), or xavier "
                          "(Glorot uniform) or he (Kaiming normal, fan-in)."},
    )
    attention_dropout: float | None = field(
        default=None, metadata={"help": "Dropout on attention probabilities, where the architecture has it (Llama, "
                                        "Qwen, Mistral: attention_dropout; GPT-2: attn_pdrop). None = the model's."}
    )
    hidden_dropout: float | None = field(
        default=None, metadata={"help": "Dropout on hidden states/residuals, where the architecture has it (GPT-2, "
                                        "Phi: resid_pdrop; Falcon: hidden_dropout; Llama has none). None = the model's."}
    )

    def __post_init__(self):
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"model.dtype: '{self.dtype}' is not one of {', '.join(DTYPES)}.")
        if self.init not in INITS:
            problems.append(f"model.init: '{self.init}' is not one of {', '.join(INITS)}.")
        if self.init_linear not in INIT_LINEAR:
            problems.append(f"model.init_linear: '{self.init_linear}' is not one of {', '.join(INIT_LINEAR)}.")
        if self.init_linear != "model" and self.init != "scratch":
            problems.append("model.init_linear applies to model.init: scratch only (pretrained weights are kept).")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                problems.append(f"model.{name}: {value} must be in [0, 1).")
        if not self.name_or_path:
            problems.append(f"model.name_or_path is empty: give a Hub id, a local path or '{EMBEDDED_MODEL}'.")
        _raise_if(problems)

    @property
    def loaded_attention(self) -> str:
        """The attn_implementation the model is loaded with (auto: sdpa; training may switch it, llmft.train)."""
        return "sdpa" if self.attn_implementation == "auto" else self.attn_implementation


@dataclass
class DataConfig:
    """Training and evaluation data: a `messages` or `prompt`/`completion` dataset on disk."""

    _argument_group_name = "data"

    train_data: str | None = field(
        default=None,
        metadata={"help": "Training data: a save_to_disk directory, a .jsonl/.json/.parquet file, or a folder of them."},
    )
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data, same formats as train_data."})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Without eval_data, and without a test/ split in a train_data folder made by "
                                 "llmft data convert/build: the share of train_data held out (seeded). 0 = none."}
    )
    overlong: str = field(
        default="drop",
        metadata={
            "help": "Examples longer than training.max_length: drop them, or truncate them (those left with no "
            "trainable token are dropped). Counts are logged either way."
        },
    )
    reasoning: str = field(
        default="keep",
        metadata={"help": "Reasoning traces (a message's reasoning_content, or a <think> block opening its content): "
                          "keep (trained, as the template renders them, else as a <think> block) or drop (removed "
                          "from every conversation, in training and evaluation)."},
    )
    replay_data: str | None = field(
        default=None,
        metadata={"help": "training.stage pretrain: conversations mixed into the text blocks as whole examples with "
                          "their chat loss masks, to limit forgetting (same formats as train_data)."},
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Use only the first N eval rows."})

    def __post_init__(self):
        problems = []
        if not self.train_data:
            problems.append("data.train_data is missing: point it at a .jsonl/.parquet file or a dataset directory.")
        if self.overlong not in OVERLONG:
            problems.append(f"data.overlong: '{self.overlong}' is not one of {', '.join(OVERLONG)}.")
        if self.reasoning not in REASONING:
            problems.append(f"data.reasoning: '{self.reasoning}' is not one of {', '.join(REASONING)}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"data.eval_fraction: {self.eval_fraction} must be in [0, 1).")
        problems += range_problems("data", self, {"max_train_examples": POSITIVE, "max_eval_examples": POSITIVE})
        _raise_if(problems)


@dataclass
class PeftSettings:
    """The fine-tuning method; for LoRA, the adapter's shape."""

    _argument_group_name = "peft"

    method: str = field(
        default="lora",
        metadata={"help": "full | lora | qlora (LoRA on a bitsandbytes-quantised frozen base, see quant_bits)."},
    )
    r: int = field(default=16, metadata={"help": "LoRA rank; higher adapts more and costs more memory."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get adapters: 'all-linear' or names such as q_proj v_proj."},
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling (alpha / sqrt(r))."})
    quant_bits: int = field(default=4, metadata={"help": "qlora: 4 (NF4/FP4 weights) or 8 (LLM.int8)."})
    quant_type: str = field(default="nf4", metadata={"help": "qlora 4-bit: nf4 (QLoRA paper) or fp4."})
    double_quant: bool = field(
        default=True, metadata={"help": "qlora 4-bit: quantise the quantisation constants too (~0.4 bit/param less)."}
    )

    def __post_init__(self):
        problems = []
        if self.method not in METHODS:
            problems.append(f"peft.method: '{self.method}' is not one of {', '.join(METHODS)}.")
        if self.quant_bits not in QUANT_BITS:
            problems.append(f"peft.quant_bits: {self.quant_bits} is not 4 or 8.")
        if self.quant_type not in QUANT_TYPES:
            problems.append(f"peft.quant_type: '{self.quant_type}' is not one of {', '.join(QUANT_TYPES)}.")
        if self.r <= 0:
            problems.append(f"peft.r: {self.r} must be a positive integer (8-64 is usual).")
        problems += range_problems("peft", self, {"lora_alpha": POSITIVE})
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"peft.lora_dropout: {self.lora_dropout} must be in [0, 1).")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        _raise_if(problems)


@dataclass
class TuningConfig:
    """How a pretrained model is adapted: which layers train, when they start, their learning rates, and a pull
    toward the pretrained weights. Blocks are the transformer layers, numbered from the input (0) upward."""

    _argument_group_name = "tuning"

    freeze_embeddings: bool = field(
        default=False, metadata={"help": "Freeze the input embeddings (and the output head when it is tied to them)."}
    )
    freeze_layers: int = field(default=0, metadata={"help": "Freeze the first N transformer blocks (lowest first)."})
    freeze_patterns: list[str] = field(
        default_factory=list,
        metadata={"help": "Also freeze parameters whose name matches any of these regular expressions (re.search), "
                          "e.g. 'self_attn' or 'layers\\.1[0-5]\\.'. Each must match something."},
    )
    unfreeze_every: float | None = field(
        default=None,
        metadata={"help": "Gradual unfreezing: train the head and the top unfreeze_initial_layers blocks first, then "
                          "unfreeze unfreeze_layers_per_stage more blocks (top down, embeddings last) every N "
                          "unfreeze_by. None = off."},
    )
    unfreeze_by: str = field(default="steps", metadata={"help": "Unit of unfreeze_every: steps | epochs."})
    unfreeze_initial_layers: int = field(default=1, metadata={"help": "Blocks trainable from the start (top ones)."})
    unfreeze_layers_per_stage: int = field(default=1, metadata={"help": "Blocks unfrozen at each stage."})
    layer_lr_decay: float = field(
        default=1.0,
        metadata={"help": "Layer-wise learning rates: block i of L trains at learning_rate x decay^(L-1-i), the "
                          "embeddings at decay^L; 1.0 = one rate. 0.8-0.95 is usual."},
    )
    head_lr_multiplier: float = field(
        default=1.0, metadata={"help": "Learning-rate factor for parameters outside the blocks: head, final norm."}
    )
    l2sp_alpha: float = field(
        default=0.0,
        metadata={"help": "L2-SP: add alpha/2 x ||w - w_pretrained||^2 to the loss (its gradient, each optimizer "
                          "step), pulling full fine-tuning toward the pretrained weights against forgetting. 0 = off."},
    )

    def __post_init__(self):
        problems = []
        if isinstance(self.freeze_patterns, str):
            self.freeze_patterns = [self.freeze_patterns]
        for pattern in self.freeze_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"tuning.freeze_patterns: '{pattern}' is not a regular expression ({err}).")
        if self.freeze_layers < 0:
            problems.append(f"tuning.freeze_layers: {self.freeze_layers} must be >= 0.")
        problems += range_problems("tuning", self, {"unfreeze_every": POSITIVE, "head_lr_multiplier": POSITIVE,
                                                    "l2sp_alpha": NON_NEGATIVE, "layer_lr_decay": POSITIVE})
        if self.unfreeze_by not in UNFREEZE_BY:
            problems.append(f"tuning.unfreeze_by: '{self.unfreeze_by}' is not one of {', '.join(UNFREEZE_BY)}.")
        if self.unfreeze_initial_layers < 0 or self.unfreeze_layers_per_stage < 1:
            problems.append("tuning.unfreeze_initial_layers must be >= 0 and unfreeze_layers_per_stage >= 1.")
        if math.isfinite(self.layer_lr_decay) and self.layer_lr_decay > 1.0:
            problems.append(f"tuning.layer_lr_decay: {self.layer_lr_decay} must be in (0, 1].")
        _raise_if(problems)

    @property
    def gradual(self) -> bool:
        return self.unfreeze_every is not None

    @property
    def custom_param_groups(self) -> bool:
        return self.gradual or self.layer_lr_decay != 1.0 or self.head_lr_multiplier != 1.0


@dataclass
class GenerationEval:
    """Generation metrics on held-out prompts: the recipe's `eval:` section and `llmft eval` share these settings
    (`llmft eval RUN` starts from the run's own values)."""

    _argument_group_name = "eval"

    num_generate: int = field(
        default=0,
        metadata={"help": "Held-out conversations answered by greedy generation and scored (0 = no generation)."},
    )
    metrics: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={"help": "Generation metrics: exact_match rouge_l bleu chrf (built in, offline), or "
                          "evaluate:ID for any metric of the evaluate library (a Hub id, or a local script path)."},
    )
    answer_extractor: str = field(
        default="none", metadata={"help": "For exact match: none | gsm8k | last_number | regex:PATTERN."}
    )
    few_shot: int = field(default=0, metadata={
        "help": "Worked examples before each prompt: the first training rows in training (saved in the run); in "
                "llmft eval, those, or --few-shot-data, or the first evaluated rows (then not asked themselves)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation length limit."})
    generate_batch_size: int = field(default=16, metadata={"help": "Prompts generated (and scored) together."})

    def __post_init__(self):
        problems = []
        for name in ("num_generate", "few_shot"):
            if getattr(self, name) < 0:
                problems.append(f"eval.{name} must be >= 0.")
        for name in ("max_new_tokens", "generate_batch_size"):
            if getattr(self, name) <= 0:
                problems.append(f"eval.{name} must be > 0.")
        if isinstance(self.metrics, str):
            self.metrics = [self.metrics]
        unknown = [m for m in self.metrics if m not in EVAL_METRICS and not (m.startswith("evaluate:") and m[9:])]
        if unknown:
            problems.append(f"eval.metrics: unknown {unknown}; choose from {', '.join(EVAL_METRICS)} or "
                            "evaluate:<metric id or path>.")
        if not (self.answer_extractor in EXTRACTORS or self.answer_extractor.startswith("regex:")):
            problems.append(f"eval.answer_extractor: '{self.answer_extractor}' is not none, gsm8k, last_number or "
                            "regex:PATTERN.")
        elif self.answer_extractor.startswith("regex:"):
            try:
                re.compile(self.answer_extractor[len("regex:"):])
            except re.error as err:
                problems.append(f"eval.answer_extractor: '{self.answer_extractor}' is not a regular expression ({err}).")
        _raise_if(problems)


@dataclass
class EvalConfig(GenerationEval):
    """Evaluation hooks: generation metrics at every Trainer evaluation (and before/after training)."""

    _argument_group_name = "eval"

    forgetting_check: bool = field(
        default=False,
        metadata={"help": "Perplexity on llmft's general-text set vs the model before training, as a ratio."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improving training.metric_for_best_model."}
    )
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "Smallest change that counts as better."})
    baseline: bool = field(default=True, metadata={"help": "Also evaluate the model before training."})
    show_samples: int = field(default=4, metadata={"help": "Side-by-side answers printed after training."})

    def __post_init__(self):
        problems = []
        try:
            super().__post_init__()
        except ConfigError as err:
            problems += err.problems
        if self.show_samples < 0:
            problems.append("eval.show_samples must be >= 0.")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            problems.append(f"eval.early_stopping_patience: {self.early_stopping_patience} must be >= 1.")
        _raise_if(problems)


@dataclass
class HubConfig:
    """Where a run is pushed on the Hugging Face Hub."""

    _argument_group_name = "hub"

    repo_id: str | None = field(default=None, metadata={"help": "ORG/NAME of the Hub repository."})
    private: bool = field(default=True, metadata={"help": "Create the repository private."})
    gate_metrics: list[str] = field(
        default_factory=list,
        metadata={"help": "Metrics of eval_results.json on which `llmft push` refuses a model worse than its baseline "
                          "(e.g. eval_loss eval_exact_match)."},
    )
    push: bool = field(default=False, metadata={"help": "Push the run at the end of training (main process only)."})

    def __post_init__(self):
        if self.push and not self.repo_id:
            raise ConfigError(["hub.push: true needs hub.repo_id (ORG/NAME)."])


@dataclass
class LlmftTraining:
    """llmft's settings and defaults, added to the TRL config of every stage (each stage's training section is that
    config with these: every TRL and Trainer argument keeps its usual name)."""

    _argument_group_name = "training"

    stage: str = field(default="sft", metadata={"help": f"Training stage: {' | '.join(STAGES)}."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (2e-4 suits LoRA; ~2e-5 full)."})
    max_length: int | None = field(default=1024, metadata={"help": "Longest example in tokens (see data.overlong)."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing: no | steps | epoch."})
    eval_strategy: str = field(default="no", metadata={"help": "Eval loss during training: no | steps | epoch."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Write over a finished run in output_dir (refused otherwise)."}
    )
    # TRL turns checkpointing on under its deprecated name; the new name carries llmft's default without the warning.
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias."})
    activation_checkpointing: bool | None = field(
        default=True,
        metadata={"help": "Recompute activations in the backward pass: less memory, more compute. Default: on with "
                          "CUDA (memory is the limit there), off on CPUs (where it costs more time than the memory is worth: "
                          "benchmarks/README.md)."},
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "none, tensorboard, wandb, ..."})
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Examples per optimizer step over all processes, kept whatever the process count: "
                          "gradient_accumulation_steps = global / (per_device_train_batch_size x processes)."},
    )
    cpu_micro_batches: bool = field(
        default=True,
        metadata={"help": "On CPUs, run each device batch one example at a time and accumulate (same batch, same "
                          "token-weighted loss): no padding, and PyTorch's fused causal attention: faster and "
                          "less memory (measured in benchmarks/README.md)."},
    )
    resume_from_checkpoint: str | None = field(
        default="auto",
        metadata={"help": "auto: continue from the latest complete checkpoint in output_dir, if any; a checkpoint "
                          "path; or no."},
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={"help": "NaN/Inf loss or gradients: stop (error naming the step and examples; the last checkpoint "
                          "stays good) or skip (drop that step's update, count it)."},
    )

    def stage_problems(self) -> list[str]:
        """The stage's own checks, reported with the common ones (a stage's config overrides this)."""
        return []

    def __post_init__(self):
        problems = self.stage_problems()
        if self.stage not in STAGES:
            problems.append(f"training.stage: '{self.stage}' is not one of {', '.join(STAGES)}.")
        if self.on_nonfinite not in ON_NONFINITE:
            problems.append(f"training.on_nonfinite: '{self.on_nonfinite}' is not one of {', '.join(ON_NONFINITE)}.")
        if self.global_batch_size is not None:
            if self.global_batch_size <= 0:
                problems.append(f"training.global_batch_size: {self.global_batch_size} must be positive.")
            if self.gradient_accumulation_steps != 1:
                problems.append("training.global_batch_size and training.gradient_accumulation_steps: set one of them; "
                                "with global_batch_size the accumulation is derived from the process count.")
        if self.save_total_limit == 1:
            problems.append("training.save_total_limit: 1 deletes the previous checkpoint before the new one is "
                            "marked complete, so a kill while saving leaves none to resume from; use 2 or more.")
        if self.push_to_hub:
            problems.append("training.push_to_hub: push with the hub: section (hub.repo_id), not the Trainer's push.")
        if self.fp16:
            problems.append("training.fp16: fp16 is not supported; use bf16: true (or false for fp32).")
        if not self.output_dir:
            problems.append("training.output_dir is missing: set where the run directory goes.")
        problems += range_problems("training", self, TRAINING_BOUNDS)
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"training.max_steps: {self.max_steps} must be a positive number of steps, or -1 (train "
                            "num_train_epochs).")
        _raise_if(problems)
        super().__post_init__()


@dataclass
class TrainingConfig(LlmftTraining, SFTConfig):
    """Supervised fine-tuning: `trl.SFTConfig` with llmft's settings."""


@dataclass
class DPOTrainingConfig(LlmftTraining, DPOConfig):
    """Direct preference optimisation and its variants (training.loss_type: sigmoid, ipo, hinge, sigmoid_norm,
    apo_zero...): `trl.DPOConfig` with llmft's settings."""

    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate (5e-6 suits LoRA DPO; ~5e-7 full)."})


@dataclass
class ORPOTrainingConfig(LlmftTraining, ORPOConfig):
    """Odds-ratio preference optimisation: SFT on the chosen answers plus an odds-ratio penalty on the rejected, no
    reference model: `trl.experimental.orpo.ORPOConfig` with llmft's settings."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (5e-5 suits LoRA ORPO)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "ORPO's collator needs every column."})


@dataclass
class CPOTrainingConfig(LlmftTraining, CPOConfig):
    """Contrastive preference optimisation, and SimPO (loss_type: simpo, cpo_alpha: 0: a length-normalised reward
    with a margin, no reference model): `trl.experimental.cpo.CPOConfig` with llmft's settings."""

    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate (5e-6 suits LoRA SimPO)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "CPO's collator needs every column."})


@dataclass
class KTOTrainingConfig(LlmftTraining, KTOConfig):
    """Kahneman-Tversky optimisation on answers labelled desirable or not: `trl.KTOConfig` with llmft's settings."""

    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate (5e-6 suits LoRA KTO; ~5e-7 full)."})


@dataclass
class RewardTrainingConfig(LlmftTraining, RewardConfig):
    """A reward model (a sequence classifier scoring answers) trained on pairs: `trl.RewardConfig` with llmft's
    settings."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (1e-5 suits a LoRA reward model)."})


@dataclass
class PretrainTrainingConfig(LlmftTraining, SFTConfig):
    """Continued pretraining on raw text: loss on every token, documents packed into blocks of max_length tokens
    (an end-of-text token between documents): `trl.SFTConfig` with llmft's settings."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (1e-4 suits LoRA; ~1e-5 full)."})


@dataclass
class GRPOTrainingConfig(LlmftTraining, GRPOConfig):
    """Group relative policy optimisation with verifiable rewards: `trl.GRPOConfig` with llmft's settings and the
    rewards by name (llmft.rewards), weighted by reward_weights."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (1e-5 suits LoRA GRPO; ~1e-6 full)."})
    rewards: list[str] = field(
        default_factory=lambda: ["exact_match:gsm8k"],
        metadata={"help": "Rewards: exact_match[:EXTRACTOR], format[:REGEX], length:N, python:MODULE:FUNCTION "
                          "(docs/rl.md); weights in reward_weights."},
    )

    def stage_problems(self) -> list[str]:
        from llmft.rewards import spec_problems

        problems = [p for spec in self.rewards for p in spec_problems(spec)]
        problems += range_problems("training", self, GRPO_BOUNDS)
        if self.num_generations is not None and self.num_generations < 2:
            problems.append(f"training.num_generations: {self.num_generations} must be >= 2: GRPO's advantages "
                            "compare the completions of one prompt.")
        if not self.rewards:
            problems.append("training.rewards: name at least one reward (e.g. exact_match:gsm8k).")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            problems.append(f"training.reward_weights: {len(self.reward_weights)} weights for {len(self.rewards)} "
                            "rewards; give one weight per reward, in the same order.")
        generations = self.num_generations_eval or self.num_generations
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if generations and (self.per_device_eval_batch_size * world) % generations:
            problems.append(f"training.per_device_eval_batch_size: {self.per_device_eval_batch_size} x {world} "
                            f"process(es) must be a multiple of the generations per eval prompt ({generations}: "
                            "num_generations_eval, else num_generations); held-out prompts are evaluated in whole "
                            "groups.")
        if self.global_batch_size is not None:
            problems.append("training.global_batch_size: not for grpo, whose batch is counted in completions; set "
                            "per_device_train_batch_size (a multiple of num_generations) and gradient_accumulation_steps.")
        return problems

    def __post_init__(self):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.generation_batch_size is not None and self.steps_per_generation is not None and \
                self.generation_batch_size == self.per_device_train_batch_size * world * self.steps_per_generation:
            # A copy (dataclasses.replace) of a config whose first __post_init__ derived one from the other: TRL
            # refuses both set, so derive the steps again from the generation batch.
            self.steps_per_generation = None
        super().__post_init__()


GRPO_BOUNDS = {"num_generations_eval": POSITIVE, "steps_per_generation": POSITIVE, "generation_batch_size": POSITIVE,
               "temperature": POSITIVE, "max_completion_length": POSITIVE, "num_iterations": POSITIVE,
               "top_p": POSITIVE, "beta": NON_NEGATIVE, "epsilon": NON_NEGATIVE}


TRAINING_CLASSES = {"sft": TrainingConfig, "pretrain": PretrainTrainingConfig, "dpo": DPOTrainingConfig,
                    "orpo": ORPOTrainingConfig, "cpo": CPOTrainingConfig, "kto": KTOTrainingConfig,
                    "reward": RewardTrainingConfig, "grpo": GRPOTrainingConfig}


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "peft": PeftSettings,
    "tuning": TuningConfig,
    "training": TrainingConfig,
    "eval": EvalConfig,
    "hub": HubConfig,
}


def sections_for(stage: str) -> dict[str, type]:
    """The recipe's sections with the training section of `stage` (an unknown stage gets SFT's, which reports it)."""
    return {**SECTIONS, "training": TRAINING_CLASSES.get(stage, TrainingConfig)}


@dataclass
class Recipe:
    """A whole recipe: one instance of each section, plus the file it came from."""

    model: ModelConfig
    data: DataConfig
    peft: PeftSettings
    tuning: TuningConfig
    training: LlmftTraining  # the stage's class: TrainingConfig, DPOTrainingConfig, ...
    eval: EvalConfig
    hub: HubConfig
    source: str | None = None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every resolved value, section by section, in a form YAML can hold and `load_recipe` can read back."""
        out, sections = {}, sections_for(self.training.stage)
        for name in sections:
            section = getattr(self, name)
            values = dataclasses.asdict(section) if name != "training" else _training_values(section)
            out[name] = {k: v for k, v in values.items() if k in field_names(sections[name])}
        return out


def _training_values(training: TrainingConfig) -> dict[str, Any]:
    """Trainer's to_dict (enums as strings), less its masking of every `*_token` field: only hub_token is secret."""
    values = training.to_dict()
    for key in ("pad_token", "eos_token"):
        if hasattr(training, key):
            values[key] = getattr(training, key)
    values["hub_token"] = None  # never written anywhere
    return values


def _owner_of(key: str, sections: dict[str, type] = SECTIONS) -> list[str]:
    return [name for name, cls in sections.items() if key in field_names(cls)]


def hardware_defaults(stem: str) -> dict[str, Any]:
    """Defaults that depend on this machine, applied below the YAML and the command line."""
    return {
        "output_dir": str(Path("runs") / stem),
        "use_cpu": not cuda_available(),
        "bf16": fast_bf16_available(),
        "activation_checkpointing": cuda_available(),
    }


def build_parser(sections: dict[str, type] = SECTIONS) -> OptionParser:
    parser = OptionParser(list(sections.values()), allow_abbrev=False, prog="llmft train")
    parser.add_argument("recipe", help="Recipe YAML file (see recipes/).")
    return parser


def _read_sections(path: Path, problems: list[str], stage: str | None = None) -> dict[str, dict[str, Any]]:
    """The YAML file's sections, checking every section and key name against the stage the run will have (`stage`
    from the command line, else the file's)."""
    raw = read_yaml_mapping(path, "recipe")
    if not raw:
        raise ConfigError([f"{path}: the recipe is empty. A recipe needs at least data.train_data; see recipes/ "
                           "for examples."])
    known = sections_for(stage or _yaml_stage(raw))
    sections = {}
    for name, values in raw.items():
        if name not in known:
            owners = _owner_of(name, known)
            hint = f" '{name}' belongs in section '{owners[0]}'." if owners else suggest(name, known)
            problems.append(f"{path}: unknown section '{name}'.{hint} Sections: {', '.join(known)}.")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{path}: section '{name}' must be a mapping of key: value.")
            continue
        values = _renamed_keys(name, values, path, problems)
        for key in values:
            if key not in field_names(known[name]):
                problems.append(f"{path}: unknown key '{name}.{key}'.{_key_hint(key, name, known)}")
        # Each value against its field's type: argparse converts only string values (YAML's '1e-4'), so a list,
        # number or boolean of the wrong kind would otherwise reach the code that uses it.
        sections[name], wrong = coerce(values, _checked_types(name, known[name]), f"{path}: {name}.")
        problems += wrong
    return sections


def _checked_types(section: str, cls: type) -> dict[str, Any]:
    """The fields whose YAML values are checked against their type hints: all of llmft's own settings; of TRL's and
    the Trainer's arguments only numbers and switches, because some of their text fields accept more than their hints
    say (GRPO's scale_rewards: false, fsdp: true or a list) and TRL checks those."""
    kinds = field_types([cls])
    if section != "training":
        return kinds
    own = {name for owner in cls.__mro__ if owner.__module__ == __name__
           for name in inspect.get_annotations(owner)}  # llmft's settings, the common ones and a stage's own (grpo's)
    return {key: kind for key, kind in kinds.items() if key in own or _numeric(without_none(kind))}


def _numeric(kind: Any) -> bool:
    """A number, a switch, or a list of numbers (grpo's reward_weights)."""
    if typing.get_origin(kind) is list:
        args = typing.get_args(kind)
        return bool(args) and all(arg in (int, float) for arg in args)
    return kind in (int, float, bool)


RENAMED_KEYS = {("eval", "generation_batch_size"): "generate_batch_size"}  # old recipes (and runs' recipe.yaml)


def _renamed_keys(section: str, values: dict[str, Any], path: Path, problems: list[str]) -> dict[str, Any]:
    """A section's keys under their current names, with a warning for each old name used."""
    out = {}
    for key, value in values.items():
        new = RENAMED_KEYS.get((section, key))
        if new is not None:
            warnings.warn(f"{path}: {section}.{key} is now {section}.{new}; the old name still works for now.",
                          FutureWarning, stacklevel=2)
            if new in values:
                problems.append(f"{path}: {section}.{key} and {section}.{new} are the same setting; keep {new}.")
        out[new or key] = value
    return out


def _key_hint(key: str, section: str, known: dict[str, type]) -> str:
    """Where a key that is not in `section` belongs: another section, another stage's training, or a near-miss."""
    owners = [o for o in _owner_of(key, known) if o != section]
    if owners:
        return f" It belongs in section '{owners[0]}'."
    if section == "training":
        stages = [stage for stage, cls in TRAINING_CLASSES.items() if key in field_names(cls)]
        if stages:
            return f" It is a setting of training.stage {', '.join(stages[:-1])}{' or ' if stages[1:] else ''}{stages[-1]}."
    return suggest(key, field_names(known[section]))


def _yaml_stage(raw: dict[str, Any]) -> str:
    training = raw.get("training")
    stage = training.get("stage") if isinstance(training, dict) else None
    return stage if isinstance(stage, str) else "sft"


def _cli_stage(argv: list[str]) -> str | None:
    """training.stage from the command line (--stage X, --stage=X, --training.stage X), if given there."""
    for i, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if flag in ("--stage", "--training.stage"):
            return value if equals else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _normalise_cli(argv: list[str], problems: list[str], sections: dict[str, type] = SECTIONS) -> list[str]:
    """Accept `--section.key value` as well as `--key value`; check the section is the key's own."""
    out, skip_value = [], False
    for arg in argv:
        if skip_value and not arg.startswith("--"):  # the value of an unknown option, reported with it
            skip_value = False
            continue
        skip_value = False
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            dotted, equals, value = arg[2:].partition("=")
            section, _, key = dotted.partition(".")
            if section not in sections or key not in field_names(sections[section]):
                problems.append(f"command line: unknown option '--{dotted}'.{suggest(f'--{key}', _flags(sections))}")
                skip_value = not equals
                continue
            arg = f"--{key}" + (f"={value}" if equals else "")
        out.append(arg)
    return out


def _all_keys(sections: dict[str, type] = SECTIONS) -> set[str]:
    return set().union(*(field_names(cls) for cls in sections.values()))


def _flags(sections: dict[str, type] = SECTIONS) -> list[str]:
    return [f"--{key}" for key in _all_keys(sections)]


def _where(problem: str, sections: dict[str, dict[str, Any]], cli: list[str]) -> str:
    """A value argparse refused, named where it came from: the command line, or the recipe's section.key."""
    match = re.match(r"argument --([\w]+)", problem)
    key = match.group(1) if match else None
    given_on_cli = key is not None and any(a.split("=", 1)[0] in (f"--{key}", f"--{key.replace('_', '-')}") for a in cli)
    owner = next((name for name, values in sections.items() if key in values), None)
    if key is None or given_on_cli or owner is None:
        return f"command line: {problem}"
    return f"{owner}.{key}: {problem.split(': ', 1)[-1]}"


def load_recipe(path: str | os.PathLike, argv: list[str] | None = None) -> Recipe:
    """Parse a recipe file and command-line overrides (CLI > YAML > default) into a validated `Recipe`."""
    path = Path(path)
    problems: list[str] = []
    if not path.is_file():
        raise ConfigError([f"recipe file not found: {path} (recipes live under recipes/<model>/<method>/)."])
    sections = _read_sections(path, problems, _cli_stage(list(argv or [])))
    stage = _cli_stage(list(argv or [])) or (sections.get("training") or {}).get("stage") or "sft"
    known = sections_for(stage if isinstance(stage, str) else "sft")
    cli = _normalise_cli(list(argv or []), problems, known)

    parser = build_parser(known)
    defaults = hardware_defaults(path.stem)
    for values in sections.values():
        defaults.update(values)
    # argparse converts string defaults with each option's type, so YAML's '1e-4' becomes a float here.
    parser.set_defaults(**defaults)
    try:
        namespace, unknown = parser.parse_known_args([str(path), *cli])
    except ConfigError as err:
        raise ConfigError([_where(p, sections, cli) for p in err.problems] + problems, source=str(path)) from err
    problems += [f"command line: {p}" for p in unknown_flags(unknown, _flags(known))]
    _old_checkpointing_name(namespace, sections.get("training") or {}, cli)
    built = dict(zip(known, build(known.values(), namespace, problems)))
    if not problems:
        problems.extend(cross_check(built))
    if problems:
        raise ConfigError(problems, source=str(path))
    return Recipe(**built, source=str(path))


def _old_checkpointing_name(namespace, training: dict[str, Any], cli: list[str]) -> None:
    """training.gradient_checkpointing, the Trainer's old name, said without the new one: it decides, rather than the
    machine's default of activation_checkpointing (which the Trainer would keep, ignoring the old name)."""
    said = "activation_checkpointing" in training or any(
        arg.split("=", 1)[0] in ("--activation_checkpointing", "--activation-checkpointing") for arg in cli)
    if namespace.gradient_checkpointing is not None and not said:
        namespace.activation_checkpointing = namespace.gradient_checkpointing


def recipe_from_dict(values: dict[str, dict[str, Any]], source: str) -> Recipe:
    """A recipe written by `Recipe.to_dict` (a run directory's recipe.yaml), read back as the dataclasses.

    The training section is taken as recorded, without TrainingArguments' checks of this machine (bf16 support,
    CUDA, DeepSpeed files): a run trained on a GPU must still be readable on a laptop. Keys this version does not
    know (a run made with another TRL) are ignored; keys it lacks take their defaults.
    """
    problems: list[str] = []
    built: dict[str, Any] = {}
    for name, cls in sections_for(_yaml_stage(values)).items():
        given = {RENAMED_KEYS.get((name, k), k): v for k, v in (values.get(name) or {}).items()}
        given = {k: v for k, v in given.items() if k in field_names(cls)}
        if name == "training":
            built[name] = _as_recorded(cls, given)
            continue
        try:
            built[name] = cls(**given)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems, source=source)
    return Recipe(**built, source=source)


def _as_recorded(cls: type, given: dict[str, Any]) -> Any:
    """An instance of a dataclass with `given` values and defaults for the rest, without running __post_init__."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in given:
            value = given[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        object.__setattr__(obj, f.name, value)
    return obj


def read_recipe_file(path: Path) -> Recipe:
    """A run directory's recipe.yaml (see `recipe_from_dict`)."""
    values = read_yaml_mapping(path, "the run's recipe")
    damaged = [name for name, section in values.items() if section is not None and not isinstance(section, dict)]
    if damaged:
        raise ConfigError([f"{path}: section(s) {', '.join(map(str, damaged))} are not mappings of key: value; the "
                           "file is not as llmft train wrote it: copy the run directory again."])
    return recipe_from_dict(values, str(path))


# The optimizers that bf16 full fine-tuning replaces with torch-optimi's AdamW with Kahan summation (the same update).
KAHAN_REPLACES = ("adamw_torch", "adamw_torch_fused")


def bf16_full_training(model: ModelConfig, peft: PeftSettings) -> bool:
    """Whether full fine-tuning trains bf16 weights, gradients and AdamW moments, with a bf16 Kahan compensation
    buffer per weight that keeps the updates bf16 rounding would lose (torch-optimi's AdamW in place of the default
    AdamW): model.dtype bfloat16. `bf16_full_problems` lists what it cannot be combined with.

    10 bytes a weight instead of 16 and no autocast copy of every weight per micro-batch, but not auto's choice: a
    weight moves only once its updates add up to half a bf16 step, so at fine-tuning learning rates it learns more
    slowly than float32 weights (benchmarks/README.md#a-cpu-with-native-bf16).
    """
    return peft.method == "full" and model.dtype == "bfloat16"


def bf16_full_problems(training, tuning) -> list[str]:
    """What bf16 full fine-tuning (bf16_full_training) cannot run with, and the way out of each."""
    problems, optim = [], _optim_name(training)
    head = "model.dtype: bfloat16 with peft.method: full"
    if optim not in KAHAN_REPLACES:
        problems.append(f"{head} needs training.optim {' or '.join(KAHAN_REPLACES)} (llmft trains it with "
                        f"Kahan-summed AdamW); {optim} has no Kahan summation and would lose the small updates in bf16 "
                        f"weights. Remove training.optim, or use model.dtype: auto (float32 weights) with {optim}.")
    launched = any(os.environ.get(f"ACCELERATE_USE_{key}", "").lower() == "true" for key in ("DEEPSPEED", "FSDP"))
    if training.deepspeed or training.fsdp or launched:  # from the recipe, or from `accelerate launch --config_file`
        problems.append(f"{head}: DeepSpeed and FSDP keep float32 master weights of their own; use model.dtype: auto.")
    if training.weight_decay:
        problems.append(f"{head}: training.weight_decay {training.weight_decay:g} would do nothing (the decay is "
                        "applied to the bf16 weight, where learning_rate x weight_decay is below a bf16 step). Set "
                        "training.weight_decay: 0, or use model.dtype: auto.")
    if tuning.unfreeze_every is not None:
        problems.append(f"{head}: tuning.unfreeze_every is not supported (torch-optimi counts AdamW steps per "
                        "parameter group, so a block unfrozen late would start with the wrong bias correction); use "
                        "model.dtype: auto.")
    return problems


def _optim_name(training) -> str:
    return str(getattr(training.optim, "value", training.optim))


def cross_check(sections: dict[str, Any]) -> list[str]:
    """Problems that involve more than one section."""
    problems = []
    model, peft, training = sections["model"], sections["peft"], sections["training"]
    if peft.method != "qlora" and (peft.quant_bits, peft.quant_type, peft.double_quant) != (4, "nf4", True):
        problems.append(f"peft.quant_bits/quant_type/double_quant apply to method qlora only (method is "
                        f"{peft.method}): remove them, or set peft.method: qlora.")
    if bf16_full_training(model, peft):
        problems += bf16_full_problems(training, sections["tuning"])
    if model.init == "scratch" and peft.method != "full":
        problems.append(f"model.init: scratch trains every weight from random values; peft.method {peft.method} would "
                        "train adapters on a random frozen base. Set peft.method: full.")
    tuning = sections["tuning"]
    if tuning.l2sp_alpha and (peft.method != "full" or model.init == "scratch"):
        problems.append("tuning.l2sp_alpha pulls trained weights toward their pretrained values: it needs "
                        "peft.method: full and model.init: pretrained (adapters start from nothing pretrained; use "
                        "training.weight_decay for them).")
    if sections["data"].replay_data and training.stage != "pretrain":
        problems.append(f"data.replay_data mixes conversations into raw-text blocks: it is for training.stage: "
                        f"pretrain (this recipe's stage is {training.stage}).")
    if training.stage == "pretrain" and training.max_length is None:
        problems.append("training.stage pretrain needs training.max_length (the block length documents are cut into).")
    if getattr(training, "packing", False) and training.max_length is None:
        problems.append("training.packing needs training.max_length (the packed row length).")
    evaluation = sections["eval"]
    if evaluation.early_stopping_patience is not None:
        if training.eval_strategy == "no":
            problems.append("eval.early_stopping_patience needs evaluations: set training.eval_strategy: steps (and eval_steps).")
        if not training.metric_for_best_model:
            problems.append("eval.early_stopping_patience needs training.metric_for_best_model, e.g. eval_loss or "
                            "eval_exact_match (with greater_is_better: true).")
        if not training.load_best_model_at_end:
            problems.append("eval.early_stopping_patience: set training.load_best_model_at_end: true so the best "
                            "checkpoint is the one kept.")
    if (evaluation.num_generate or evaluation.forgetting_check) and training.eval_strategy == "no" \
            and not evaluation.baseline:
        problems.append("eval: generation/forgetting metrics run at evaluations; with eval_strategy: no and "
                        "baseline: false they run only after training.")
    return problems + tracker_problems(training.report_to)  # names only: estimate and report run without them


# transformers' name for each tracker's "is it installed" check, where it is not is_<name>_available
TRACKER_CHECKS = {"comet_ml": "is_comet_available", "flyte": "is_flytekit_available"}


def tracker_problems(report_to: None | str | list[str], available: bool = False) -> list[str]:
    """Trackers named in training.report_to that transformers does not know, and with `available` those that are
    not installed: found before a run loads its data and model, not when the Trainer starts."""
    from transformers.integrations import integration_utils

    names = [] if report_to in ("none", "all") else [report_to] if isinstance(report_to, str) or report_to is None \
        else report_to
    problems = ["training.report_to: null is not a tracker; write none for no tracker."] if None in names else []
    for name in (str(n) for n in names if n not in (None, "none")):
        known = integration_utils.INTEGRATION_TO_CALLBACK
        if name not in known:
            problems.append(f"training.report_to: unknown tracker '{name}'.{suggest(name, known)} Trackers: none, "
                            f"all, {', '.join(known)}.")
            continue
        check = getattr(integration_utils, TRACKER_CHECKS.get(name, f"is_{name.replace('_', '')}_available"), None)
        if available and check is not None and not check():
            problems.append(f"training.report_to: {name} is not available here (not installed, or turned off by its "
                            "environment variables); install it (pip install -e '.[tracking]' has TensorBoard, MLflow "
                            "and Trackio), or set report_to: none.")
    return problems


def cli_help() -> str:
    return build_parser().format_help()
