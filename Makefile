# Two commands on a fresh clone: `make serve` and `make test`. Both create .venv and install Diptych first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so the wide range in pyproject.toml resolves to it instead of pulling a
# multi-GB CUDA build. GPU users: `make TORCH_SPEC=torch==2.11.0 ...` or any build they already use.
TORCH_SPEC ?= torch==2.13.0
SERVE_ARGS ?=

.PHONY: install serve test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,plots]"
	touch $@

serve: install
	$(BIN)/diptych serve $(SERVE_ARGS)

# Lint, then type-check, then the tests; the first that fails stops `make test`.
test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
