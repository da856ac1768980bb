# stockade — `make help` lists the targets.
PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# What serving needs from Debian (`make run`): python3-dev, gcc and pkg-config build the
# LXC bindings against lxc-dev; lxc-templates, debootstrap, rsync and distro-info make the
# sandbox image's rootfs (LXC's debian template copies its cache with rsync and names the
# security suite with debian-distro-info); packer builds it; uidmap maps the containers'
# uids; apparmor loads the pool's profile where the kernel enforces AppArmor; catatonit is
# every run's init (`stockade exec` runs zygotes on this host).
SERVE_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libseccomp2 make \
	ca-certificates lxc lxc-templates lxc-dev debootstrap rsync distro-info uidmap \
	apparmor packer catatonit
# What the tests add (`make test`): nginx-light is the reverse proxy; dnsmasq-base and
# nftables run lxc-net's bridge, which the Molecule scenarios' containers and the fresh
# machine are reached on with the ssh client; fdisk (sfdisk) and qemu-utils make the host
# image's disk, qemu-system-x86 boots it; git clones the checkout for the fresh machine,
# openssl gives its bridge port an address (LXC's debian template); prometheus brings
# promtool, which checks the alert rules under ops/; chromium and chromium-driver are the
# real browser the playground's tests drive; nodejs runs the TypeScript client's tests.
TEST_PACKAGES := nginx-light openssh-client dnsmasq-base nftables fdisk qemu-utils \
	qemu-system-x86 git openssl prometheus chromium chromium-driver nodejs
# The venv: serving (the runner, the preloads, Ansible for the image build), then the tests.
SERVE_EXTRAS := runner,preload,build,mcp
TEST_EXTRAS := $(SERVE_EXTRAS),dev,ops
LOGS := build/logs
STEP := tools/step
# The host image: stamped with the version, the commit and the build time
# (SOURCE_DATE_EPOCH, when set, fixes the last for a reproducible stamp).
HOST_IMAGE_DIR := images/host
GIT_COMMIT = $(shell git rev-parse HEAD)$(shell git diff --quiet HEAD -- || echo -dirty)
BUILD_TIME = $(shell date -u -d @$${SOURCE_DATE_EPOCH:-$$(date +%s)} +%Y-%m-%dT%H:%M:%SZ)
# Molecule scenarios, in the order `make molecule` runs them.
SCENARIOS ?= hardening runner
# What needs the wheels and archives rebuilds them first (`make dist`); `make test` builds
# them once and then passes DIST= so that no two of its lanes rebuild what another reads.
DIST ?= dist

.DEFAULT_GOAL := help
.PHONY: help packages test-packages install install-test apt doctor apparmor run sandbox-image dist \
	lock environment \
	image host-image image-test roll roll-test test test-python molecule fresh-test lint bench \
	bench-smoke \
	soak uninstall clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# The venv, in two layers: stamps say which extras it has.
$(VENV)/.serve: pyproject.toml
	@$(STEP) "creating .venv: stockade, the runner, numpy/pandas, Ansible" "~1 min" \
		$(LOGS)/venv.log "rm -rf $(VENV) && make install" -- sh -c '$(PYTHON) -m venv $(VENV) && \
		$(BIN)/pip install --disable-pip-version-check -e ".[$(SERVE_EXTRAS)]"'
	@touch $@

$(VENV)/.test: $(VENV)/.serve
	@$(STEP) "adding the test kit to .venv: pytest, Molecule, linters" "~1 min" \
		$(LOGS)/venv-test.log "make install-test" -- \
		$(BIN)/pip install --disable-pip-version-check -e ".[$(TEST_EXTRAS)]"
	@touch $@

# The pages' browser libraries (Swagger UI for /docs), from the npm registry, each checked
# against the sha512 pinned in vendor.json; no Node.js needed.
STATIC := src/stockade/runner/front/static
VENDORED := $(STATIC)/vendor/swagger-ui/.integrity
$(VENDORED): $(STATIC)/vendor.json tools/vendor
	@$(PYTHON) tools/vendor $(STATIC)

install: $(VENV)/.serve $(VENDORED) ## Create .venv with what serving needs (stockade, the runner, preloads, Ansible).

# The TypeScript client's build tool (typescript, pinned with its integrity in the lock).
# npm comes with Node.js where Node.js is NodeSource's; Debian packages it apart.
JS := clients/js
$(JS)/node_modules/.package-lock.json: $(JS)/package-lock.json
	@command -v npm >/dev/null || $(MAKE) --no-print-directory apt APT_LIST=npm
	@$(STEP) "installing the TypeScript client's build tool (npm ci)" "~10 s" \
		$(LOGS)/npm.log "make install-test" -- npm ci --prefix $(JS) --no-audit --no-fund

install-test: $(VENV)/.test $(JS)/node_modules/.package-lock.json ## Add the test kit: pytest, linters, Molecule, testinfra; TypeScript.

packages: ## Install the Debian packages serving needs, if missing (root).
	@$(MAKE) --no-print-directory apt APT_LIST="$(SERVE_PACKAGES)"

test-packages: ## Install the Debian packages the tests add, if missing (root).
	@$(MAKE) --no-print-directory apt APT_LIST="$(SERVE_PACKAGES) $(TEST_PACKAGES)"

apt:
	@missing=$$(for p in $(APT_LIST); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "==> Debian packages to install:" $$missing; \
		$(STEP) "installing $$(echo $$missing | wc -w) Debian packages" \
		"~1-3 min" $(LOGS)/apt.log "apt-get install $$(echo $$missing)" -- sh -c \
		'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
		--no-install-recommends '"$$(echo $$missing)"; fi

doctor: install ## Check that this host can serve and build the sandbox image.
	@PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/stockade doctor $(if $(LISTEN),--listen $(LISTEN))

# Where the kernel enforces AppArmor, pool containers need stockade's profile loaded.
apparmor: ## Load the pool's AppArmor profile where the kernel enforces AppArmor (root).
	@if [ "$$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ]; then \
		install -m 0644 roles/lxc_host/files/stockade-sandbox /etc/apparmor.d/stockade-sandbox && \
		apparmor_parser -r /etc/apparmor.d/stockade-sandbox && \
		echo "apparmor: profile stockade-sandbox loaded"; fi

# On 127.0.0.1 (no LISTEN) anyone on this host may run code without a key; with LISTEN,
# callers need a key (`stockade keys add NAME`).
run: packages install apparmor doctor sandbox-image ## Set up what is missing, then serve on 127.0.0.1:8080 (root).
	@echo "==> serving on http://$(or $(LISTEN),127.0.0.1:8080) (Ctrl-C stops; make uninstall removes it all)"
	@$(if $(LISTEN),echo "==> callers need an API key: sudo $(BIN)/stockade keys add NAME",echo "==> anyone on this host may run code without a key (LISTEN=host:port requires keys)")
	$(BIN)/stockade serve $(if $(LISTEN),--listen $(LISTEN),--anonymous)

# Environments: one directory each under src/stockade/environments/ (ENVS=... picks some).
ENVS ?= $(sort $(notdir $(patsubst %/,%,$(dir $(wildcard src/stockade/environments/*/environment.toml)))))
ENV_FLAGS = $(foreach e,$(ENVS),--environment $(e))

# Packer (lxc builder, provisioned by ansible/sandbox.yml) builds each environment's rootfs;
# stockade checks it carries this checkout's sandbox code and the environment's locked
# packages, shifts it into the containers' uid range, installs it for the runner here and
# archives it under images/ for other hosts (older archives of the same environments there
# are removed).
sandbox-image: install ## Build each environment's sandbox image with Packer unless current (FORCE=1: anyway; ENVS=...).
	@if [ -z "$(FORCE)" ] && $(BIN)/stockade images status $(ENV_FLAGS) >/dev/null; then :; else \
		$(STEP) "building the sandbox images with Packer: $(ENVS)" \
			"~3 min each; ~4 min the first of a Debian release" $(LOGS)/sandbox-image.log \
			"make sandbox-image FORCE=$(FORCE) ENVS='$(ENVS)' STEP_VERBOSE=1 PACKER_LOG=1" \
			-- packer/scripts/build-sandbox-image $(BIN) $(ENVS); fi
	@mkdir -p images && archives=" $$(echo $$($(BIN)/stockade images export --output images \
		$(ENV_FLAGS))) " && for a in $$archives; do (cd images && sha256sum "$${a##*/}" > \
			"$${a##*/}.sha256") && echo "sandbox-image: $$a (sha256 in $${a##*/}.sha256)"; done && \
		for old in $(foreach e,$(ENVS),images/stockade-sandbox-$(e)-????????????.tar.gz); do \
			case "$$archives" in *" $$old "*|*"*"*) ;; *) rm -f "$$old" "$$old.sha256";; esac; done

# Adding an environment: a directory with its environment.toml, then `make environment`.
lock: install ## Write ENV's hash-locked requirements.lock from its package set (PyPI).
	@test -n "$(ENV)" || { echo "usage: make lock ENV=NAME"; exit 2; }
	@$(BIN)/stockade images lock --environment $(ENV)

environment: install ## Lock ENV if it has no lock, then build its sandbox image (root).
	@test -n "$(ENV)" || { echo "usage: make environment ENV=NAME"; exit 2; }
	@test -f src/stockade/environments/$(ENV)/requirements.lock || $(MAKE) --no-print-directory lock ENV=$(ENV)
	@$(MAKE) --no-print-directory sandbox-image ENVS=$(ENV)

dist: install sandbox-image ## The runner's wheels and the sandbox images' archives, for Ansible (root).
	@rm -rf dist/wheelhouse
	@$(STEP) "building the runner's wheels for hosts" "~1 min" $(LOGS)/wheels.log \
		"make dist STEP_VERBOSE=1" -- $(BIN)/pip wheel --disable-pip-version-check \
		--use-pep517 --wheel-dir dist/wheelhouse '.[runner,mcp]'
	@archives=" $$(echo $$($(BIN)/stockade images export --output dist $(ENV_FLAGS))) " && \
		for a in $$archives; do echo "dist: $$a"; done && \
		for old in $(foreach e,$(ENVS),dist/stockade-sandbox-$(e)-????????????.tar.gz); do \
			case "$$archives" in *" $$old "*|*"*"*) ;; *) rm -f "$$old";; esac; done

# Packer's lxc builder provisions a Debian container with ansible/image.yml and exports its
# rootfs; scripts/rootfs-to-qcow2 makes that a bootable disk. Artifacts, with SHA256SUMS
# and manifest.json, go to images/host/.
image: test-packages $(DIST) ## Build both images: the sandbox's (images/) and the host's qcow2 (images/host/) (root).
	@$(STEP) "building the host image: Packer, Ansible, then a qcow2" "~5 min" \
		$(LOGS)/host-image.log "make image STEP_VERBOSE=1 PACKER_LOG=1" -- \
		packer/scripts/build-host-image $(BIN) $(HOST_IMAGE_DIR) '$(GIT_COMMIT)' '$(BUILD_TIME)' \
		$(ENVS)
	@for f in $(HOST_IMAGE_DIR)/*; do echo "image: $(CURDIR)/$$f"; done

# What the image test and the rolling test use: rebuilt unless images/host was built from
# this very commit (a tree with changes always rebuilds).
HOST_IMAGE ?= host-image
host-image:
	@if grep -qs '"commit": "$(GIT_COMMIT)"' $(HOST_IMAGE_DIR)/manifest.json && \
		! echo '$(GIT_COMMIT)' | grep -q dirty; then echo "image: $(HOST_IMAGE_DIR) is current"; \
	else $(MAKE) --no-print-directory image; fi

image-test: install-test $(HOST_IMAGE) ## Boot the host image under qemu (TCG) and run the host testinfra suite on it (root).
	@PATH=$(CURDIR)/$(BIN):$$PATH $(STEP) "image test: boot the host image under qemu, test it over ssh" \
		"~9 min" $(LOGS)/image-test.log "make image-test STEP_VERBOSE=1" -- \
		$(BIN)/python molecule/image/boot_and_test.py --image-dir $(HOST_IMAGE_DIR)

# INVENTORY lists the hosts (group stockade_fleet, each with rolling_address) and the load
# balancer's variables; IMAGE is the new host image (docs/operations.md, "Rolling replacement").
roll: install ## Replace every host of INVENTORY with IMAGE, a canary first (ansible/rolling_replace.yml).
	@test -n "$(INVENTORY)" -a -n "$(IMAGE)" || { echo "usage: make roll INVENTORY=FILE IMAGE=PATH"; exit 2; }
	cd ansible && PATH=$(CURDIR)/$(BIN):$$PATH ../$(BIN)/ansible-playbook -i $(abspath $(INVENTORY)) \
		rolling_replace.yml -e rolling_image=$(abspath $(IMAGE))

roll-test: install-test $(HOST_IMAGE) ## 3 LXC hosts from the host image behind nginx, rolled out under load (root).
	@PATH=$(CURDIR)/$(BIN):$$PATH $(STEP) "rolling test: a fleet of 3 hosts replaced under load" \
		"~15 min" $(LOGS)/roll-test.log "make roll-test STEP_VERBOSE=1" -- \
		$(BIN)/pytest -p no:cacheprovider --rootdir molecule -s molecule/rolling

# pytest alone (it holds timing assertions), then side by side what holds none: the Molecule
# scenarios beside the host image's build, then its VM test beside the rolling test.
test: test-packages install-test sandbox-image ## Every test: pytest, Molecule, the host image's VM and rollout tests (root).
	@tools/test-all

# pytest's own progress is the feedback: streamed, and kept in the log too.
test-python: test-packages install-test sandbox-image ## The pytest suite (root: real namespaces, cgroups, seccomp, LXC, nginx).
	@STEP_VERBOSE=1 $(STEP) "pytest: units, attacks, the runner end to end" "~2 min" \
		$(LOGS)/pytest.log "$(BIN)/pytest -x -k NAME_OF_THE_FAILED_TEST" -- $(BIN)/pytest $(PYTEST_ARGS)

# The scenarios share one base container with their packages: made by the first, removed
# after the last (and on failure), so no run starts from what an earlier one left;
# MOLECULE_KEEP_BASE=1 keeps it for a later `make molecule` of the same run.
molecule: test-packages install-test $(if $(filter runner,$(SCENARIOS)),$(DIST)) ## Molecule scenarios: hosts built by the roles, checked by testinfra.
	@status=0; for scenario in $(SCENARIOS); do \
		PATH=$(CURDIR)/$(BIN):$$PATH $(STEP) "molecule scenario $$scenario: converge, idempotence, verify" \
			"~3 min" $(LOGS)/molecule-$$scenario.log \
			"PATH=$(CURDIR)/$(BIN):\$$PATH molecule converge -s $$scenario && molecule login -s $$scenario" -- \
			$(BIN)/molecule test -s $$scenario || { status=1; break; }; \
	done; \
	if [ -z "$(MOLECULE_KEEP_BASE)" ] || [ $$status != 0 ]; then \
		for base in $$(lxc-ls -1 2>/dev/null | grep '^stockade-molecule-base-'); do \
			lxc-destroy --force --name $$base >/dev/null; done; fi; \
	exit $$status

# A pristine Debian 12 system container (nested LXC) gets a clean clone of HEAD and runs the
# README's set-up command; passes when /readyz answers and hello and pandas runs are ok.
fresh-test: test-packages ## Prove the README's set-up on a pristine Debian 12 (root).
	@$(PYTHON) tests/fresh/fresh_machine.py

lint: install-test ## ruff, mypy, ansible-lint (production profile), packer validate.
	$(BIN)/ruff check src tests bench molecule packer/scripts/write-manifest
	$(BIN)/mypy
	cd ansible && PATH=$(CURDIR)/$(BIN):$$PATH ../$(BIN)/ansible-lint --profile production \
		site.yml image.yml sandbox.yml rolling_replace.yml lxc_fleet.yml ../roles ../molecule
	PATH=$(CURDIR)/$(BIN):$$PATH packer validate -var stage=/nonexistent -var output=/nonexistent \
		packer/sandbox.pkr.hcl
	PATH=$(CURDIR)/$(BIN):$$PATH packer validate -var wheelhouse=/nonexistent \
		-var 'sandbox_archives=["/nonexistent"]' -var output=/nonexistent -var version=0 \
		-var commit=0 -var build_time=1970-01-01T00:00:00Z packer/host.pkr.hcl

bench: test-packages install ## Latency, throughput and memory vs bare interpreter spawns (not a test).
	$(BIN)/python bench/bench_sandbox.py
	$(BIN)/python bench/bench_http.py
	$(BIN)/python bench/bench_neighbours.py
	$(BIN)/python bench/bench_layers.py
	$(BIN)/python bench/bench_sessions.py
	$(BIN)/python bench/bench_environments.py

# Each bench's measuring phases at most 2 s: every bench runs to its end, prints every row
# and leaves nothing behind (bench/smoke.py). Targets are printed, never asserted.
bench-smoke: test-packages install sandbox-image ## Every bench briefly: each must end well and leave nothing (root).
	$(BIN)/python bench/smoke.py

soak: install ## 10 minutes of mixed good and hostile load; checks nothing grows (not in CI).
	$(BIN)/python bench/soak.py $(if $(SOAK_S),--seconds $(SOAK_S))

uninstall: ## Remove what `make run` set up: runner state, containers, user, subuid lines, caches (root).
	@tools/uninstall

clean: ## Remove the venv and caches.
	rm -rf $(VENV) build dist images .pytest_cache .mypy_cache .ruff_cache
