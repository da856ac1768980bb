# stockade — `make help` lists the targets.
PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run sandbox-image test lint bench soak clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/stockade: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,preload,runner]'
	@touch $@

install: $(BIN)/stockade ## Create .venv with stockade, numpy/pandas preloads and dev tools.

run: install ## Build the sandbox image if needed, then serve on 127.0.0.1:8080 (root).
	$(BIN)/stockade serve $(if $(LISTEN),--listen $(LISTEN))

sandbox-image: install ## Build (or check) the sandbox container image (root).
	$(BIN)/stockade images build

test: install ## Run the test suite (needs root: real namespaces, cgroups, seccomp).
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install ## ruff and mypy.
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: install ## Latency, throughput and memory vs bare interpreter spawns (not a test).
	$(BIN)/python bench/bench_sandbox.py
	$(BIN)/python bench/bench_http.py

soak: install ## 10 minutes of mixed good and hostile load; checks nothing grows (not in CI).
	$(BIN)/python bench/soak.py $(if $(SOAK_S),--seconds $(SOAK_S))

clean: ## Remove the venv and caches.
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
