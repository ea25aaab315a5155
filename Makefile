# distillery: `make teacher student export` runs the default tiny job end to end; `make test` runs the tests.
#   make teacher JOB=examples/eurosat.yaml ARGS="teacher.synth.images_per_class=8"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
JOB ?= examples/eurosat-tiny.yaml
ARGS ?=
NPROC ?= 1
BIN := $(VENV)/bin
STAMP := $(VENV)/.distillery-installed
TINY := models/tiny/.built
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help install tiny-models standin-models teacher student export bundle report test bench clean clean-runs

help:
	@echo "make teacher student export   run the job JOB=$(JOB) end to end (ARGS='key=value ...' overrides)"
	@echo "make bundle                   runs/<job>/bundle/: model, runtime wheel, app, smoke test (for a device)"
	@echo "make report                   write runs/<job>/report.html (every stage also refreshes it)"
	@echo "make test                     run the test suite"
	@echo "make bench                    speed/quality figures (BENCH='synth runtime' for some)"
	@echo "make tiny-models              build the tiny offline models into models/tiny"
	@echo "make standin-models           train the stand-in world into models/standin (reads labeled_pool)"
	@echo "make install                  create $(VENV) and install distillery[dev]"
	@echo "make clean-runs               delete runs/"

# On a fresh clone the first target creates the virtual environment and installs what it needs.
# pip takes torch/torchvision from the local wheel cache where the machine has one.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	set -o pipefail; $(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location"
	touch $@

install: $(STAMP)

$(TINY): $(STAMP) distillery/tiny.py $(wildcard distillery/tiny_configs/*.json)
	HF_HUB_OFFLINE=1 $(BIN)/distillery tiny-models --out models/tiny
	touch $@

tiny-models: $(TINY)

# The stand-in world (distillery/standin.py): trained here from labeled_pool, ~15 min on 2 CPU cores; cached by
# content hash, so a second run prints "up to date".
standin-models: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/distillery standin --out models/standin $(ARGS)

# The tiny models are only needed by jobs that point at models/tiny; building them is cheap and offline.
teacher: $(STAMP) $(if $(findstring tiny,$(JOB)),$(TINY))
	$(BIN)/distillery teacher --job $(JOB) $(ARGS)

# NPROC=N trains in N processes (torchrun + DistributedDataParallel; gloo on CPU, NCCL on CUDA).
student: $(STAMP)
	$(BIN)/distillery student --job $(JOB) --nproc $(NPROC) $(ARGS)

export: $(STAMP)
	$(BIN)/distillery export --job $(JOB) $(ARGS)

bundle: $(STAMP)
	$(BIN)/distillery bundle --job $(JOB) $(ARGS)

report: $(STAMP)
	$(BIN)/distillery report --job $(JOB) $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# Speed/quality figures as ratios in one run: `make bench` (all) or `make bench BENCH="synth runtime"`.
bench: $(STAMP) $(TINY)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench $(BENCH)

clean-runs:
	rm -rf runs

clean: clean-runs
	rm -rf models/tiny .pytest_cache
