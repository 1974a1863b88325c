# Two commands do all set-up on a fresh machine with python3 and make:
#   make run    create the virtual environment if missing, install, serve
#   make test   create/install (with the test extra) and run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test clean

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

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
