# lightning_merge developer entry points. Fresh machine: `make test` and `make demo`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-all parity lint bench demo clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch==2.13.0
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev,parity]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything, slow suites and the mergekit parity extra included.
test-all: $(STAMP)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev,parity]"
	$(BIN)/python -m pytest -q -m "slow or not slow"

parity: $(STAMP)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev,parity]"
	$(BIN)/python -m pytest -q -m parity

lint: $(STAMP)
	$(BIN)/ruff check lightning_merge tests benchmarks

bench: $(STAMP)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev,parity]"
	$(BIN)/python benchmarks/merge_speed.py

demo: $(STAMP)
	$(BIN)/python -m lightning_merge.demo

clean:
	rm -rf $(VENV) build *.egg-info
