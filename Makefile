# stockade — `make help` lists the targets.
PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# What the service and the tests need from Debian: python3-dev, gcc and pkg-config build
# the LXC bindings against lxc-dev; lxc-templates and debootstrap make the sandbox image;
# nginx-light is the reverse proxy; dnsmasq-base and nftables run lxc-net's bridge, which
# the Molecule scenarios' containers are reached on with the ssh client; packer builds the
# images; fdisk (sfdisk) and qemu-utils make the host image's disk, qemu-system-x86 boots
# it for the image test; catatonit is every run's init (`stockade exec` and the tests run
# zygotes on this host).
APT_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libseccomp2 make \
	ca-certificates lxc lxc-templates lxc-dev debootstrap uidmap nginx-light \
	openssh-client dnsmasq-base nftables packer fdisk qemu-utils qemu-system-x86 catatonit
# The host image: stamped with the version, the commit and the build time
# (SOURCE_DATE_EPOCH, when set, fixes the last for a reproducible stamp).
HOST_IMAGE_DIR := images/host
GIT_COMMIT = $(shell git rev-parse HEAD)$(shell git diff --quiet HEAD -- || echo -dirty)
BUILD_TIME = $(shell date -u -d @$${SOURCE_DATE_EPOCH:-$$(date +%s)} +%Y-%m-%dT%H:%M:%SZ)
# Molecule scenarios, in the order `make molecule` runs them.
SCENARIOS ?= hardening runner

.DEFAULT_GOAL := help
.PHONY: help packages install run sandbox-image dist image host-image image-test roll roll-test test \
	test-python molecule lint bench soak clean

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

# Packer's lxc builder provisions a Debian container with ansible/image.yml and exports its
# rootfs; scripts/rootfs-to-qcow2 makes that a bootable disk. Artifacts, with SHA256SUMS
# and manifest.json, go to images/host/.
image: packages dist ## Build both images: the sandbox's (images/) and the host's qcow2 (images/host/) (root).
	@start=$$(date +%s) && version=$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("stockade"))') && \
		commit='$(GIT_COMMIT)' && built='$(BUILD_TIME)' && \
		rm -rf build/host $(HOST_IMAGE_DIR) && mkdir -p build/host && \
		{ lxc-destroy --force --name stockade-packer-host >/dev/null 2>&1 || true; } && \
		PATH=$(CURDIR)/$(BIN):$$PATH packer build -color=false -only=lxc.host \
			-var wheelhouse=$(CURDIR)/dist/wheelhouse \
			-var sandbox_archive=$$(ls $(CURDIR)/dist/stockade-sandbox-*.tar.gz) \
			-var output=$(CURDIR)/build/host/out -var version=$$version \
			-var commit=$$commit -var build_time=$$built \
			packer/host.pkr.hcl >build/host/packer.log 2>&1 \
			|| { tail -60 build/host/packer.log; exit 1; } && \
		{ rmdir /sys/fs/cgroup/lxc.pivot /sys/fs/cgroup/*/lxc.pivot 2>/dev/null || true; } && \
		mkdir -p $(HOST_IMAGE_DIR) && \
		mv build/host/out/stockade-host.qcow2 build/host/out/rootfs.tar.gz \
			build/host/out/packages.txt $(HOST_IMAGE_DIR)/ && \
		tar -xzOf $(HOST_IMAGE_DIR)/rootfs.tar.gz ./rootfs/etc/stockade-release \
			> $(HOST_IMAGE_DIR)/stockade-release && \
		packer/scripts/write-manifest $(HOST_IMAGE_DIR) $$version $$commit $$built && \
		rm -rf build/host && \
		echo "image: built in $$(( $$(date +%s) - start )) s" && \
		echo "image: sandbox $$(ls $(CURDIR)/images/stockade-sandbox-*.tar.gz)" && \
		for f in $(HOST_IMAGE_DIR)/*; do echo "image: host    $(CURDIR)/$$f"; done

# What the image test and the rolling test use: rebuilt unless images/host was built from
# this very commit (a tree with changes always rebuilds).
host-image:
	@if grep -qs '"commit": "$(GIT_COMMIT)"' $(HOST_IMAGE_DIR)/manifest.json && \
		! echo '$(GIT_COMMIT)' | grep -q dirty; then echo "image: $(HOST_IMAGE_DIR) is current"; \
	else $(MAKE) --no-print-directory image; fi

image-test: install host-image ## Boot the host image under qemu (TCG) and run the host testinfra suite on it (root).
	@start=$$(date +%s) && PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python molecule/image/boot_and_test.py \
		--image-dir $(HOST_IMAGE_DIR) && echo "image-test: passed in $$(( $$(date +%s) - start )) s"

# INVENTORY lists the hosts (group stockade_fleet, each with rolling_address) and the load
# balancer's variables; IMAGE is the new host image (see the README, "Rolling replacement").
roll: install ## Replace every host of INVENTORY with IMAGE, a canary first (ansible/rolling_replace.yml).
	@test -n "$(INVENTORY)" -a -n "$(IMAGE)" || { echo "usage: make roll INVENTORY=FILE IMAGE=PATH"; exit 2; }
	cd ansible && PATH=$(CURDIR)/$(BIN):$$PATH ../$(BIN)/ansible-playbook -i $(abspath $(INVENTORY)) \
		rolling_replace.yml -e rolling_image=$(abspath $(IMAGE))

roll-test: install host-image ## 3 LXC hosts from the host image behind nginx, rolled out under load (root).
	@start=$$(date +%s) && PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -p no:cacheprovider \
		--rootdir molecule -s molecule/rolling && \
		echo "roll-test: passed in $$(( $$(date +%s) - start )) s"

test: test-python molecule image-test roll-test ## Every test: pytest, Molecule, the host image's VM and rollout tests (root).

test-python: install sandbox-image ## The pytest suite (root: real namespaces, cgroups, seccomp, LXC, nginx).
	$(BIN)/pytest $(PYTEST_ARGS)

molecule: packages dist ## Molecule scenarios: hosts built by the roles, checked by testinfra.
	@for scenario in $(SCENARIOS); do \
		start=$$(date +%s); \
		PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/molecule test -s $$scenario || exit 1; \
		echo "molecule: $$scenario passed in $$(( $$(date +%s) - start )) s"; \
	done

lint: install ## ruff, mypy, ansible-lint (production profile), packer validate.
	$(BIN)/ruff check src tests bench molecule packer/scripts/write-manifest
	$(BIN)/mypy
	cd ansible && PATH=$(CURDIR)/$(BIN):$$PATH ../$(BIN)/ansible-lint --profile production \
		site.yml image.yml sandbox.yml rolling_replace.yml lxc_fleet.yml ../roles ../molecule
	PATH=$(CURDIR)/$(BIN):$$PATH packer validate -var stage=/nonexistent -var output=/nonexistent \
		packer/sandbox.pkr.hcl
	PATH=$(CURDIR)/$(BIN):$$PATH packer validate -var wheelhouse=/nonexistent \
		-var sandbox_archive=/nonexistent -var output=/nonexistent -var version=0 \
		-var commit=0 -var build_time=1970-01-01T00:00:00Z packer/host.pkr.hcl

bench: install ## Latency, throughput and memory vs bare interpreter spawns (not a test).
	$(BIN)/python bench/bench_sandbox.py
	$(BIN)/python bench/bench_http.py
	$(BIN)/python bench/bench_layers.py

soak: install ## 10 minutes of mixed good and hostile load; checks nothing grows (not in CI).
	$(BIN)/python bench/soak.py $(if $(SOAK_S),--seconds $(SOAK_S))

clean: ## Remove the venv and caches.
	rm -rf $(VENV) build dist images .pytest_cache .mypy_cache .ruff_cache
