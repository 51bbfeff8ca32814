# Quick start: `make demo` runs the demo, `make test` runs the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit bench deb clean

$(VENV)/.installed: pyproject.toml .ci/venv.py
	$(PYTHON) .ci/venv.py $(VENV) test
	touch $@

demo: $(VENV)/.installed
	$(BIN)/imdsd demo --duration 40

lint: $(VENV)/.installed
	$(BIN)/ruff check imdsd tests bench .ci
	$(BIN)/ruff format --check imdsd tests bench .ci

typecheck: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/pytest -q

test: lint typecheck unit

bench: $(VENV)/.installed
	$(BIN)/python bench/run.py --quick

deb:
	packaging/build-deb

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
