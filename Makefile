# Two front doors: `make pipeline` (set up on first use, run TDM on the default data) and
# `make test`. Everything else is a building block.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# On GPU machines install a CUDA build of torch into .venv first (see README); this default is
# the CPU wheel these project machines carry.
TORCH_SPEC ?= torch==2.13.0
PARAMS ?= params.yaml
SET ?=
DATA := data/synthetic/UserBehavior.csv
export DVC_NO_ANALYTICS := 1

# Quiet, offline Prefect and MLflow, with their state inside the project.
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: setup data pipeline repro flow serve mlflow-ui prefect-ui test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[mlops,dev]"
	touch $(STAMP)

# The embedded default data: generated deterministically from the `synthetic` params, so its
# hash matches data.dvc on every machine.
data: $(DATA)

$(DATA): | $(STAMP)
	$(VENV)/bin/tdm generate --params $(PARAMS) --out $@
	$(VENV)/bin/dvc add -q data  # same bytes, same hash as data.dvc: this only fills the DVC cache

pipeline: $(STAMP) $(DATA)
	$(VENV)/bin/tdm pipeline --params $(PARAMS) $(SET)

# The same DAG through DVC (dvc.yaml): cached, re-runs only what changed.
repro: $(STAMP) $(DATA)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# The same rounds as a Prefect flow (ephemeral API): GX gates, MLflow parent + round runs.
flow: $(STAMP) $(DATA)
	$(PY) -m flows.pipeline --params $(PARAMS) $(SET)

# With `make prefect-ui` running in another terminal: the flow as deployment tdm-pipeline/tdm,
# started from the UI (Deployments -> tdm -> Run) with editable parameters.
serve: $(STAMP) $(DATA)
	PREFECT_API_URL=http://127.0.0.1:4200/api $(PY) -m flows.serve --name tdm --params $(PARAMS)

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

prefect-ui: $(STAMP)
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check tdm tasks flows tests benchmarks
	$(VENV)/bin/ruff format --check tdm tasks flows tests benchmarks

clean:
	rm -rf prepared trees models embeddings metrics runs
