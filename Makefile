# stockade — `make help` lists the targets.
PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# What the service and the tests need from Debian: python3-dev, gcc and pkg-config build
# the LXC bindings against lxc-dev; lxc-templates and debootstrap make the sandbox image;
# nginx-light is the reverse proxy; dnsmasq-base and nftables run lxc-net's bridge, which
# the Molecule scenarios' containers are reached on with the ssh client; packer builds the
# images.
APT_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libseccomp2 make \
	ca-certificates lxc lxc-templates lxc-dev debootstrap uidmap nginx-light \
	openssh-client dnsmasq-base nftables packer
# Molecule scenarios, in the order `make molecule` runs them.
SCENARIOS ?= hardening runner

.DEFAULT_GOAL := help
.PHONY: help packages install run sandbox-image dist test test-python molecule lint bench \
	soak clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/stockade: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,preload,runner,ops]'
	@touch $@

install: $(BIN)/stockade ## Create .venv: stockade, numpy/pandas preloads, dev and ops tools.

packages: ## Install the Debian packages the service and the tests need, if missing (root).
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; fi

run: packages install sandbox-image ## Build the sandbox image if needed, then serve on 127.0.0.1:8080 (root).
	$(BIN)/stockade serve $(if $(LISTEN),--listen $(LISTEN))

# Packer (lxc builder, provisioned by ansible/sandbox.yml) builds the rootfs; stockade
# checks it carries this checkout's sandbox code, shifts it into the containers' uid range,
# installs it for the runner here and archives it under images/ for other hosts.
sandbox-image: install ## Build the sandbox image with Packer unless it is current (FORCE=1: anyway).
	@if [ -z "$(FORCE)" ] && $(BIN)/stockade images status; then :; else \
		start=$$(date +%s) && rm -rf build/sandbox && \
		{ lxc-destroy --force --name stockade-packer-sandbox >/dev/null 2>&1 || true; } && \
		$(BIN)/stockade images stage --output build/sandbox/stage >/dev/null && \
		PATH=$(CURDIR)/$(BIN):$$PATH packer build -color=false \
			-var stage=$(CURDIR)/build/sandbox/stage -var output=$(CURDIR)/build/sandbox/out \
			packer/sandbox.pkr.hcl >build/sandbox/packer.log 2>&1 \
			|| { tail -40 build/sandbox/packer.log; exit 1; } && \
		$(BIN)/stockade images import-rootfs --force build/sandbox/out/rootfs.tar.gz && \
		rm -f images/$$($(BIN)/stockade images status | cut -d' ' -f3).tar.gz* && \
		rm -rf build/sandbox && \
		{ rmdir /sys/fs/cgroup/lxc.pivot /sys/fs/cgroup/*/lxc.pivot 2>/dev/null || true; } && \
		echo "sandbox-image: built in $$(( $$(date +%s) - start )) s"; fi
	@mkdir -p images && archive=$$($(BIN)/stockade images export --output images) && \
		(cd images && sha256sum "$${archive##*/}" > "$${archive##*/}.sha256") && \
		echo "sandbox-image: $$archive (sha256 in $${archive##*/}.sha256)"

dist: install sandbox-image ## The runner's wheels and the sandbox image archive, for Ansible (root).
	rm -rf dist/wheelhouse
	$(BIN)/pip wheel --quiet --disable-pip-version-check --use-pep517 --wheel-dir dist/wheelhouse '.[runner]'
	@archive=$$($(BIN)/stockade images export --output dist) && echo "dist: $$archive" && \
		find dist -maxdepth 1 -name 'stockade-sandbox-*.tar.gz' ! -path "$$archive" -delete

test: test-python molecule ## Every test: the pytest suite, then the Molecule scenarios (root).

test-python: install sandbox-image ## The pytest suite (root: real namespaces, cgroups, seccomp, LXC, nginx).
	$(BIN)/pytest $(PYTEST_ARGS)

molecule: packages dist ## Molecule scenarios: hosts built by the roles, checked by testinfra.
	@for scenario in $(SCENARIOS); do \
		start=$$(date +%s); \
		PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/molecule test -s $$scenario || exit 1; \
		echo "molecule: $$scenario passed in $$(( $$(date +%s) - start )) s"; \
	done

lint: install ## ruff, mypy, ansible-lint (production profile), packer validate.
	$(BIN)/ruff check src tests bench molecule
	$(BIN)/mypy
	cd ansible && PATH=$(CURDIR)/$(BIN):$$PATH ../$(BIN)/ansible-lint --profile production \
		site.yml image.yml sandbox.yml ../roles ../molecule
	PATH=$(CURDIR)/$(BIN):$$PATH packer validate -var stage=/nonexistent -var output=/nonexistent \
		packer/sandbox.pkr.hcl

bench: install ## Latency, throughput and memory vs bare interpreter spawns (not a test).
	$(BIN)/python bench/bench_sandbox.py
	$(BIN)/python bench/bench_http.py

soak: install ## 10 minutes of mixed good and hostile load; checks nothing grows (not in CI).
	$(BIN)/python bench/soak.py $(if $(SOAK_S),--seconds $(SOAK_S))

clean: ## Remove the venv and caches.
	rm -rf $(VENV) build dist images .pytest_cache .mypy_cache .ruff_cache
