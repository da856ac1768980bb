# stockade — `make help` lists the targets.
PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test lint bench clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/stockade: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,preload,runner]'
	@touch $@

install: $(BIN)/stockade ## Create .venv with stockade, numpy/pandas preloads and dev tools.

test: install ## Run the test suite (needs root: real namespaces, cgroups, seccomp).
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install ## ruff and mypy.
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: install ## Latency, throughput and memory vs bare interpreter spawns (not a test).
	$(BIN)/python bench/bench_sandbox.py

clean: ## Remove the venv and caches.
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
