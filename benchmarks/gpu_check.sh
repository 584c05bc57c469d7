#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Every check that needs a CUDA GPU, in one run of about 10 minutes on one GPU (GPU_CHECK_STEPS splits it): the
# tests marked `gpu`; llmft train with bf16 LoRA, QLoRA (4-bit NF4), full fine-tuning (float32 and bf16 weights),
# DeepSpeed ZeRO-3 and FSDP2 (one process each where one GPU is all there is), DPO and GRPO; tokens/s, MFU and memory
# of TRL as shipped vs llmft's defaults, and of candidate GPU defaults (no checkpointing, Liger kernels); llmft
# estimate against the GPU peak the LoRA run recorded; llmft eval's, check's and self-chat's models on the GPU.
# Models are random Llama configs built locally (a tiny one, and ~0.5B parameters for speed): nothing is downloaded.
#
# On a GPU machine without internet access, bring the Python packages llmft needs that it lacks as wheels in
# .whl/ (the script installs them first when the folder exists), made where pip reaches an index, from a list of
# what the GPU machine has (names, or name==version as `pip list --format=freeze` prints them):
#   python benchmarks/gpu_wheels.py --have HAVE.txt --python 3.12 --cuda 130 --also liger-kernel
# versions.txt then says whether each of llmft's requirements is met there (and `pip check` whether their own are).
# Results go to OUT_DIR (default $OUT, else gpu_check_out/): one log per step and a summary table. The run stops
# starting steps after GPU_CHECK_SECONDS (570); GPU_CHECK_STEPS="name ..." runs only the steps named (the rest of
# a run that ran out of time, say).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SUMMARY="$OUT_DIR/summary.md"
echo "| step | result | seconds |" > "$SUMMARY"
echo "|---|---|---|" >> "$SUMMARY"

if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT_DIR/wheels.log" 2>&1 || { echo "| install .whl/ | FAIL: see wheels.log | |" | tee -a "$SUMMARY"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"  # accelerate's CLI
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# Without these every step fails: say so once (benchmarks/gpu_wheels.py brings what is missing).
if ! $PY -c "import trl, peft, datasets, deepspeed, bitsandbytes, llmft.train" > "$OUT_DIR/imports.log" 2>&1; then
    echo "| imports | FAIL: $(tail -1 "$OUT_DIR/imports.log") | |" | tee -a "$SUMMARY"
    exit 1
fi

DEADLINE=${GPU_CHECK_SECONDS:-570}  # the whole run's budget: a step gets at most what is left of it
STEPS="${GPU_CHECK_STEPS:-}"          # e.g. GPU_CHECK_STEPS="fsdp2_lora dpo_lora_bf16": only those steps
ONLY=" ${STEPS//,/ } "
case "$ONLY" in  # these read lora_bf16's run: it runs too
    *" estimate_vs_peak "* | *" eval_run "* | *" eval_check_on_gpu "*) ONLY="$ONLY lora_bf16 " ;;
esac
step() {  # step NAME TIMEOUT_SECONDS COMMAND...: run, log, record pass/fail and time
    local name=$1 limit=$2
    shift 2
    [ -n "$STEPS" ] && [[ "$ONLY" != *" $name "* ]] && return
    local start=$SECONDS left=$((DEADLINE - SECONDS)) result
    if [ "$left" -lt 20 ]; then
        echo "| $name | skipped: past the ${DEADLINE} s budget | 0 |" | tee -a "$SUMMARY"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    # -k: llmft train turns the first SIGTERM into a checkpoint at the step's end; a hung step gets a SIGKILL.
    if timeout -k 15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1; then result=pass; else result="FAIL ($?)"; fi
    echo "| $name | $result | $((SECONDS - start)) |" | tee -a "$SUMMARY"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpu.txt" 2>&1
$PY - > "$OUT_DIR/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as m, torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, "bf16", torch.cuda.is_bf16_supported())
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed",
             "flash_attn", "liger_kernel", "vllm"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
import shutil, sysconfig
from pathlib import Path
print("C compiler (Triton: torch-optimi's bf16 kernel)", shutil.which("cc") or shutil.which("gcc"),
      "Python.h", (Path(sysconfig.get_paths()["include"]) / "Python.h").exists())
import tomllib
from packaging.requirements import Requirement
for text in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    need = Requirement(text)
    try:
        there = m.version(need.name)
    except m.PackageNotFoundError:
        there = None
    print("requirement", need, "->", there, "ok" if there and need.specifier.contains(there, prereleases=True) else "UNMET")
EOF
# And every installed package's own requirements (datasets' pyarrow and fsspec ranges, say), as pip sees them.
$PY -m pip check >> "$OUT_DIR/versions.txt" 2>&1

# Models and data, built here: a tiny random Llama (fast checks) and one of Qwen2.5-0.5B's shape, vocabulary
# included (speed); the tests' short chat rows, and longer ones of random words for the speed tables (126 to 474
# tokens; LIMA's are up to 512).
$PY - "$OUT_DIR" > "$OUT_DIR/setup.log" 2>&1 <<'EOF' || { echo "| setup | FAIL: see setup.log | |" | tee -a "$SUMMARY"; exit 1; }
import json, random, sys
from pathlib import Path
import torch
from tests.helpers import chat_rows, make_tiny_model_dir, make_tokenizer, pair_rows
from transformers import LlamaConfig, LlamaForCausalLM
out = Path(sys.argv[1])
make_tiny_model_dir(out / "tiny")
tokenizer = make_tokenizer()
config = LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                     tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out / "llama-0.5b")
tokenizer.save_pretrained(out / "llama-0.5b")
def write(name, rows):
    (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
rows, pairs = chat_rows(272), pair_rows(272)
write("train.jsonl", rows[:256]), write("eval.jsonl", rows[256:])
write("pairs.jsonl", pairs[:256]), write("pairs_eval.jsonl", pairs[256:])
rng = random.Random(0)
words = "the model learns a short answer from each long question about data time light water city river".split()
say = lambda low, high: " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))
long = [{"messages": [{"role": "user", "content": say(5, 20)}, {"role": "assistant", "content": say(10, 80)}]}
        for _ in range(216)]
write("speed_train.jsonl", long[:200]), write("speed_eval.jsonl", long[200:])
lengths = sorted(len(tokenizer.apply_chat_template(r["messages"], return_dict=False)) for r in long)
print("speed rows: tokens min/median/max", lengths[0], lengths[len(lengths) // 2], lengths[-1])
EOF

RECIPE=recipes/smollm2-135m-instruct/lora/demo.yaml
common=(--train_data "$OUT_DIR/train.jsonl" --eval_data "$OUT_DIR/eval.jsonl" --max_steps 20 --max_length 256
        --num_generate 4 --logging_steps 5 --overwrite_output_dir true --report_to none)
step gpu_tests 240 $PY -m pytest -q -m gpu tests
step lora_bf16 120 $PY -m llmft train "$RECIPE" "${common[@]}" --name_or_path "$OUT_DIR/llama-0.5b" \
    --output_dir "$OUT_DIR/runs/lora" --bf16 true
# Tokens/s, MFU (against the GPU's measured bf16 matmul peak) and peak memory: TRL as shipped vs llmft's defaults, on
# the Qwen2.5-0.5B-shaped random Llama and the long rows (a bare GPU machine has neither the embedded model nor LIMA).
step sft_speed 300 env SFT_BENCH_BATCH=16 $PY benchmarks/sft_throughput.py --model "$OUT_DIR/llama-0.5b" --train-file "$OUT_DIR/speed_train.jsonl" \
    --eval-file "$OUT_DIR/speed_eval.jsonl" --steps 6 --methods lora full --configs trl llmft
# llmft estimate of the bf16 LoRA run above against the peak its run.json recorded (the GPU formulas' check). The
# record is torch's peak allocation, without the CUDA context the estimate's `runtime` line adds.
step estimate_vs_peak 60 $PY - "$OUT_DIR" "$RECIPE" "${common[@]}" --name_or_path "$OUT_DIR/llama-0.5b" \
    --output_dir "$OUT_DIR/runs/lora" --bf16 true <<'EOF'
import json, subprocess, sys
out, recipe, *overrides = sys.argv[1:]
measured = json.load(open(f"{out}/runs/lora/run.json"))["hardware"]["peak_gpu_memory_mb"] / 1024
shown = subprocess.run([sys.executable, "-m", "llmft", "estimate", recipe, "--json", "true", *overrides],
                       capture_output=True, text=True, check=True).stdout
estimate = json.loads(shown[shown.index("{"):])["memory_gb"]
allocated = estimate["total"] - estimate["runtime"]
print(json.dumps({"measured_peak_gb": round(measured, 2), "estimate": estimate, "estimate_allocated_gb": allocated}))
assert 0.75 * measured <= allocated <= 1.5 * measured, (allocated, measured)
EOF
step qlora_4bit 120 $PY -m llmft train recipes/smollm2-135m-instruct/qlora/demo.yaml "${common[@]}" \
    --name_or_path "$OUT_DIR/llama-0.5b" --output_dir "$OUT_DIR/runs/qlora" --bf16 true
step full_bf16 120 $PY -m llmft train "$RECIPE" "${common[@]}" --name_or_path "$OUT_DIR/tiny" --method full \
    --learning_rate 1e-4 --output_dir "$OUT_DIR/runs/full"
# Full fine-tuning in bf16 weights: torch-optimi's Kahan-summed AdamW (its Triton kernel on CUDA).
step full_bf16_kahan 120 $PY -m llmft train "$RECIPE" "${common[@]}" --name_or_path "$OUT_DIR/tiny" --method full \
    --dtype bfloat16 --learning_rate 1e-4 --output_dir "$OUT_DIR/runs/full_kahan"
step zero3_lora 180 accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 1 \
    -m llmft train "$RECIPE" "${common[@]}" --name_or_path "$OUT_DIR/tiny" --output_dir "$OUT_DIR/runs/zero3"
step fsdp2_lora 180 accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 1 \
    -m llmft train "$RECIPE" "${common[@]}" --name_or_path "$OUT_DIR/tiny" --output_dir "$OUT_DIR/runs/fsdp2"
step eval_run 120 $PY -m llmft eval "$OUT_DIR/runs/lora" --baseline base --num_generate 4
# llmft eval's model on CUDA; llmft check's greedy answers made there (a random model's need not stop at the
# end-of-turn token: that problem alone is expected).
step eval_check_on_gpu 90 $PY - "$OUT_DIR" <<'EOF'
import sys
from pathlib import Path
from llmft.errors import HubError
from llmft.evaluation import load_for_eval
from llmft.hub import check
model = load_for_eval(f"{sys.argv[1]}/runs/lora")[0]
print(model.device)
assert model.device.type == "cuda", model.device
try:
    print(check(Path(f"{sys.argv[1]}/runs/lora")))
except HubError as err:
    print(err)
    assert str(err).count("\n  - ") == 1 and "did not stop" in str(err), err
EOF
# Self-chat's local model generates on the GPU.
step selfchat_on_gpu 60 $PY - "$OUT_DIR" <<'EOF'
import sys
from llmft.synth.backends import BackendOptions, Sampling, make_backend
backend = make_backend(BackendOptions(model=f"{sys.argv[1]}/tiny"))
print(backend.model.device, backend.chat([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=8)))
assert backend.model.device.type == "cuda", backend.model.device
EOF
step dpo_lora_bf16 120 $PY -m llmft train recipes/smollm2-135m-instruct/dpo/demo.yaml --train_data "$OUT_DIR/pairs.jsonl" \
    --eval_data "$OUT_DIR/pairs_eval.jsonl" --max_steps 20 --max_length 256 --num_generate 4 \
    --overwrite_output_dir true --name_or_path "$OUT_DIR/llama-0.5b" --output_dir "$OUT_DIR/runs/dpo" --bf16 true
# GRPO's path on the GPU (generation, rewards, the policy step): a random model's rewards are ~0, so not learning.
step grpo_lora_bf16 150 $PY -m llmft train recipes/smollm2-135m-instruct/grpo/gsm8k.yaml \
    --train_data "$OUT_DIR/train.jsonl" --eval_data "$OUT_DIR/eval.jsonl" --max_eval_examples 8 --max_steps 5 \
    --rewards exact_match:last_number --reward_weights 1.0 --max_completion_length 32 --num_generate 4 \
    --overwrite_output_dir true --name_or_path "$OUT_DIR/tiny" --output_dir "$OUT_DIR/runs/grpo" --bf16 true
# Candidates for llmft's GPU defaults (today TRL's: padded batches, checkpointing, SDPA), each against them.
step sft_gpu_levers 300 env SFT_BENCH_BATCH=16 $PY benchmarks/sft_throughput.py --model "$OUT_DIR/llama-0.5b" --train-file "$OUT_DIR/speed_train.jsonl" \
    --eval-file "$OUT_DIR/speed_eval.jsonl" --steps 6 --methods lora full --configs llmft llmft-no-ckpt llmft-liger
cat "$SUMMARY"
