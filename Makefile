# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install the
# project (with its dev extra) when it is missing or pyproject.toml changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bdt-installed
DEMO_DIR ?= demo

# No accelerator, no hub, Ray on loopback only (shared/ENVIRONMENT.md).
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 resolves to the CPU wheel on this machine's local disk (see pyproject.toml).
	$(BIN)/pip install -e '.[dev]'
	@touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The end-to-end job grows with the project; today it makes the embedded "shapes" dataset
# and checks it with the judge. Training, sampling and evaluation join it as they land.
demo: $(STAMP)
	$(BIN)/bdt data shapes --out $(DEMO_DIR)/data --num 2000 --per-shard 500 --size 128 64x128 128x64 --seed 0
	@echo "demo: made the shapes dataset in $(DEMO_DIR)/data (tokenizer, pre-extraction, training and"
	@echo "demo: evaluation are not wired into the demo yet; see README 'Status')."

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
