# arf-training: one command to set up and run the demo, one to run the tests.
#   make demo   create .venv, install, seed the data hub, run reach_bc end to end, evaluate
#   make test   run the test suite (what CI runs)
#   make up     start Airflow (api-server, scheduler, dag-processor, triggerer) + MLflow
#   make down   stop them

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast up down lint schema bench clean

# Reinstalls only when the dependency pins change; constraints.txt pins every package
# (torch to the CPU build this machine carries, never a CUDA build).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all]"
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/arf demo

test: venv
	$(BIN)/pytest

test-fast: venv
	$(BIN)/pytest -m "not integration and not slow"

up: venv
	$(BIN)/arf up

down:
	@test -x $(BIN)/arf && $(BIN)/arf down || true

lint: venv
	$(BIN)/arf templates lint

schema: venv
	$(BIN)/arf templates schema -o template.schema.json

bench: venv
	$(BIN)/python bench/parse_time.py

clean: down
	rm -rf .arf
