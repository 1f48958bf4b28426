# Two front doors: `make pipeline` (set up on first use, run the TDM flow on the default data) and
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
DATA := data/UserBehavior.csv
export DVC_NO_ANALYTICS := 1
# torch's OpenMP threads sleep instead of spinning while they wait: on shared cores spinning
# threads slow every process down 5-20x (docs/PERFORMANCE.md).
export OMP_WAIT_POLICY ?= PASSIVE

# Quiet, offline Prefect and MLflow, with their state inside the project.
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The in-process (ephemeral) API creates its SQLite database on the first run: allow for a slow,
# busy machine (Prefect's default is 20 s).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: setup data pipeline repro plots flow serve mlflow-ui prefect-ui test test-quick test-all lint
.PHONY: clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[mlops,serve,dev]"
	touch $(STAMP)

# The embedded default data $(DATA): data.dvc imports it from the `generate` stage of dvc.yaml
# (`tdm generate` from the `synthetic` params of params.yaml, seeded), the same file `dvc repro`
# makes; DVC re-runs them only when those params or the generator change. (Your own raw data:
# data/ + `dvc add data`, see README.)
data: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro -q data.dvc

# The rounds as a Prefect flow (ephemeral API; the runs show up later in `make prefect-ui`):
# Great Expectations gates, MLflow parent + round runs, the outputs recorded in DVC (dvc.lock)
# when run on params.yaml unchanged. Ends with the metrics table and how to open the UIs.
# (`tdm pipeline` runs the same stage functions without Prefect, MLflow or DVC.)
pipeline: $(STAMP) data
	$(PY) -m flows.pipeline --params $(PARAMS) $(SET)

# The same DAG through DVC (dvc.yaml), from generating the data on: cached, re-runs only what
# changed. Plain `dvc repro` with .venv/bin on PATH is the same.
repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

flow: pipeline

# `dvc plots show`: loss per epoch and layer-wise recall per round, recall per round, as HTML.
plots: $(STAMP)
	$(VENV)/bin/dvc plots show -o dvc_plots

# With `make prefect-ui` running in another terminal: the flow as deployment tdm-pipeline/tdm,
# started from the UI (Deployments -> tdm -> Run) with editable parameters.
serve: $(STAMP) data
	PREFECT_API_URL=http://127.0.0.1:4200/api $(PY) -m flows.serve --name tdm --params $(PARAMS)

# The training step in a Prefect work pool (README, "Training on a GPU worker"): the work pool
# POOL (default gpu, type process) if missing and the deployment tdm-train/POOL, on the server at
# $PREFECT_API_URL (default: `make prefect-ui`'s). Then, on the GPU machine, in this folder:
# `prefect worker start --pool POOL`; here `PREFECT_API_URL=... make pipeline
# SET="--train-deployment tdm-train/POOL"` trains each round there.
.PHONY: deploy-train
deploy-train: $(STAMP)
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(PY) -m flows.deploy --pool $(or $(POOL),gpu)

# The model `make pipeline` trained (the last round; MODEL=models/round_0 or
# MODEL=models:/tdm/champion for another) as an HTTP service (README, "Serving"): the demo page
# at http://127.0.0.1:8000/, the API at /openapi.json. An empty behaviour store is filled with
# the evaluation users' known histories first, so that the page has users to pick.
.PHONY: serve-model
serve-model: $(STAMP)
	$(VENV)/bin/tdm serve --params $(PARAMS) $(SET) $(if $(MODEL),--model $(MODEL)) \
		$(if $(wildcard prepared/meta.json),--import-users prepared)

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

prefect-ui: $(STAMP)
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

# The full suite CI runs (.ci/run): ~8 min on a busy 2-core machine.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

# The inner loop (~30 s on 2 cores): without the end-to-end tests marked `integration`
# (Prefect, MLflow, DVC, the benchmark scripts).
test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

# Benchmarks (docs/PERFORMANCE.md): tree building, beam search, training throughput and data
# preparation on the CPU (2 threads), ~15 minutes at these sizes; results in benchmarks/results/.
# bench-full: the issue's full sizes (4M-item trees, 4M leaves, 100M rows: needs ~11 GiB free).
# bench-gpu: correctness on CUDA and benchmarks 2-3 on the GPU in one call (benchmarks/gpu.sh).
# bench-corpus: the UserBehavior-sized end-to-end run (100M rows, 4M items; ~15 min, ~10 GiB).
# bench-serving: the load test of `tdm serve` at 1M items (~10 min, loads both cores).
.PHONY: bench bench-full bench-gpu bench-corpus bench-serving

bench: $(STAMP)
	$(PY) benchmarks/tree_build.py
	$(PY) benchmarks/beam_search.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/step_scaling.py
	$(PY) benchmarks/prepare_large.py

bench-full: $(STAMP)
	$(PY) benchmarks/tree_build.py --full
	$(PY) benchmarks/beam_search.py --full
	$(PY) benchmarks/training.py --full
	$(PY) benchmarks/prepare_large.py --full

bench-gpu:
	benchmarks/gpu.sh

bench-corpus: $(STAMP)
	$(PY) benchmarks/corpus_scale.py

bench-serving: $(STAMP)
	$(PY) benchmarks/serving.py

lint: $(STAMP)
	$(VENV)/bin/ruff check tdm tasks flows tests benchmarks
	$(VENV)/bin/ruff format --check tdm tasks flows tests benchmarks

clean:
	rm -rf synthetic prepared trees models embeddings metrics plots runs dvc_plots
