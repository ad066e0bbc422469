# agent-microvm: developer and CI entry points.  `make help` lists them.
#
# Set-up on a fresh Debian/Ubuntu machine (as root):  make setup
# Tests (unit, Nix, integration with real VMs):       make test

# AMVM_TEST_PREFIX (as scripts/setup-host and the tests read it) moves the
# whole test prefix, venv included: one per checkout that tests side by side.
PREFIX ?= $(or $(AMVM_TEST_PREFIX),/opt/agent-microvm-test)
VENV ?= $(PREFIX)/venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Python scripts without a .py name: ruff and mypy check them too.
SCRIPTS := tests/guest-systemd/render tests/host-network/render bench/runner_overhead bench/devshell_hit \
  bench/idle_memory bench/relay_memory bench/share_restore bench/git_status bench/check_eval \
  bench/startup bench/fs bench/scaling
LINT_PATHS := runner tests $(SCRIPTS)

.PHONY: help setup venv test lint unit unit-sandboxed integration nix-test-all bench ci-fresh

help:
	@echo "make setup        install host prerequisites and the test venv (root; Debian)"
	@echo "make test         lint + unit + Nix logic + integration tests (real VMs under TCG)"
	@echo "make unit         fast tests of the runner's pure parts"
	@echo "make unit-sandboxed  tests/unit in a copy of the Nix build sandbox (bubblewrap)"
	@echo "make integration  real QEMU + virtiofsd + the busybox test guest"
	@echo "make bench        print the bench/ tables"
	@echo "make ci-fresh     rehearse CI: .ci/run on a clean clone in a bare bookworm root (root)"
	@echo "make claude.run   run Claude Code on WORK_DIR (Nix host; every flavor: make agents)"

setup:
	scripts/setup-host
	$(MAKE) venv

# A venv outside the repo and readable by everyone: the integration tests run
# microvm-run as an unprivileged user, who cannot read root's Python.
# The stamp records which checkout the editable install points at: a second
# clone (CI on a reused machine) must not test the first one's code.
venv:
	@if [ "$$(cat $(VENV)/.installed 2>/dev/null)" != "$(CURDIR)" ] || \
	    [ runner/pyproject.toml -nt $(VENV)/.installed ]; then \
	  set -e; \
	  echo "venv: installing into $(VENV) from $(CURDIR)"; \
	  /usr/bin/python3 -m venv $(VENV); \
	  $(VENV)/bin/pip install --quiet --upgrade pip; \
	  $(VENV)/bin/pip install --quiet -e 'runner[test]' ruff; \
	  chmod -R a+rX $(VENV); \
	  echo "$(CURDIR)" > $(VENV)/.installed; \
	fi

# mypy takes the scripts one at a time: each is a module named __main__.
lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	cd runner && $(VENV)/bin/mypy src ../tests
	cd runner && for script in $(SCRIPTS); do $(VENV)/bin/mypy --no-error-summary ../$$script || exit 1; done

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# pkgs/microvm-run.nix runs tests/unit in the Nix build sandbox (no /usr/bin,
# no /bin/bash, no HOME, no network): every flavor's build depends on it.
unit-sandboxed: venv
	VENV=$(VENV) scripts/unit-sandboxed $(PYTEST_ARGS)

integration: venv
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test: lint venv
	$(MAKE) nix-test
	$(MAKE) unit-sandboxed PYTEST_ARGS=
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(PY) bench/runner_overhead
	@if [ -x bench/devshell_hit ]; then $(PY) bench/devshell_hit; fi
	$(PY) bench/idle_memory
	$(PY) bench/relay_memory
	$(PY) bench/share_restore
	$(PY) bench/git_status
	$(PY) bench/check_eval
	$(PY) bench/startup
	$(PY) bench/fs
	$(PY) bench/scaling

ci-fresh:
	scripts/ci-fresh

-include nix.mk
