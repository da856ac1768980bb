# stockade — `make help` lists the targets.
PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# What the service and the tests need from Debian: python3-dev, gcc and pkg-config build
# the LXC bindings against lxc-dev; lxc-templates and debootstrap make the sandbox image;
# nginx-light is the reverse proxy.
APT_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libseccomp2 make \
	ca-certificates lxc lxc-templates lxc-dev debootstrap uidmap nginx-light

.DEFAULT_GOAL := help
.PHONY: help packages install run sandbox-image test lint bench soak clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/stockade: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,preload,runner]'
	@touch $@

install: $(BIN)/stockade ## Create .venv with stockade, numpy/pandas preloads and dev tools.

packages: ## Install the Debian packages the service and the tests need, if missing (root).
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; fi

run: packages install ## Build the sandbox image if needed, then serve on 127.0.0.1:8080 (root).
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
