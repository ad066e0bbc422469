# Nix targets; the top-level Makefile includes this file (`make -f nix.mk
# TARGET` works on its own too).
#
#   make claude            build the flavor (result-claude/bin/claude-microvm)
#   make claude.run        run it on WORK_DIR (default: the current directory)
#   (every flavor of lib/flavors.nix likewise: `make agents` lists them;
#   ENABLE_CRI=docker,... selects the -cri flavor)
#   make nix-test          builtins-only Nix tests + the runner's schema on their specs
#   make eval-modules LIB=DIR MICROVM=DIR
#                          evalModules over microvm.nix's real options for
#                          every flavor (scripts/setup-nix-eval prepares DIRs)
#
# Passed through to the run when set: WORK_DIR, WORK_WORKTREE, AGENT_HOME, DIRENV_ALLOW,
# ENABLE_CRI; ARGS= goes to the agent (after --: `nix run` takes the first
# -- itself, so the runner gets `-- ARGS`).

NIX ?= nix
NIX_FLAGS ?= --extra-experimental-features 'nix-command flakes'
NIX_INSTANTIATE ?= nix-instantiate
PY ?= python3
NIX_SPEC_DIR ?= build/nix-specs
EVAL_DIR ?= build/eval-modules
ARGS ?=

# The tests' own Nix configuration (tests/support/nixenv.py says why): no
# machine's /etc/nix is read, so a fresh machine needs none.
NIX_TEST_ENV = NIX_CONF_DIR=$(CURDIR)/tests/support/nix-conf NIX_USER_CONF_FILES=

# The flavors' names, read from lib/flavors.nix (none without Nix).
AGENTS := $(shell $(NIX_TEST_ENV) $(NIX_INSTANTIATE) --eval --json -E 'builtins.attrNames (import $(CURDIR)/lib/flavors.nix)' 2>/dev/null | tr -d '[]"' | tr , ' ')

# The -cri flavor carries the container runtimes ENABLE_CRI starts.
nix_flavor = $(1)$(if $(ENABLE_CRI),-cri)
quote = '$(subst ','\'',$(1))'
run_env = $(foreach v,WORK_DIR WORK_WORKTREE AGENT_HOME DIRENV_ALLOW ENABLE_CRI,$(if $($(v)),$(v)=$(call quote,$($(v)))))

.PHONY: $(AGENTS) $(AGENTS:%=%.run) agents nix-test eval-modules

agents:
	@echo $(or $(AGENTS),"agents: none found ($(NIX_INSTANTIATE) reads lib/flavors.nix)")

ifneq ($(AGENTS),)
$(AGENTS): %:
	$(NIX) $(NIX_FLAGS) build .#$(call nix_flavor,$*) --out-link result-$*

$(AGENTS:%=%.run): %.run:
	$(run_env) $(NIX) $(NIX_FLAGS) run .#$(call nix_flavor,$*) -- $(if $(ARGS),-- $(ARGS))
endif

nix-test:
	@command -v $(NIX_INSTANTIATE) >/dev/null || { \
	  echo "nix-test: $(NIX_INSTANTIATE) not found (Debian: apt-get install nix-bin)" >&2; exit 1; }
	$(NIX_TEST_ENV) NIX_INSTANTIATE=$(NIX_INSTANTIATE) tests/nix/run --emit-spec $(NIX_SPEC_DIR)
	PYTHONPATH=runner/src $(PY) tests/nix/validate_specs.py $(NIX_SPEC_DIR)

eval-modules:
	@if [ -z "$(LIB)" ] || [ -z "$(MICROVM)" ]; then \
	  echo "eval-modules: skipped: needs LIB=<nixpkgs or nixpkgs.lib checkout> MICROVM=<microvm.nix checkout>"; \
	  echo "              (scripts/setup-nix-eval prepares both and a Nix >= 2.18)"; \
	  exit 0; \
	fi; \
	PY=$(PY) scripts/eval-modules "$(LIB)" "$(MICROVM)" $(EVAL_DIR) && tests/nix/flake-offline "$(LIB)"
