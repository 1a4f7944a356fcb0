# riskwire — the two commands: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= models
MODEL_NAME ?= fraud
HOST ?= 127.0.0.1
PORT ?= 50051
DEMO_ROWS ?= 300000
DEMO_DATA ?= data/demo-$(DEMO_ROWS).parquet

.PHONY: install test lint format model serve demo-loop bench bench-kernels bench-serving bench-smoke clean

install: $(VENV)/.installed

# Re-install when the project metadata changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

$(DEMO_DATA): | install
	mkdir -p $(dir $@)
	$(BIN)/riskwire data synth --rows $(DEMO_ROWS) --seed 7 --out $@

# Builds the demo model unless one already exists in $(MODELS)/$(MODEL_NAME).
model: install
	@if ls -d $(MODELS)/$(MODEL_NAME)/[0-9]* >/dev/null 2>&1; then \
		echo "model $(MODEL_NAME) already in $(MODELS)/ (make clean-models to rebuild)"; \
	else \
		$(MAKE) --no-print-directory $(DEMO_DATA) && \
		$(BIN)/riskwire build --data $(DEMO_DATA) --name $(MODEL_NAME) --models $(MODELS); \
	fi

# Builds the demo model when absent, then serves on 127.0.0.1:50051 (Ctrl-C stops).
serve: model
	$(BIN)/riskwire serve --models $(MODELS) --host $(HOST) --port $(PORT)

# The maintenance loop end to end in a few minutes (README "Closing the loop"): synth →
# serve → shadow → label → export → retrain → compare → canary → promote, in ./demo-loop.
demo-loop: install
	$(BIN)/python scripts/demo_loop.py --work demo-loop

# riskwire vs MLServer vs FastAPI vs a bare grpcio echo (installs the peers' venvs once).
bench: model
	$(BIN)/python perf/run.py --models $(MODELS) --json

bench-kernels: model
	$(BIN)/python perf/bench_kernels.py --model $$(ls -d $(MODELS)/$(MODEL_NAME)/[0-9]* | sort -t/ -k3 -n | tail -1)/model.txt

bench-serving: model
	$(BIN)/python perf/bench_serving.py --models $(MODELS) --json

bench-smoke: install
	$(BIN)/python perf/bench_kernels.py --smoke
	$(BIN)/python perf/run.py --smoke --skip-mlserver

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis build *.egg-info
