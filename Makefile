# The two commands a newcomer needs (see README.md):
#   make quickstart   set up, then run a short tuning study on the embedded default (offline)
#   make test         set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup quickstart test lint bench clean

$(BIN)/cnn3d-tune: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,dashboard]"
	touch $@

setup: $(BIN)/cnn3d-tune

quickstart: setup
	$(BIN)/cnn3d-tune --param transform.dropout --trials 4 --set train.main_epochs=3

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

lint: setup
	$(BIN)/ruff check cnn3d tuner tests benchmarks

bench: setup
	$(BIN)/python benchmarks/lattice.py
	$(BIN)/python benchmarks/cache.py

clean:
	rm -rf $(VENV) studies/*.db studies/reports mlruns .pytest_cache
