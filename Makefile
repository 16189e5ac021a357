# Transfer-learning pipeline. `make help` lists the targets.
# Anything you pass as `group=option` or `key=value` goes to Hydra, e.g.
#   make train dataset=flowers ARGS="trainer.epochs=3 backbone=tf_efficientnet_lite1"
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

# glibc allocator tuning (see pipeline/startup.py; also applied in-process with mallopt)
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736
export MALLOC_TOP_PAD_ ?= 1073741824
ifdef DATASETS_DIR
export DATASETS_DIR
endif

# Command-line variables that are Make's own; every other `name=value` is a Hydra override.
MAKE_ONLY_VARS := ARGS DATASETS_DIR VENV PYTHON NPROC RUN IMAGES BACKEND TOPK SWEEP DEPTHS TESTS SHELL
HYDRA_OVERRIDES := $(strip $(foreach v,$(filter-out $(MAKE_ONLY_VARS),$(.VARIABLES)),\
	$(if $(filter command line,$(origin $(v))),'$(v)=$($(v))')))

.PHONY: help install train test clean-outputs export predict

help: ## List the targets
	@echo "Usage: make <target> [group=option ...] [ARGS=\"hydra overrides\"]"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "} {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## Create .venv and install the package (first use only; later runs are instant)

train: $(STAMP) ## Train: make train [dataset=X] [key=value ...] [ARGS="..."] (default: digits, offline)
	$(PY) -m pipeline.train $(HYDRA_OVERRIDES) $(ARGS)

test: $(STAMP) ## Run the test suite (pytest)
	$(PY) -m pytest $(or $(TESTS),tests) $(ARGS)

clean-outputs: ## Delete outputs/ (run dirs)
	rm -rf outputs

# Export and predict (argparse entry points: extra flags go in ARGS, e.g. ARGS="--formats onnx --out DIR")
export: $(STAMP) ## Export a run: make export RUN=outputs/runs/<run> [ARGS="--out DIR --formats ..."]
	@test -n "$(RUN)" || { echo "error: set RUN=<run dir>, e.g. make export RUN=outputs/runs/<date>_<dataset>" >&2; exit 2; }
	$(PY) -m pipeline.export "$(RUN)" $(HYDRA_OVERRIDES) $(ARGS)

predict: $(STAMP) ## Predict: make predict RUN=<export dir> IMAGES=<file or folder> [BACKEND=onnx] [TOPK=3]
	@test -n "$(RUN)" -a -n "$(IMAGES)" || { echo "error: set RUN=<export dir> and IMAGES=<file or folder>" >&2; exit 2; }
	$(PY) -m pipeline.predict "$(RUN)" $(IMAGES) --backend $(or $(BACKEND),torch) --topk $(or $(TOPK),3) $(HYDRA_OVERRIDES) $(ARGS)
