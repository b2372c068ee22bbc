# Two commands from a fresh clone: `make demo` (the whole DVC pipeline) and `make test` (lint + tests).
# Both create .venv and install kdcache into it when needed (again whenever pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
# DVC stages and the tests' subprocesses run `python` and `dvc`: the venv's, as if it were activated
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test lint env

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]"
	touch $@

env: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m dvc repro

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
