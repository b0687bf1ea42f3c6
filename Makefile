# Two commands do all the set-up on a machine with only Python and pip:
#   make probe   create .venv on first use, install kvmscope, run `kvmscope probe`
#   make test    the same with the test extra, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: probe test lint bench where clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

probe: $(VENV)/.base
	$(VENV)/bin/kvmscope probe $(ARGS)

test: $(VENV)/.dev
	$(PY) -m pytest $(ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(VENV)/.dev
	$(PY) benchmarks/run.py $(ARGS)

where: $(VENV)/.dev
	$(PY) benchmarks/where_time_goes.py $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
