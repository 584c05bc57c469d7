"""Where a training step's time goes: torch.profiler over llmft's (or TRL's) SFT steps, top operators by self time.

    python benchmarks/profile_sft.py [--method lora|full] [--config llmft|trl|llmft-pages-off] [--steps 2]
           [--rows 25]
           [--set KEY VALUE ...]   # llmft recipe overrides, e.g. --set lora_dropout 0
           [--shapes]              # operators split by input shapes and dtypes

Same model and data as sft_throughput.py (LIMA <= 512 tokens, batch 4); the first optimizer step is warm-up, the
next `--steps` are profiled. Prints the top operators by self CPU time and the share of the step each takes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import (BATCH, LEVERS_OFF, LR, MAX_LENGTH, _llmft_run, _rows, hardware_line,  # noqa: E402
                             make_data)

from llmft.hardware import preload_allocator  # noqa: E402


def profiler_callback(steps: int, shapes: bool = False):
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.profile = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1 and self.profile is None:  # after one warm-up step
                self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                      record_shapes=shapes)
                self.profile.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profile is not None and state.global_step == 1 + steps:
                self.profile.__exit__(None, None, None)

    return Profile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--config", default="llmft", choices=["llmft", "trl", *LEVERS_OFF],
                        help="llmft, TRL, or llmft with one CPU lever off (sft_throughput.py's configurations)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--shapes", action="store_true")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args()
    if args.config != "trl":  # the allocator `llmft train` runs on: under glibc a full step took twice as long
        preload_allocator(["train"])
    if args.config in LEVERS_OFF:
        from llmft import cpu_speed

        setattr(cpu_speed, *LEVERS_OFF[args.config])
    callback = profiler_callback(args.steps, args.shapes)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_data(work, BATCH * (args.steps + 2))
        if args.config != "trl":
            overrides = [item for key, value in args.set for item in (f"--{key}", value)]
            _llmft_run("profile", args.method, args.steps + 1, data, work, BATCH * (args.steps + 2), overrides, callback)
        else:
            from trl import SFTConfig, SFTTrainer

            from llmft.config import ModelConfig, PeftSettings
            from llmft.model import load_model, load_tokenizer

            tokenizer = load_tokenizer(ModelConfig())
            model = load_model(ModelConfig(dtype="float32"), PeftSettings(method=args.method))
            config = SFTConfig(output_dir=str(work / "trl"), use_cpu=True, max_length=MAX_LENGTH,
                               max_steps=args.steps + 1, per_device_train_batch_size=BATCH, report_to="none",
                               save_strategy="no", learning_rate=LR[args.method])
            SFTTrainer(model=model, args=config, processing_class=tokenizer, callbacks=[callback],
                       train_dataset=_rows(data, tokenizer, "train", BATCH * (args.steps + 2))).train()
    events = callback.profile.key_averages(group_by_input_shape=args.shapes)
    total = sum(e.self_cpu_time_total for e in events)
    allocator = os.environ.get("LD_PRELOAD") or "the system's malloc"
    print(f"{hardware_line()}, allocator: {allocator}\n{args.config} {args.method}, {args.steps} optimizer steps of "
          f"{BATCH} examples profiled: {total / 1e6:.1f} s of self CPU time\n")
    print("| operator | self CPU s | share | calls |" + (" shapes |" if args.shapes else ""))
    print("|---|---|---|---|" + ("---|" if args.shapes else ""))
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        shape = f" {str(e.input_shapes)[:80]} |" if args.shapes else ""
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.1%} | {e.count} |{shape}")


if __name__ == "__main__":
    main()
