"""SFT speed and memory: TRL as a user gets it vs llmft's defaults vs each lever alone, same model, data and machine.

    python benchmarks/sft_throughput.py [--steps 6] [--methods lora full] [--configs trl llmft ...]
           [--model PATH --train-file TRAIN.jsonl --eval-file EVAL.jsonl]   # another model and chat data (GPU check)

Data: ../shared/data/lima.json when present (converted by `llmft data convert`, examples longer than 512 tokens
dropped), else generated chat rows of realistic lengths. Model: the embedded SmolLM2-135M-Instruct. Each
configuration runs in a fresh process (its own peak RSS) for `--steps` optimizer steps of 4 examples each
(SFT_BENCH_BATCH=16 in the environment for 16); the first step is warm-up and not timed; a configuration named
twice runs twice (the spread is the run-to-run noise).
Reported per configuration:
  tokens/s      non-padding tokens per second over the timed steps (TRL's own `num_tokens` count)
  padding       share of the batch positions that were padding
  peak RSS      the process's peak resident memory up to the end of training (or peak GPU memory on CUDA)
  training MB   how much of it training added over the process at the start of training (model loaded)
  MFU           model FLOPs (6N per token full, 4N LoRA: no weight gradients) / the measured matmul peak of the
                dtype the row's matmuls run in (bf16 autocast or bf16 weights: bf16; else fp32)
  eval loss     mean assistant-token loss on 32 held-out conversations after training (same yardstick for all)
  vs TRL        ratio to TRL as shipped, same method: `SFTConfig(use_cpu=True)` with its own defaults (bf16
                autocast, activation checkpointing, padded batches of 4), plus `bf16=False` only on a CPU without
                native bf16 (where bf16 runs ~100x slower); the "TRL fp32" row is the extra `bf16=False` row
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = "smollm2-135m-instruct"
LIMA = REPO.parent / "shared" / "data" / "lima.json"
MAX_LENGTH = 512
BATCH = int(os.environ.get("SFT_BENCH_BATCH", "4"))  # examples per optimizer step (larger on a GPU)
LR = {"lora": 2e-4, "full": 2e-5}

# name -> (what it is, TRL SFTConfig overrides, llmft recipe overrides or None for a plain-TRL run)
CONFIGS = {
    "trl": ("TRL as shipped (SFTConfig(use_cpu=True): bf16 autocast where native, padding, checkpointing)", {}, None),
    "trl-fp32": ("TRL with bf16=False (fp32)", {"bf16": False}, None),
    "no-ckpt": ("TRL + no activation checkpointing", {"gradient_checkpointing": False}, None),
    "group": ("TRL + length-grouped batches", {"train_sampling_strategy": "group_by_length"}, None),
    "bfd": ("TRL + bfd packing (padding-free)", {"packing": True}, None),
    "micro1": ("TRL + 1 example per micro-batch, accumulation 4 (no padding)",
               {"per_device_train_batch_size": 1, "gradient_accumulation_steps": BATCH}, None),
    "llmft": ("llmft defaults", {}, []),
    "llmft-glibc": ("llmft defaults with glibc's malloc (LLMFT_ALLOCATOR=system)", {}, []),
    "llmft-ckpt": ("llmft defaults + activation checkpointing", {}, ["--activation_checkpointing", "true"]),
    "llmft-fp32": ("llmft in fp32 (--dtype float32 --bf16 false: what a CPU without native bf16 runs)", {},
                   ["--dtype", "float32", "--bf16", "false"]),
    "llmft-bf16w": ("llmft + bf16 weights, AdamW with Kahan summation (full: model.dtype bfloat16)", {},
                    ["--dtype", "bfloat16"]),
    "llmft-8bit": ("llmft defaults + 8-bit AdamW (bitsandbytes)", {}, ["--optim", "adamw_bnb_8bit"]),
    "llmft-lowmem": ("llmft defaults + activation checkpointing + 8-bit AdamW", {},
                     ["--activation_checkpointing", "true", "--optim", "adamw_bnb_8bit"]),
    "llmft-pages-off": ("llmft defaults without jemalloc's freed pages kept within a step", {}, []),
    "llmft-packing-off": ("llmft defaults with each example in a pass of its own (no packing of short ones)", {}, []),
    "llmft-copies-off": ("llmft defaults with autocast's bf16 weight copies made every pass (full: not once per "
                         "step)", {}, []),
    "llmft-eager": ("llmft defaults + eager attention (matmul, softmax, matmul, probabilities kept)", {},
                    ["--attn_implementation", "eager"]),
    "llmft-sdpa": ("llmft defaults + SDPA attention (PyTorch's CPU flash kernel)", {},
                   ["--attn_implementation", "sdpa"]),
    # GPU candidates (llmft's defaults there are TRL's: padded batches, checkpointing, SDPA):
    "llmft-no-ckpt": ("llmft defaults without activation checkpointing (on by default with CUDA)", {},
                      ["--activation_checkpointing", "false"]),
    "llmft-liger": ("llmft defaults + Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU; needs "
                    "liger-kernel)", {}, ["--use_liger_kernel", "true"]),
}
# llmft rows with a CPU lever of the training loop (llmft.cpu_speed) switched off, to measure what it does.
LEVERS_OFF = {"llmft-pages-off": ("freed_pages_kept_within_steps", lambda trainer: contextlib.nullcontext(False)),
              "llmft-packing-off": ("packed_micro_batches", lambda trainer, max_tokens: False),
              "llmft-copies-off": ("bf16_weights_once_per_step", lambda model: 0)}


def matmul_gflops(n: int = 1024, repeat: int = 10, trials: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The matmul speed of this machine in `dtype` at n^3: the best of a few timings (others may share the cores)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(trials):
        _sync()
        start = time.perf_counter()
        for _ in range(repeat):
            a @ b
        _sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeat / best / 1e9


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peaks() -> dict[str, float]:
    """fp32 and bf16 matmul peaks (GFLOP/s): on CPUs the best of 1024^3 and 2048^3 (AMX reaches its rate only on the
    larger); on a GPU 8192^3, where smaller products time their launches more than the tensor cores."""
    sizes = [(8192, 20, 3)] if torch.cuda.is_available() else [(1024, 10, 5), (2048, 3, 3)]
    return {name: max(matmul_gflops(n, repeat, trials, dtype) for n, repeat, trials in sizes)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def hardware_line() -> str:
    """The CPU model and the flags that decide the matmul paths (or the GPU's name)."""
    import platform

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    line = (f"{model}, {torch.get_num_threads()} threads, flags {' '.join(shown) or 'none of avx2/avx512/amx'}, "
            f"torch {torch.__version__}")
    # Kernels limited below what the CPU has (PyTorch's own, oneDNN's, MKL's): an older CPU's code paths.
    capped = [f"{key}={os.environ[key]}" for key in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                                                     "MKL_ENABLE_INSTRUCTIONS") if os.environ.get(key)]
    return line + (f", kernels limited by {' '.join(capped)}" if capped else "")


def make_data(workdir: Path, examples: int, model: str = EMBEDDED, train_file: str | None = None,
              eval_file: str | None = None) -> dict[str, str]:
    """Train/eval chat datasets on disk (and the model, which every worker reads from here): the given files, else
    LIMA when present, else generated rows of realistic lengths."""
    if train_file:
        data = {"train": train_file, "eval": eval_file or train_file, "source": Path(train_file).name}
    elif LIMA.exists():
        out = workdir / "lima"
        subprocess.run([str(Path(sys.executable).parent / "llmft"), "data", "convert", str(LIMA), "--out", str(out),
                        "--test-fraction", "0.05"], check=True, capture_output=True)
        data = {"train": str(out / "train"), "eval": str(out / "test"), "source": "lima.json"}
    else:
        from llmft.dataset.demo import write_demo_data

        paths = write_demo_data(workdir / "demo", train_rows=256, eval_rows=32)
        data = {"train": str(paths["train"]), "eval": str(paths["eval"]), "source": "generated demo rows"}
    data["model"] = model
    data["train"] = _training_subset(data["train"], workdir / "train_subset.jsonl", examples, model)
    return data


def _training_subset(source: str, target: Path, examples: int, model: str = EMBEDDED) -> str:
    """The same rows for every configuration: conversations that fit max_length, shuffled once (seed 0)."""
    import re

    from llmft.config import ModelConfig
    from llmft.data import load_rows, prepare_dataset
    from llmft.model import load_tokenizer

    rows = load_rows(source)
    prepared, _ = prepare_dataset(rows, load_tokenizer(ModelConfig(name_or_path=model)), MAX_LENGTH, "drop", source)
    picked = prepared.shuffle(seed=0).select(range(min(examples, len(prepared))))
    numbers = [int(re.match(r"row (\d+)", e).group(1)) - 1 for e in picked["example_id"]]
    rows.select(numbers).remove_columns([c for c in rows.column_names if c.startswith("_")]).to_json(target)
    return str(target)


# The worker: one configuration in this process ------------------------------------------------------------------


def make_meter():
    """A TrainerCallback timing every optimizer step and counting the tokens and positions of every micro-batch."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.batches: list[tuple[int, int]] = []  # (non-padding tokens, positions)

        def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):
            self.start_mb = _memory_mb("VmRSS")
            weights = {p.dtype for p in model.parameters()} if model is not None else set()
            self.bf16 = bool(args.bf16 or torch.bfloat16 in weights)  # the dtype the matmuls run in
            self.accumulation = args.gradient_accumulation_steps
            loader = getattr(train_dataloader, "base_dataloader", train_dataloader)  # accelerate's adapter wraps it
            collate = loader.collate_fn

            def counting(features):
                batch = collate(features)
                positions = batch["input_ids"].numel()
                tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else positions
                self.batches.append((tokens, positions))
                return batch

            loader.collate_fn = counting

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

        def on_train_end(self, args, state, control, **kwargs):
            # Read before the eval below, which (for llmft) reloads the trained model from its run directory.
            self.peak_mb = _peak_mb()

        def result(self) -> dict[str, float]:
            """Over the timed steps (all but the first); the loader may have fetched one batch ahead."""
            steps = len(self.times)
            timed = self.batches[self.accumulation: steps * self.accumulation]
            return {"tokens_per_s": sum(t for t, _ in timed) / sum(self.times[1:]),
                    "padding": 1 - sum(t for t, _ in timed) / sum(p for _, p in timed),
                    "peak_mb": self.peak_mb, "train_mb": self.peak_mb - self.start_mb, "bf16": self.bf16}

    return Meter()


def _rows(data: dict[str, str], tokenizer, split: str, limit: int):
    from llmft.data import load_rows, prepare_dataset

    prepared, _ = prepare_dataset(load_rows(data[split]), tokenizer, MAX_LENGTH, "drop", data[split])
    return prepared.select(range(min(limit, len(prepared))))


def _eval_loss(model, eval_ds) -> float:
    """Mean loss over assistant tokens, one conversation at a time (no padding, same for every configuration)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in eval_ds:
            ids, labels = torch.tensor([row["input_ids"]], device=model.device), torch.tensor([row["labels"]], device=model.device)
            n = int((labels[:, 1:] != -100).sum())
            if n:
                total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
                count += n
    return total / count


def worker(name: str, method: str, steps: int, data: dict[str, str], workdir: Path) -> dict:
    from llmft.config import ModelConfig, PeftSettings
    from llmft.model import load_model, load_tokenizer

    _, trl_overrides, llmft_overrides = CONFIGS[name]
    model_name = data.get("model", EMBEDDED)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=model_name))
    eval_ds = _rows(data, tokenizer, "eval", 32)
    meter = make_meter()
    examples = BATCH * steps * 2
    if llmft_overrides is None:
        from trl import SFTConfig, SFTTrainer

        from llmft.hardware import fast_bf16_available

        model = load_model(ModelConfig(name_or_path=model_name, dtype="float32"), PeftSettings(method=method))
        # What a user of this hardware gets: SFTConfig's own defaults, bf16 off only where it is not native.
        hardware = {} if torch.cuda.is_available() or fast_bf16_available() else {"bf16": False}
        settings = {"per_device_train_batch_size": BATCH, **hardware, **trl_overrides}
        args = SFTConfig(output_dir=str(workdir / method / name), use_cpu=not torch.cuda.is_available(),
                         max_length=MAX_LENGTH, max_steps=steps, logging_steps=1,
                         report_to="none", save_strategy="no", learning_rate=LR[method], **settings)
        trainer = SFTTrainer(model=model, args=args, train_dataset=_rows(data, tokenizer, "train", examples),
                             processing_class=tokenizer, callbacks=[meter])
        trainer.train()
        trained = trainer.model
    else:
        if name in LEVERS_OFF:
            from llmft import cpu_speed

            setattr(cpu_speed, *LEVERS_OFF[name])
        trained = _llmft_run(name, method, steps, data, workdir, examples, llmft_overrides, meter)

    allocator = os.environ.get("LD_PRELOAD", "").split("/")[-1].split(".")[0].removeprefix("lib")
    return {**meter.result(), "eval_loss": _eval_loss(trained, eval_ds), "allocator": allocator}


def _llmft_run(name, method, steps, data, workdir, examples, overrides, meter):
    """`llmft train` with nothing but the model, method, data and batch set: llmft's defaults for the rest."""
    import yaml

    from llmft.config import load_recipe
    from llmft.model import load_run_model, on_gpu_if_any
    from llmft.run_dir import read_run
    from llmft.train import train

    out = workdir / method / name  # each method's rows in their own directories
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": data.get("model", EMBEDDED)},
        "data": {"train_data": data["train"], "eval_fraction": 0},
        "peft": {"method": method},
        "training": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": BATCH,
                     "max_length": MAX_LENGTH, "learning_rate": LR[method], "logging_steps": 1, "seed": 42},
    }))
    train(load_recipe(recipe, overrides), callbacks=[meter])
    return on_gpu_if_any(load_run_model(read_run(out)))  # evaluated where TRL's model is


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _memory_mb("VmHWM")


def _memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident so far) of this process, from /proc (Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: peak only


def flops_per_token(method: str, model: str = EMBEDDED) -> float:
    """Matmul FLOPs per trained token: forward 2N, input gradients 2N, weight gradients 2N (full only)."""
    from transformers import AutoConfig

    from llmft.model import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    d, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + d * inter * 3  # q, o, k, v, gate/up/down
    matmul_params = layers * per_layer + d * vocab  # the LM head; the embedding lookup is free
    return (6 if method == "full" else 4) * matmul_params


def run_config(name: str, method: str, steps: int, data: dict, workdir: Path, script: str = __file__,
               llmft: bool = False) -> dict:
    """One configuration of `script` in a fresh process (its own peak memory): its result, or the error. An llmft
    row runs with the allocator `llmft train` would (llmft.hardware.preload_allocator: a user's LD_PRELOAD, else
    jemalloc/tcmalloc where installed), a TRL row with the system's."""
    from llmft.hardware import allocator_library

    command = [sys.executable, script, "--worker", name, "--method", method, "--steps", str(steps),
               "--data", json.dumps(data), "--workdir", str(workdir)]
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    jemalloc = None if torch.cuda.is_available() else allocator_library()  # as llmft train: none on GPU machines
    library = (os.environ.get("LD_PRELOAD") or jemalloc
               if llmft and os.environ.get("LLMFT_ALLOCATOR") != "system" else None)
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "LD_PRELOAD": library} if library else env)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(doc: str, configs: dict, work) -> argparse.Namespace | None:
    """The benchmark's options; None after running a worker (`work(name, method, steps, data, workdir)`), whose
    result is printed as the last line for run_config to read."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--configs", nargs="+", default=list(configs), choices=list(configs))
    parser.add_argument("--model", default=EMBEDDED, help="Hub id or folder (default: the embedded SmolLM2).")
    parser.add_argument("--train-file", help="Chat JSONL to train on (default: LIMA, else generated rows).")
    parser.add_argument("--eval-file", help="Chat JSONL for the eval loss (default: the training file's rows).")
    for hidden in ("--worker", "--method", "--data", "--workdir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker:
        return args
    print(json.dumps(work(args.worker, args.method, args.steps, json.loads(args.data), Path(args.workdir))))
    return None


def main() -> None:
    args = parse_args(__doc__, CONFIGS, worker)
    if args is None:
        return

    peaks = matmul_peaks()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), BATCH * args.steps * 2, args.model, args.train_file, args.eval_file)
        print(f"{hardware_line()}\nmatmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
        print(f"{args.model}, {data['source']} (<= {MAX_LENGTH} tokens), batch {BATCH}, {args.steps} steps "
              "(first untimed)\n")
        print("| method | configuration | tokens/s | vs TRL | padding | peak RSS MB | vs TRL | training MB | vs TRL "
              "| dtype | MFU | eval loss |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        failed = 0
        for method in args.methods:
            base = None
            for index, name in enumerate(args.configs):  # a configuration named twice runs twice (noise)
                result = run_config(name, method, args.steps, data, Path(tmp) / str(index),
                                    llmft=CONFIGS[name][2] is not None and name != "llmft-glibc")
                label = CONFIGS[name][0] + (f" ({result['allocator']})" if result.get("allocator") else "")
                if "error" in result:
                    print(f"| {method} | {label} | failed: {result['error']} | | | | | | | | | |")
                    failed += 1
                    continue
                if name == "trl" or base is None:
                    base = result  # the first row is the yardstick when TRL as shipped is not among the configs
                dtype = "bf16" if result["bf16"] else "fp32"
                mfu = result["tokens_per_s"] * flops_per_token(method, args.model) / (peaks[dtype] * 1e9)
                print(f"| {method} | {label} | {result['tokens_per_s']:.1f} | "
                      f"{result['tokens_per_s'] / base['tokens_per_s']:.2f}x | {result['padding']:.0%} | "
                      f"{result['peak_mb']:.0f} | {result['peak_mb'] / base['peak_mb']:.2f}x | {result['train_mb']:.0f} | "
                      f"{result['train_mb'] / base['train_mb']:.2f}x | {dtype} | {mfu:.0%} | "
                      f"{result['eval_loss']:.4f} |", flush=True)
    if failed:
        sys.exit(f"{failed} configuration(s) failed: see the table")


if __name__ == "__main__":
    main()
