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

# Nothing here may reach the model hub or a logging service by default.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.DEFAULT_GOAL := help
.PHONY: help install test demo data-demo data-vtab data-fgvc data-verify vtab fgvc sweep tables bench lock clean-results

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install the pinned dependencies (skips when up to date)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps -e .
	@touch $@

test: install ## Run the test suite (offline)
	$(PY) -m pytest -q tests

data-demo: install ## Generate the offline demo suite under data/demo
	$(VENV)/bin/san-prepare demo --out data/demo

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
	$(VENV)/bin/san-sweep experiment=demo $(ARGS)

vtab: install ## The full VTAB-1K sweep (ViT-B/16; ARGS="method=san backbone=swin_b_in22k launcher=slurm" narrow or redirect it)
	$(VENV)/bin/san-sweep experiment=vtab $(ARGS)

fgvc: install ## The full FGVC sweep (same ARGS as vtab)
	$(VENV)/bin/san-sweep experiment=fgvc $(ARGS)

tables: install ## Tables and plots from every record under results/runs (ARGS="experiment=vtab" for one experiment)
	$(VENV)/bin/san-report $(ARGS)

bench: data-demo ## Speed/memory ratios in one run (CPU: tiny ViT + EfficientNet-Lite0; ARGS="--backbones vit_b16_in21k" on a GPU)
	$(VENV)/bin/san-bench $(ARGS)

sweep: install ## Any experiment: make sweep EXPERIMENT=san_ablation ARGS="method=san"
	$(VENV)/bin/san-sweep experiment=$(EXPERIMENT) $(ARGS)

lock: ## Rewrite requirements.lock from the current .venv
	@{ head -2 requirements.lock; $(PIP) freeze --exclude-editable | grep -v '^-e'; } > requirements.lock.new
	@mv requirements.lock.new requirements.lock

clean-results: ## Delete results/runs, sweeps and tables (records and checkpoints)
	rm -rf results/runs results/hydra results/sweeps results/tables
