# The two commands of the README:
#   make up    - set up everything, then run fleetlm on this machine (etcd, control plane, node, edge)
#   make test  - set up everything, then run every check and test (what CI runs)
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# `buf breaking` compares the protos (the public contract) with the main branch, so that a change to the
# contract is deliberate. A clone with no local main (CI building another branch) compares with origin/main.
BUF_AGAINST ?= .git\#$(shell git show-ref -q --verify refs/heads/main && echo branch=main || echo ref=origin/main)

.PHONY: up test check lint protos bench clean

$(VENV)/.installed: pyproject.toml scripts/bootstrap.sh
	./scripts/bootstrap.sh

up: $(VENV)/.installed
	$(BIN)/fleetlm up

test: check
	./scripts/test_tools.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(VENV)/.installed
	$(BIN)/python protos/generate.py --check
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/buf breaking --against '$(BUF_AGAINST)'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

lint: check

protos: $(VENV)/.installed
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
