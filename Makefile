# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install the
# project (with its dev extra) when it is missing or pyproject.toml changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bdt-installed
DEMO_DIR ?= demo
# When make started, before any install: the demo's 30 minutes count from here.
STARTED := $(shell date +%s)

# No accelerator, no hub, Ray on loopback only (docs/environment.md).
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo bench rehearsal clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 resolves to the CPU wheel on this machine's local disk (see pyproject.toml).
	$(BIN)/pip install -e '.[dev]'
	@touch $@

# Everything (CI). test-fast leaves out the tests marked slow (they start DeepSpeed, Ray, an S3
# server or other processes). Three pytest workers, a test file each at a time (module fixtures are
# built once): most tests wait on processes they started; on 2 cores two left the CPU idle at times
# (12:06 vs 10:34 with three, one after the other; four: 10:32). docs/system.md §6.
TEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The main job end to end on the embedded default (system §4): data -> tokenizer -> Ray
# pre-extraction -> DeepSpeed training over two stages -> samples -> evaluation. Resumable.
demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) DEMO_STARTED=$(STARTED) bash scripts/demo.sh

# Issue 8's benchmarks (not part of `make test`): each prints a table and writes
# bench/results/<name>.json; bench/summary.py collects their goals into bench/results/README.md.
# About 14 min on an idle 2-core machine (data_prefetch.py: ~4); niced, as the machine is shared.
BENCH := nice -n 10 $(BIN)/python bench
bench: $(STAMP)
	$(BENCH)/decode_speed.py
	$(BENCH)/train_throughput.py
	$(BENCH)/data_path.py
	$(BENCH)/data_prefetch.py
	$(BENCH)/zero_memory.py
	$(BENCH)/resume_cost.py
	$(BENCH)/checkpoint_hash.py
	$(BENCH)/extract_throughput.py
	$(BENCH)/summary.py

# The multi-node flow of cluster/README.md on this machine: S3 server (moto) on 127.0.0.1, Ray
# pre-extraction to s3, 2-rank training from s3 through the resume wrapper
# (scripts/cluster_rehearsal.sh), a rank SIGKILLed mid-run, resumed, finished
# (tests/cluster/test_rehearsal.py, also part of `make test`).
rehearsal: $(STAMP)
	$(BIN)/python -m pytest -q tests/cluster/test_rehearsal.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
