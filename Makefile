# Two commands on a fresh clone: `make serve` and `make test`. Both create .venv and install Diptych first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so the wide range in pyproject.toml resolves to it instead of pulling a
# multi-GB CUDA build. GPU users: `make TORCH_SPEC=torch==2.11.0 ...` or any build they already use; changing
# TORCH_SPEC later reinstalls torch (the install stamps depend on it).
TORCH_SPEC ?= torch==2.13.0
SERVE_ARGS ?=
PIP := $(BIN)/python -m pip install --disable-pip-version-check --progress-bar on

.PHONY: install install-test serve test test-slow clean FORCE

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Holds the TORCH_SPEC of the last install; rewritten (so newer than the install stamps) only when it changes.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH_SPEC)" ]; then echo "$(TORCH_SPEC)" > $@; fi

# Runtime only: what `diptych serve` and `diptych bench` need.
$(VENV)/.installed: pyproject.toml $(VENV)/.torch-spec
	@echo "==> creating $(VENV)"
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	@echo "==> installing $(TORCH_SPEC) (the largest download: a few minutes on a first install)"
	$(PIP) "$(TORCH_SPEC)"
	@echo "==> installing Diptych and its dependencies"
	$(PIP) -e .
	@touch $@
	@echo "==> installed"

# Adds the test and plot extras for `make test`.
$(VENV)/.installed-test: $(VENV)/.installed
	@echo "==> installing the test and plot extras"
	$(PIP) -e ".[test,plots]" "$(TORCH_SPEC)"
	@touch $@

serve: install
	$(BIN)/diptych serve $(SERVE_ARGS)

# Lint, then type-check, then the tests not marked slow; the first that fails stops `make test`.
test: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests: chaos (kill -9, SIGSTOP, overload), socket fuzzing, the README's snippets, the image's file list,
# experiments and CPU benchmarks on real processes. CI runs them after `make test`.
test-slow: install-test
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
