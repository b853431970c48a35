# Quick start: `make demo` and `make test`. Both build their own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test test-slow lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.demo: $(BIN)/python pyproject.toml
	$(PIP) install --quiet -e '.[flask]'
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(PIP) install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.demo
	$(BIN)/alchq demo --database alchq-demo.sqlite

lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(VENV)/.test
	$(BIN)/mypy src tests benchmarks

test: lint typecheck
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) alchq-demo.sqlite* .mypy_cache .ruff_cache .pytest_cache

bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.throughput
