# Developer entry points. `make run` is all a newcomer needs: it creates .venv, installs the gateway
# and its dev tools, and starts it (the built-in mock backend unless CONFIG or the environment says
# otherwise). Needs GNU make and Python >= 3.11.
#
#   make run                                  # http://localhost:8000, model "mock"
#   make run CONFIG=config/gateway.toml APP_PORT=9000
#   make test PYTEST_ARGS="-k relay -x"

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; pip runs again only when pyproject.toml is newer than it.
STAMP := $(VENV)/.installed
# Interpreters tried, in order, to create $(VENV); the first that is Python >= 3.11 wins.
PYTHON ?= python3.11 python3

CONFIG ?=
APP_PORT ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help run install test lint bench check-config clean

help:
	@echo "make run           start the gateway (CONFIG=file.toml, APP_PORT=8000)"
	@echo "make install       create $(VENV) and install the gateway with its dev extra"
	@echo "make test          run the tests (PYTEST_ARGS=...)"
	@echo "make lint          ruff check gateway tests"
	@echo "make bench         run the benchmarks in tests/bench (BENCH_ARGS=...)"
	@echo "make check-config  check every config/*.toml"
	@echo "make clean         remove $(VENV) and build and test leftovers"

$(BIN)/python:
	@py=""; \
	for candidate in $(PYTHON); do \
	  if command -v "$$candidate" >/dev/null 2>&1 \
	     && "$$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then \
	    py="$$candidate"; break; \
	  fi; \
	done; \
	if [ -z "$$py" ]; then \
	  echo "error: no Python >= 3.11 found (tried: $(PYTHON))." >&2; \
	  echo "       Install Python 3.11 or newer, or name one: make $(MAKECMDGOALS) PYTHON=/path/to/python3.12" >&2; \
	  exit 1; \
	fi; \
	echo "creating $(VENV) with $$(command -v "$$py") ($$("$$py" -V 2>&1))"; \
	"$$py" -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(STAMP)

# exec: the gateway replaces make's shell, so Ctrl-C and `kill` reach it directly.
# --port only when APP_PORT is set: otherwise the config file's [server].port, or 8000.
run: $(STAMP)
	exec $(BIN)/gateway serve $(if $(CONFIG),--config $(CONFIG)) $(if $(APP_PORT),--port $(APP_PORT))

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway tests

# Checked before installing anything, so that the answer is quick.
bench:
	@if [ ! -d tests/bench ]; then \
	  echo "make bench: tests/bench does not exist yet, so there is no benchmark to run." >&2; \
	  exit 1; \
	fi
	@$(MAKE) --no-print-directory install
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

check-config: $(STAMP)
	@status=0; \
	for file in config/*.toml; do \
	  echo "== $$file"; \
	  $(BIN)/gateway check-config "$$file" || status=1; \
	done; \
	exit $$status

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache tests/artifacts
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
