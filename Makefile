# Two commands do all set-up on a fresh machine with python3 and make:
#   make run    create the virtual environment if missing, install, serve
#   make test   create/install (with the test extra) and run the whole suite
# Benchmark (README "Performance"):
#   make bench-peers   install the load generator (wrk, from Debian), the LiteLLM peer and
#                      py-spy, each outside the project's venv (.peers/ is git-ignored)
#   make bench         mock alone, gateway with 1 and 2 workers, LiteLLM: one run, one table
# Chaos soak (README "Chaos soak"):
#   make soak          20,000 requests through a gateway while the mock injects ~30% faults
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test clean bench bench-peers soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

# The gateway on 127.0.0.1:8080 with the mock provider on 127.0.0.1:8001, in one
# process: Ctrl-C stops both. (Separately: `mock-provider` and `orchestrator serve`.)
run: $(VENV)/.installed
	$(BIN)/orchestrator serve --with-mock $(RUN_ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

PEERS       := .peers
LITELLM     := $(PEERS)/litellm-venv/bin/litellm
PYSPY       := $(PEERS)/tools-venv/bin/py-spy
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# BENCH_ARGS, e.g. --duration 5 --concurrency 1 50 (python -m bench.run --help).
bench: $(VENV)/.installed
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-peers: $(LITELLM) $(PYSPY)
	@command -v wrk >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q wrk; }

# LiteLLM in its own venv, pinned: 1.108.7 is the newest whose [proxy] extra resolves.
$(LITELLM):
	$(PYTHON) -m venv $(PEERS)/litellm-venv
	$(PEERS)/litellm-venv/bin/pip install --quiet 'litellm[proxy]==1.108.7'

$(PYSPY):
	$(PYTHON) -m venv $(PEERS)/tools-venv
	$(PEERS)/tools-venv/bin/pip install --quiet py-spy

# SOAK_ARGS, e.g. --requests 2000 --concurrency 32 --seed 7 --json soak.json
# (python -m orchestrator.soak --help). Starts its own mock and gateway on free ports.
soak: $(VENV)/.installed
	$(BIN)/python -m orchestrator.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
