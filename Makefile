# diffusion: `make train` and `make test` are all a newcomer needs. `make help` lists every target.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
PYTEST_ARGS ?=
CKPT ?=
DIR ?=
OUT  ?=
ARGS ?=
# make train's Hydra arguments: ARGS, then the digits recipe unless ARGS names another experiment (after ARGS, as
# Hydra takes its flags, e.g. -m, before the overrides)
TRAIN_ARGS = $(ARGS) $(if $(filter experiment=% +experiment=% ++experiment=%,$(ARGS)),,experiment=digits)

.DEFAULT_GOAL := help
.PHONY: help setup test lint bench train prepare sample report export clean

help:  ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-8s %s\n", $$1, $$2}'

# The venv is rebuilt only when missing or older than pyproject.toml, so a second `make test` installs nothing.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $@

setup: $(STAMP)  ## Create .venv and install the package with its dev extras (done by test/train too)

test: $(STAMP)  ## Run the whole test suite (sets up .venv first if needed)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## Run ruff over the code
	$(VENV)/bin/ruff check .

bench: $(BENCH_STAMP)  ## Throughput vs diffusers, train.py's overhead, EMA/Adam kernels, checkpoint stall, data paths' images/s (bench/results/)
	$(PY) bench/overhead.py
	$(PY) bench/unet_throughput.py
	$(PY) bench/checkpoint_stall.py
	$(PY) bench/data_paths.py

train: $(STAMP)  ## Train on the bundled digits in minutes; Hydra overrides in ARGS: make train ARGS="experiment=cifar10_ddpm trainer=ddp"
	$(PY) train.py $(TRAIN_ARGS)

prepare: $(STAMP)  ## Write a data set as LitData shards for data=streaming: make prepare ARGS="data=cifar10 data.root=PATH out=DIR"
	$(PY) prepare.py $(ARGS)

sample: $(STAMP)  ## Sample from a checkpoint: make sample CKPT=path/to/last.ckpt
	$(PY) sample.py ckpt=$(CKPT)

report: $(STAMP)  ## Tabulate a sweep: make report DIR=multirun/<name>/<time> (report.md, report.csv, plots)
	@test -n "$(DIR)" || { echo "error: no sweep folder given; make report DIR=multirun/<name>/<time>" >&2; exit 2; }
	$(PY) report.py $(DIR)

export: $(STAMP)  ## Export a checkpoint as a diffusers folder: make export CKPT=path/to/last.ckpt OUT=dir
	$(PY) export.py ckpt=$(CKPT) out=$(OUT)

clean:  ## Remove run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
