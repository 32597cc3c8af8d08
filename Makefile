# deepfleet: the two contract commands are `make lab` and `make test` (see README.md).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
# testinfra's ansible:// backend and ansible-playbook must come from the venv.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help deps venv lint test test-fast test-lab lab lab-down lab-status plan drill image image-test raid0-vm

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

.stamp/deps: scripts/install-deps.sh
	scripts/install-deps.sh
	@mkdir -p .stamp && touch $@

deps: .stamp/deps ## install system packages (apt; needs root)

$(VENV)/.installed: pyproject.toml runtime/pyproject.toml scripts/bootstrap-venv.sh
	scripts/bootstrap-venv.sh
	@touch $@

venv: $(VENV)/.installed ## create .venv with the toolkit, runtime and dev tools

lint: venv ## ruff, yamllint, ansible-lint (production profile)
	ruff check .
	yamllint -s .
	ansible-lint --profile production --offline roles/ playbooks/

test-fast: deps venv ## unit tests (no lab): runtime, Pulumi mocks, monitoring rules
	$(PY) -m pytest -m "not lab" -q

test-lab: deps venv ## lab end-to-end: bring up hosts, run site.yml twice, compliance, tear down
	$(PY) -m pytest -m lab -q -rs

test: lint test-fast test-lab ## everything that runs on this machine (CI runs this)

lab: deps venv ## bring up the local lab (HOSTS=N, default 2), configure it with playbooks/site.yml, run compliance
	$(PY) -m lab up $(if $(HOSTS),--hosts $(HOSTS))
	$(PY) -m lab converge

lab-down: ## remove everything the labs of this checkout made (the shared apt/rootfs cache stays)
	@if [ -x $(PY) ]; then $(PY) -m lab down --all; else echo "no venv: nothing to tear down"; fi

lab-status: ## show what the lab has up
	$(PY) -m lab status

plan: venv ## print the resource tree a Pulumi stack would create (STACK=aws|onprem|hybrid), no CLI needed
	$(PY) -m infra.plan $(or $(STACK),aws)

drill: venv ## failover drill on the running lab (make lab first): kill and hang a runtime host under load
	$(PY) bench/drill.py $(if $(SCENARIO),--scenario $(SCENARIO))

# Not part of `make test` (minutes of apt and pip work): the runtime's container image, built and served here.
image: venv ## build runtime/Dockerfile with buildah from a local Debian base and .wheelhouse (root; apt: buildah)
	scripts/build-image.sh

image-test: venv ## serve the tiny model from the built image (systemd-nspawn on its root filesystem), one request
	scripts/image-serve-test.sh

raid0-vm: venv ## storage_tiers' md RAID0 for real: qemu VM, Debian's kernel, two virtio disks, role + compliance (root)
	scripts/raid0-vm-proof.sh
