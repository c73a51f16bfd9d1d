# Self-documenting: `make` or `make help` lists the targets with their descriptions.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
# Where `make data-fgvc` looks for the official FGVC downloads: one sub-folder per dataset.
FGVC_DOWNLOADS ?= data/downloads/fgvc
# Extra Hydra overrides for the sweep targets, and the experiment `make sweep` runs.
ARGS ?=
EXPERIMENT ?= demo
# `make wheelhouse` / `make install-offline`: the target machine's Python and newest manylinux
# tag (its glibc), and KEEP_TORCH=1 to keep the CUDA torch a node already has.
WHEELHOUSE ?= wheelhouse
PYTHON_VERSION ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PLATFORM ?= manylinux_2_28_x86_64
KEEP_TORCH ?=
# `make test` runs the tests in TEST_WORKERS processes (pytest-xdist), one torch thread each:
# most of the suite's time is single-threaded (Python start-up, Hydra composition, the console
# scripts' subprocesses), so two workers on two cores took it from 11:43 to 7:41 here.
# TEST_WORKERS=0 runs them in this process, with torch's default threads.
TEST_WORKERS ?= 2
TEST_PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))
TEST_THREADS := $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=$(or $(OMP_NUM_THREADS),1))

# The tests, the offline demo and the CPU bench never reach the model hub (HF_HUB_OFFLINE=1 on
# their command lines, unless it is set already); the sweeps and `make weights` use the hub
# when this machine reaches it. No logging service by default.
HUB_OFFLINE := HF_HUB_OFFLINE=$(or $(HF_HUB_OFFLINE),1)
export WANDB_MODE ?= disabled

.DEFAULT_GOAL := help
.PHONY: help install install-offline wheelhouse weights lint format test test-fast test-gpu demo data-demo data-vtab data-fgvc data-verify vtab fgvc gic sweep tables bench lock clean-results

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install the pinned dependencies (skips when up to date)

wheelhouse: ## Download every wheel the lock needs for another machine into wheelhouse/ (PYTHON_VERSION=3.12 PLATFORM=manylinux_2_28_x86_64 KEEP_TORCH=1)
	$(PYTHON) scripts/wheelhouse.py build --wheelhouse $(WHEELHOUSE) --python-version $(PYTHON_VERSION) --platform $(PLATFORM) $(if $(KEEP_TORCH),--keep-torch)

install-offline: ## Create .venv from wheelhouse/ with no package index (KEEP_TORCH=1: keep the node's CUDA torch)
	$(PYTHON) scripts/wheelhouse.py install --wheelhouse $(WHEELHOUSE) --venv $(VENV) $(if $(KEEP_TORCH),--keep-torch)
	@touch $(STAMP)

weights: install ## Fetch the pinned pretrained checkpoints into the hub cache and print their sha256 (ARGS="--out DIR --backbones vit_b16_in21k")
	$(VENV)/bin/san-prepare weights $(ARGS)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps -e .
	@touch $@

lint: install ## ruff: lint and format check (pyproject.toml [tool.ruff]); `make format` fixes what it can
	$(VENV)/bin/ruff check san baselines tests scripts
	$(VENV)/bin/ruff format --check san baselines tests scripts

format: install ## Apply ruff's fixes and format
	$(VENV)/bin/ruff check --fix san baselines tests scripts
	$(VENV)/bin/ruff format san baselines tests scripts

test: lint ## Lint, then run the test suite (offline; TEST_WORKERS=2 processes, TEST_WORKERS=0 for one)
	$(HUB_OFFLINE) $(TEST_THREADS) $(PY) -m pytest -q $(TEST_PARALLEL) tests

test-fast: install ## The tests without the ones marked slow (real training runs, wheel builds): a quick check while editing
	$(HUB_OFFLINE) $(TEST_THREADS) $(PY) -m pytest -q $(TEST_PARALLEL) -m "not slow" tests

test-gpu: install ## Only the CUDA tests (tests marked gpu; they skip without a GPU)
	$(HUB_OFFLINE) $(PY) -m pytest -q -m gpu tests

data-demo: install ## Generate the offline demo suite under data/demo
	$(HUB_OFFLINE) $(VENV)/bin/san-prepare demo --out data/demo

data-vtab: install ## Export VTAB-1K from tensorflow-datasets as PNG folders under data/vtab-1k (ARGS="--tasks cifar dtd --tfds-dir ...")
	$(VENV)/bin/san-prepare vtab --out data/vtab-1k $(ARGS)

data-fgvc: install ## Build FGVC json splits into data/fgvc from the official files in data/downloads/fgvc/<cub|nabirds|flowers|dogs|cars> (FGVC_DOWNLOADS=...)
	@for name in cub nabirds flowers dogs cars; do \
	  if [ -e "$(FGVC_DOWNLOADS)/$$name" ]; then \
	    $(VENV)/bin/san-prepare fgvc --dataset $$name --src "$(FGVC_DOWNLOADS)/$$name" $(ARGS) || exit 1; \
	  else echo "skip $$name: put its official files in $(FGVC_DOWNLOADS)/$$name (README, section 'Data')"; fi; \
	done

data-verify: install ## Verify the dataset folders under data/vtab-1k and data/fgvc (counts, labels, manifests, JPEG copies)
	@for root in data/vtab-1k data/fgvc; do \
	  if [ -d $$root ]; then $(VENV)/bin/san-prepare verify $$root $(ARGS) || exit 1; else echo "skip $$root: not there"; fi; \
	done

demo: data-demo ## The whole protocol (tune -> select -> final) on the offline demo suite with EfficientNet-Lite0
	$(HUB_OFFLINE) $(VENV)/bin/san-sweep experiment=demo $(ARGS)

vtab: install ## The full VTAB-1K sweep (ViT-B/16; ARGS="method=san backbone=swin_b_in22k launcher=slurm" narrow or redirect it)
	$(VENV)/bin/san-sweep experiment=vtab $(ARGS)

fgvc: install ## The full FGVC sweep (same ARGS as vtab)
	$(VENV)/bin/san-sweep experiment=fgvc $(ARGS)

gic: install ## SSF's full-data table: CIFAR-100 + ImageNet-1K with SSF's recipe (ViT-B/16; same ARGS as vtab)
	$(VENV)/bin/san-sweep experiment=gic $(ARGS)

tables: install ## Tables and plots from every record under results/runs (ARGS="experiment=vtab" for one experiment)
	$(VENV)/bin/san-report $(ARGS)

bench: data-demo ## Speed/memory ratios in one run (CPU: tiny ViT + EfficientNet-Lite0; ARGS="--backbones vit_b16_in21k" on a GPU)
	$(HUB_OFFLINE) $(VENV)/bin/san-bench $(ARGS)

sweep: install ## Any experiment: make sweep EXPERIMENT=san_ablation ARGS="method=san"
	$(VENV)/bin/san-sweep experiment=$(EXPERIMENT) $(ARGS)

lock: ## Rewrite requirements.lock from the current .venv
	@{ head -2 requirements.lock; $(PIP) freeze --exclude-editable | grep -v '^-e'; } > requirements.lock.new
	@mv requirements.lock.new requirements.lock

clean-results: ## Delete results/runs, sweeps and tables (records and checkpoints)
	rm -rf results/runs results/hydra results/sweeps results/tables
