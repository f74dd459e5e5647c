# Dev loop. `make demo` and `make test` set everything up on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/toy.yaml
TORCH := 2.13.0
LOCK := requirements/lock.txt
NO_DEPS := requirements/no-deps.txt
LOCK_VENV := .lock-venv

.PHONY: install lock demo test bench clean

install: $(STAMP)

# Idempotent: the stamp is refreshed only when pyproject.toml or the lock changes.
# Every package comes at the version in $(LOCK) (a constraints file), so a fresh machine gets
# the versions CI passed with. On a machine without CUDA, torch (the CPU build) goes in first,
# so no later requirement can pull a CUDA build of torch.
$(STAMP): pyproject.toml $(LOCK) $(NO_DEPS)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q -c $(LOCK) torch; fi
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]"
	$(BIN)/pip install -q -c $(LOCK) --no-deps -r $(NO_DEPS)
	touch $(STAMP)

# Refresh the lock on purpose: resolve the newest versions pyproject.toml allows in a fresh
# venv (torch pinned), then freeze it. Commit the new lock once `make test` passes with it.
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q torch==$(TORCH)
	$(LOCK_VENV)/bin/pip install -q -e ".[test]"
	$(LOCK_VENV)/bin/pip install -q --no-deps -r $(NO_DEPS)
	{ sed -n '/^#/p' $(LOCK); $(LOCK_VENV)/bin/pip freeze --exclude-editable \
	  | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

demo: install
	$(BIN)/backtrack run --config $(RECIPE)

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) runs
