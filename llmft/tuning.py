"""Adapting a pretrained model: layer freezing, gradual unfreezing, layer-wise learning rates, L2-SP.

The model is split into units a user can name: the input embeddings, the transformer blocks (numbered from the
input, 0 to L-1, read from the parameter names) and the rest ("head": final norm, output layer). Freezing is
`requires_grad = False`. Gradual unfreezing and layer-wise rates need the optimizer to hold every parameter that
will ever train from step 0, in one group per unit; a parameter still frozen has no gradient, and AdamW skips it
(no update, no weight decay, no state) until its first gradient.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from llmft.config import TuningConfig
from llmft.errors import ConfigError, LaunchError

log = logging.getLogger(__name__)

BLOCK = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


@dataclass
class Units:
    """Trainable parameter names by unit: blocks[i], embeddings, head (everything else)."""

    blocks: dict[int, list[str]]
    embeddings: list[str]
    head: list[str]
    tied_head: bool


def split_units(model: torch.nn.Module) -> Units:
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    blocks: dict[int, list[str]] = {}
    embeddings, head = [], []
    for name, param in model.named_parameters():
        match = BLOCK.search(name)
        if param is embedding:
            embeddings.append(name)
        elif match:
            blocks.setdefault(int(match.group(1)), []).append(name)
        else:
            head.append(name)
    return Units(dict(sorted(blocks.items())), embeddings, head, tied)


def apply_freezing(model: torch.nn.Module, cfg: TuningConfig) -> list[str]:
    """Freeze what the recipe names; return a line per rule saying what it froze. Raises when a rule matches
    nothing or leaves nothing to train, naming what exists."""
    units = split_units(model)
    params = dict(model.named_parameters())
    said = []
    if cfg.freeze_embeddings:
        _freeze(params, units.embeddings)
        said.append("embeddings" + (" (tied to the output head, so the head too)" if units.tied_head else ""))
    if cfg.freeze_layers:
        if not units.blocks:
            raise ConfigError(f"tuning.freeze_layers: no transformer blocks found in {type(model).__name__}'s parameter "
                              f"names (looked for '.layers.N.', '.h.N.', '.blocks.N.'); use tuning.freeze_patterns.")
        if cfg.freeze_layers >= len(units.blocks):
            raise ConfigError(f"tuning.freeze_layers: {cfg.freeze_layers} would freeze all {len(units.blocks)} blocks; "
                              f"use at most {len(units.blocks) - 1}.")
        for index in list(units.blocks)[: cfg.freeze_layers]:
            _freeze(params, units.blocks[index])
        said.append(f"blocks 0-{cfg.freeze_layers - 1}")
    for pattern in cfg.freeze_patterns:
        names = [n for n in params if re.search(pattern, n)]
        if not names:
            raise ConfigError(f"tuning.freeze_patterns: '{pattern}' matches no parameter. Names look like: "
                              f"{', '.join(list(params)[:3])}")
        _freeze(params, names)
        said.append(f"'{pattern}' ({len(names)} tensors)")
    if said and not any(p.requires_grad for p in params.values()):
        raise ConfigError("tuning: the freezing rules leave no parameter to train; freeze less.")
    return said


def _freeze(params: dict[str, torch.nn.Parameter], names: list[str]) -> None:
    for name in names:
        params[name].requires_grad_(False)


def learning_rate_factors(units: Units, cfg: TuningConfig) -> dict[str, tuple[str, float]]:
    """Each parameter's unit label and learning-rate factor: decay^(L-1-i) for block i, decay^L for the
    embeddings, head_lr_multiplier for the rest (or for the embeddings too when they are the tied head)."""
    depth = len(units.blocks)
    factors = {}
    for rank, (index, names) in enumerate(reversed(units.blocks.items())):
        factors.update({n: (f"block {index}", cfg.layer_lr_decay ** rank) for n in names})
    for name in units.head:
        factors[name] = ("head", cfg.head_lr_multiplier)
    embed_factor = cfg.head_lr_multiplier if units.tied_head else cfg.layer_lr_decay ** depth
    for name in units.embeddings:
        factors[name] = ("embeddings (tied head)" if units.tied_head else "embeddings", embed_factor)
    return factors


def param_groups(model: torch.nn.Module, cfg: TuningConfig, learning_rate: float, weight_decay: float,
                 decay_names: set[str]) -> list[dict[str, Any]]:
    """Optimizer groups of every trainable parameter, one per unit and decay/no-decay, highest rate first."""
    units = split_units(model)
    factors = learning_rate_factors(units, cfg)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        label, factor = factors[name]
        decays = name in decay_names
        group = groups.setdefault((label, decays), {
            "params": [], "lr": learning_rate * factor, "weight_decay": weight_decay if decays else 0.0,
            "name": label, "numel": 0})
        group["params"].append(param)
        group["numel"] += param.numel()
    return sorted(groups.values(), key=lambda g: -g["lr"])


def describe_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups as a user reads them (and run.json records them): unit, tensors, parameters, rate, decay."""
    return [{"unit": g["name"], "tensors": len(g["params"]), "parameters": g["numel"], "lr": g["lr"],
             "weight_decay": g["weight_decay"]} for g in groups]


def build_optimizer(trainer, cfg: TuningConfig) -> tuple[torch.optim.Optimizer, list[dict[str, Any]]]:
    """The Trainer's optimizer class and settings (training.optim, or the class llmft gave the Trainer), over llmft's
    parameter groups."""
    args, model = trainer.args, trainer.model
    groups = param_groups(model, cfg, args.learning_rate, args.weight_decay,
                          set(trainer.get_decay_parameter_names(model)))
    optimizer_cls, kwargs = optimizer_choice(trainer)
    if _builds_own_groups(optimizer_cls, kwargs):
        raise ConfigError(f"training.optim: {_name(args.optim)} builds its own parameter groups (GaLore, APOLLO, "
                          "LOMO, Muon and the like), which tuning's layer_lr_decay, head_lr_multiplier and gradual "
                          "unfreezing replace: use one or the other.")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay")}
    optimizer = optimizer_cls([{k: v for k, v in g.items() if k != "numel"} for g in groups], **kwargs)
    if "bitsandbytes" in str(optimizer_cls) and kwargs.get("optim_bits") == 8:
        _embeddings_in_32_bits(model)
    return optimizer, describe_groups(groups)


def optimizer_choice(trainer) -> tuple[type, dict[str, Any]]:
    """The optimizer class and settings the run will use (training.optim, or the class llmft gave the Trainer); what
    it lacks (a package, GaLore's target modules) as a ConfigError, before training starts."""
    if trainer.optimizer_cls_and_kwargs:
        return trainer.optimizer_cls_and_kwargs
    try:
        return trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"training.optim: {_name(trainer.args.optim)}: {err}") from err


def _name(optim) -> str:
    return getattr(optim, "value", optim)  # TrainingArguments keeps an OptimizerNames member


def check_optimizer(trainer) -> None:
    """training.optim loads (its package installed, its settings given), said before training starts. Left to the
    Trainer: layer-wise GaLore/APOLLO (resolving them hooks an optimizer onto every weight, and the Trainer resolves
    them again), and DeepSpeed (its config's optimizer may be the one used)."""
    if not trainer.is_deepspeed_enabled and "layerwise" not in _name(trainer.args.optim):
        optimizer_choice(trainer)


def _builds_own_groups(optimizer_cls, kwargs: dict[str, Any]) -> bool:
    from transformers.trainer_optimizer import is_optimizer_factory

    return is_optimizer_factory(optimizer_cls) or bool({"params", "model", "optimizer_dict"} & set(kwargs))


def _embeddings_in_32_bits(model: torch.nn.Module) -> None:
    """What the Trainer does for its own 8-bit bitsandbytes optimizer: embedding states stay 32-bit (8-bit ones
    destabilise training)."""
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


def log_groups(described: list[dict[str, Any]]) -> None:
    lines = [f"  {g['unit']:<24} {g['tensors']:>4} tensors {g['parameters']:>12,} params  lr {g['lr']:.3g}  "
             f"weight_decay {g['weight_decay']:g}" for g in described]
    log.info("Optimizer parameter groups (highest learning rate first):\n%s", "\n".join(lines))


def check_launch(cfg: TuningConfig, world_size: int, accelerator) -> None:
    """Refuse combinations whose parameter handling the distributed wrappers would silently undo."""
    from accelerate import DistributedType

    kind = accelerator.distributed_type
    if cfg.gradual and world_size > 1:
        raise LaunchError("tuning.unfreeze_every: gradual unfreezing runs in one process only (DDP and ZeRO fix the "
                          "set of parameters with gradients when they wrap the model). Drop the schedule, or train "
                          "on one device.")
    if cfg.custom_param_groups and kind == DistributedType.FSDP:
        raise LaunchError("tuning: layer-wise learning rates and gradual unfreezing are not supported under FSDP "
                          "(it replaces the parameters after the optimizer groups are built); use DDP or DeepSpeed.")
    if cfg.l2sp_alpha and kind == DistributedType.DEEPSPEED:
        raise LaunchError("tuning.l2sp_alpha: DeepSpeed keeps the gradients inside its engine, where L2-SP cannot add "
                          "its term; use DDP (accelerate_configs/multi_gpu.yaml) or set l2sp_alpha: 0.")


class GradualUnfreezing(TrainerCallback):
    """Unfreezes blocks top down (embeddings last unless tied to the head) on a step or epoch schedule.

    Added after the weight-change check, so that check fingerprints every parameter that may train. The stage
    follows from the step (or epoch) alone, so a resumed run picks up where it was.
    """

    def __init__(self, model: torch.nn.Module, cfg: TuningConfig):
        units = split_units(model)
        params = dict(model.named_parameters())
        order = [units.blocks[i] for i in reversed(units.blocks)]
        if not units.tied_head:
            order.append(units.embeddings)
        # Units frozen for good (tuning.freeze_*) take no part in the schedule.
        self.stages = [[params[n] for n in names if params[n].requires_grad] for names in order]
        self.labels = [f"block {i}" for i in reversed(units.blocks)] + ([] if units.tied_head else ["embeddings"])
        self.cfg, self.trainable = cfg, -1
        if not any(self.stages):
            raise ConfigError("tuning.unfreeze_every: no trainable blocks to unfreeze (are they all frozen?).")
        scheduled = {id(p) for stage in self.stages for p in stage}
        if cfg.unfreeze_initial_layers == 0 and all(id(p) in scheduled for p in model.parameters() if p.requires_grad):
            raise ConfigError("tuning.unfreeze_initial_layers: 0 leaves nothing to train before the first stage (the "
                              "head is frozen or, with LoRA, has no adapter); use 1 or more.")

    def _target(self, state) -> int:
        cfg = self.cfg
        progress = state.global_step if cfg.unfreeze_by == "steps" else (state.epoch or 0)  # 0.5 epochs: each half
        stage = math.floor(progress / cfg.unfreeze_every + 1e-9)  # 0.3 // 0.1 is 2.0 in floats: 0.3 / 0.1 + eps is 3
        return min(len(self.stages), cfg.unfreeze_initial_layers + stage * cfg.unfreeze_layers_per_stage)

    def _apply(self, state) -> None:
        target = self._target(state)
        if target == self.trainable:
            return
        for i, params in enumerate(self.stages):
            for param in params:
                param.requires_grad_(i < target)
        if self.trainable >= 0:
            log.info("Step %d: unfroze %s (%d of %d units trainable)", state.global_step,
                     ", ".join(self.labels[self.trainable:target]), target, len(self.stages))
        self.trainable = target

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state)
        log.info("Gradual unfreezing: %d of %d units trainable at step %d (%s), %d more every %g %s",
                 self.trainable, len(self.stages), state.global_step, ", ".join(self.labels[: self.trainable]) or
                 "head only", self.cfg.unfreeze_layers_per_stage, self.cfg.unfreeze_every, self.cfg.unfreeze_by)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainable < len(self.stages):
            log.warning("Gradual unfreezing: training ended with %s still frozen (the schedule needed more %s).",
                        ", ".join(self.labels[self.trainable:]), self.cfg.unfreeze_by)


class L2SP(TrainerCallback):
    """Adds the gradient of alpha/2 x ||w - w0||^2 before each optimizer step, w0 the pretrained weights.

    Same as adding the penalty to the loss, except that it comes after gradient clipping. Keeps one copy of the
    trainable weights. Logs `l2sp_distance` (||w - w0|| over all trainable tensors) with the loss.
    """

    def __init__(self, model: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, param in self.model.named_parameters():
            if param.grad is not None and name in self.reference:
                param.grad.add_(param.detach() - self.reference[name], alpha=self.alpha)

    def distance(self) -> float:
        with torch.no_grad():
            squares = sum(float((p.detach() - self.reference[n]).double().pow(2).sum())
                          for n, p in self.model.named_parameters() if n in self.reference)
        return math.sqrt(squares)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and state.log_history:  # the entry just logged
            state.log_history[-1]["l2sp_distance"] = round(self.distance(), 6)
