"""DPO speed and memory: plain TRL's DPOTrainer (as shipped, and in fp32) vs llmft's DPO stage, same pairs and machine.

    python benchmarks/dpo_throughput.py [--steps 6] [--methods lora full]

Data: ../shared/data/llamafactory_demo/dpo_en_demo.json when present (LLaMA-Factory's DPO demo, converted by
`llmft data convert`; pairs longer than 512 tokens dropped), else the generated date-format pairs of
data_prep/make_demo_data.py --pairs. Model: the embedded SmolLM2-135M-Instruct. Both sides train on the same files
in TRL's conversational preference format (prompt messages, chosen and rejected assistant messages). Each
configuration runs in a fresh process for `--steps` optimizer steps of 4 pairs; the first step is not timed.
  tokens/s        non-padding tokens of chosen and rejected sequences per second over the timed steps
  peak RSS        the process's peak resident memory up to the end of training
  MFU             model FLOPs (policy forward + backward, and the reference forward) / the measured matmul peak of
                  the dtype the row computes in (bf16 autocast or bf16 weights: bf16; else fp32)
  pair acc.       held-out pairs (32) where the trained model gives the chosen answer the higher log-probability
  reward acc.     the same for DPO's implicit reward (against the untrained model): TRL's rewards/accuracies
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import make_meter, matmul_gflops, parse_args, run_config  # noqa: E402  (shared with SFT's)

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO.parent / "shared" / "data" / "llamafactory_demo" / "dpo_en_demo.json"
MAX_LENGTH, BATCH, EVAL_PAIRS = 512, 4, 32
LR = {"lora": 5e-5, "full": 5e-7}

# name -> (what it is, DPOConfig overrides for a plain-TRL run, or None for llmft)
CONFIGS = {
    "trl-fp32": ("TRL DPOTrainer, bf16=False", {"bf16": False}),
    "trl": ("TRL DPOTrainer as shipped (DPOConfig defaults)", {}),
    "llmft": ("llmft defaults", None),
}


def make_data(workdir: Path) -> dict[str, str]:
    """Train/eval pair files that fit MAX_LENGTH: LLaMA-Factory's DPO demo when present, else generated pairs."""
    if PAIRS.exists():
        out = workdir / "pairs"
        subprocess.run([str(Path(sys.executable).parent / "llmft"), "data", "convert", str(PAIRS), "--out", str(out),
                        "--test-fraction", "0"], check=True, capture_output=True)
        source, name = str(out / "train"), "dpo_en_demo.json"
    else:
        from llmft.dataset.demo import write_demo_data

        paths = write_demo_data(workdir / "demo", train_rows=256, eval_rows=0, pairs=True)
        source, name = str(paths["train"]), "generated date-format pairs"
    return {**_fitting_split(source, workdir), "source": name}


def _fitting_split(source: str, workdir: Path) -> dict[str, str]:
    """Pairs whose prompt + longer answer fit MAX_LENGTH, shuffled once (seed 0): EVAL_PAIRS held out, the rest train."""
    from llmft.config import ModelConfig
    from llmft.data import load_rows, prepare_preference
    from llmft.model import load_tokenizer
    from llmft.schema import PREFERENCE

    rows = load_rows(source)
    rows = rows.remove_columns([c for c in rows.column_names if c.startswith("_")])
    pairs, _ = prepare_preference(rows, load_tokenizer(ModelConfig()), MAX_LENGTH, "drop", source, PREFERENCE)
    fitting = [int(re.match(r"row (\d+)", e).group(1)) - 1 for e in pairs["example_id"]]
    picked = rows.select(fitting).shuffle(seed=0)
    files = {}
    for split, part in (("eval", range(EVAL_PAIRS)), ("train", range(EVAL_PAIRS, len(picked)))):
        files[split] = str(workdir / f"{split}.jsonl")
        picked.select(part).to_json(files[split])
    return files


def _pairs(path: str):
    from llmft.config import ModelConfig
    from llmft.data import load_rows, prepare_preference
    from llmft.model import load_tokenizer
    from llmft.schema import PREFERENCE

    return prepare_preference(load_rows(path), load_tokenizer(ModelConfig()), MAX_LENGTH, "drop", path, PREFERENCE)[0]


def _held_out(trained, method: str, eval_path: str) -> dict[str, float]:
    """Pair and implicit-reward accuracy on the held-out pairs, one sequence at a time (same yardstick for all)."""
    from llmft.config import ModelConfig, PeftSettings
    from llmft.evaluation import answer_logps, pair_metrics
    from llmft.model import load_model

    pairs = _pairs(eval_path)
    logps = [answer_logps(trained, pairs, answer) for answer in ("chosen_ids", "rejected_ids")]
    reference = load_model(ModelConfig(dtype="float32"), PeftSettings(method="full"))
    ref = [answer_logps(reference, pairs, answer) for answer in ("chosen_ids", "rejected_ids")]
    metrics = pair_metrics(*logps, *ref)
    return {"pair_accuracy": metrics["eval_pair_accuracy"], "reward_accuracy": metrics["eval_reward_accuracy"]}


def worker(name: str, method: str, steps: int, data: dict[str, str], workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    meter = make_meter()
    overrides = CONFIGS[name][1]
    if overrides is None:
        trained = _llmft_run(method, steps, data, workdir / name, meter)
    else:
        trained = _trl_run(method, steps, data, workdir / name, meter, overrides)
    return {**meter.result(), **_held_out(trained.float(), method, data["eval"])}


def _trl_run(method, steps, data, out, meter, overrides):
    """DPOTrainer as its docs show it: a model, a DPOConfig, the dataset files; only the CPU switch added."""
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    from llmft.config import ModelConfig, PeftSettings
    from llmft.model import load_model, load_tokenizer

    model = load_model(ModelConfig(dtype="float32"), PeftSettings(method=method))
    args = DPOConfig(output_dir=str(out), use_cpu=not torch.cuda.is_available(), max_length=MAX_LENGTH,
                     max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR[method], logging_steps=1,
                     report_to="none", save_strategy="no", **overrides)
    train = load_dataset("json", data_files=data["train"], split="train")
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=load_tokenizer(ModelConfig()),
                         callbacks=[meter])
    trainer.train()
    return trainer.model


def _llmft_run(method, steps, data, out, meter):
    """`llmft train` with stage dpo and nothing but the model, method, data and batch set."""
    import yaml

    from llmft.config import load_recipe
    from llmft.model import load_run_model
    from llmft.run_dir import read_run
    from llmft.train import train

    recipe = out.with_suffix(".yaml")
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "data": {"train_data": data["train"], "eval_fraction": 0},
        "peft": {"method": method},
        "training": {"stage": "dpo", "output_dir": str(out), "max_steps": steps,
                     "per_device_train_batch_size": BATCH, "max_length": MAX_LENGTH, "learning_rate": LR[method],
                     "logging_steps": 1, "seed": 42},
        "eval": {"num_generate": 0},
    }))
    train(load_recipe(recipe, []), callbacks=[meter])
    return load_run_model(read_run(out))


def flops_per_token(method: str) -> float:
    """Policy forward + backward (6N full, 4N LoRA: no weight gradients) plus the reference forward (2N)."""
    from sft_throughput import flops_per_token as sft_flops

    return sft_flops(method) + sft_flops(method) / (6 if method == "full" else 4) * 2


def main() -> None:
    args = parse_args(__doc__, CONFIGS, worker)
    if args is None:
        return
    peaks = {False: matmul_gflops(), True: matmul_gflops(dtype=torch.bfloat16)}
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512f", "avx512_bf16",
                                                                                   "amx_bf16")}) \
        if Path("/proc/cpuinfo").exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp))
        print(f"SmolLM2-135M-Instruct DPO, {data['source']} (pairs <= {MAX_LENGTH} tokens), batch {BATCH} pairs, "
              f"{args.steps} steps (first untimed), {torch.get_num_threads()} threads, CPU flags {' '.join(flags)}, "
              f"matmul peak fp32 {peaks[False]:.0f}, bf16 {peaks[True]:.0f} GFLOP/s\n")
        print("| method | configuration | tokens/s | vs TRL as shipped | peak RSS MB | vs TRL as shipped | compute | MFU "
              "| pair acc. | reward acc. |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for method in args.methods:
            results = {name: run_config(name, method, args.steps, data, Path(tmp) / method, __file__,
                                        llmft=CONFIGS[name][1] is None)  # llmft rows with llmft's allocator
                       for name in args.configs}
            base = results.get("trl")
            for name, result in results.items():
                label = CONFIGS[name][0]
                if "error" in result:
                    print(f"| {method} | {label} | failed: {result['error']} | | | | | | | |")
                    continue
                speed = f"{result['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and "error" not in base else ""
                memory = f"{result['peak_mb'] / base['peak_mb']:.2f}x" if base and "error" not in base else ""
                mfu = result["tokens_per_s"] * flops_per_token(method) / (peaks[result["bf16"]] * 1e9)
                print(f"| {method} | {label} | {result['tokens_per_s']:.1f} | {speed} | {result['peak_mb']:.0f} | "
                      f"{memory} | {'bf16' if result['bf16'] else 'fp32'} | {mfu:.0%} | {result['pair_accuracy']:.0%} | {result['reward_accuracy']:.0%} |",
                      flush=True)


if __name__ == "__main__":
    main()
