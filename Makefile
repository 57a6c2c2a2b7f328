# Two commands do all set-up on a fresh machine (no Redis, no root needed):
#   make demo   — venv, torch (pinned, CPU), gridq; then a whole local grid runs the first use case
#   make test   — the same set-up, then the full test suite (what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gridq-installed

.PHONY: demo up test bench install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gridq demo

up: $(STAMP)
	$(BIN)/gridq up

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict protocol
	$(BIN)/mypy orchestrator workers ops
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m ops.bench.latency
	$(BIN)/python -m ops.bench.dp
	$(BIN)/python -m ops.bench.mpc
	$(BIN)/python -m ops.bench.fl

clean:
	rm -rf $(VENV) build *.egg-info
