# Quick start: `make demo` and `make test`. Both build their own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test test-slow lint typecheck bench bench-large clean

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

# Four pytest workers, one test file each at a time (a file's tests share their
# servers and models); most tests wait on worker processes and timers, not the CPU.
XDIST ?= -n 4 --dist loadfile

# The 3-minute periodic-scheduler test mostly waits for ticks: it runs alongside
# the rest of the suite (its own pytest, its own PostgreSQL) to keep CI short.
test: lint typecheck
	@$(BIN)/python -m pytest -m "periodic3m and not slow" -p no:cacheprovider -q \
		> .periodic-test.log 2>&1 & bg=$$!; \
	$(BIN)/python -m pytest -m "not slow and not periodic3m" $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	wait $$bg; bgrc=$$?; \
	echo "--- the periodic-scheduler test, run alongside (exit $$bgrc) ---"; \
	tail -n 40 .periodic-test.log; \
	test $$rc -eq 0 && test $$bgrc -eq 0

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) alchq-demo.sqlite* .mypy_cache .ruff_cache .pytest_cache .periodic-test.log bench.json

# One table (also written to bench.json): enqueue, latency, drains against the
# bare driver's ceilings, memory. bench-large: 10,000,000 finished rows.
bench: $(VENV)/.test
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-large: $(VENV)/.test
	$(BIN)/python -m benchmarks --finished 10000000 $(BENCH_ARGS)
