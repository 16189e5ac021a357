# Transfer-learning pipeline. `make help` lists the targets.
# One convention for every target: `group=option` / `key=value` go to the command as they are (config
# overrides, the same as on `python -m pipeline.<command>`), and Make's own UPPERCASE variables become the
# command's own keys (RUN=r -> run=r), e.g.
#   make train dataset=flowers trainer.epochs=3 backbone=tf_efficientnet_lite1
#   make export RUN=outputs/runs/<run> export.opset=18
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

# glibc allocator tuning (see pipeline/runtime/process.py; entry points also apply it in-process with mallopt)
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736
export MALLOC_TOP_PAD_ ?= 1073741824
ifdef DATASETS_DIR
export DATASETS_DIR
endif

# Command-line variables that are Make's own; every other `name=value` is a Hydra override.
MAKE_ONLY_VARS := ARGS DATASETS_DIR VENV PYTHON NPROC TORCHRUN_ARGS RUN IMAGES BACKEND TOPK CAM CAM_DIR SWEEP DEPTHS TESTS N OUT SHELL
HYDRA_OVERRIDES := $(strip $(foreach v,$(filter-out $(MAKE_ONLY_VARS),$(.VARIABLES)),\
	$(if $(filter command line,$(origin $(v))),'$(v)=$($(v))')))

.PHONY: help install train test test-all lint clean-outputs chaos sweep hpo rank bench bench-recipes bench-budget bench-ood bench-distill report export predict distill

help: ## List the targets
	@echo "Usage: make <target> [group=option ...] [key=value ...] [VAR=value: the command's own key, e.g. RUN=r is run=r]"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "} {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## Create .venv and install the package (first use only; later runs are instant)

train: $(STAMP) ## Train: make train [dataset=X] [key=value ...] [ARGS="..."] [NPROC=N: DDP via torchrun] (default: digits)
	$(if $(NPROC),$(PY) -m torch.distributed.run --nproc_per_node=$(NPROC) $(or $(TORCHRUN_ARGS),--standalone),$(PY)) \
		-m pipeline.train $(HYDRA_OVERRIDES) $(ARGS)

test: lint ## Run the import contracts, then the test suite (pytest; the `long` rounds are test-all's)
	$(PY) -m pytest $(or $(TESTS),tests) $(if $(TESTS),,-m "not long") $(ARGS)

test-all: lint ## The whole suite, with the 5 `long` multi-process rounds (chaos, DDP SIGTERM resume, DDP EMA, parallel sweep, gpu_check)
	$(PY) -m pytest tests $(ARGS)

lint: $(STAMP) ## Check the package layering (import-linter contracts in pyproject.toml)
	$(VENV)/bin/lint-imports

clean-outputs: $(STAMP) ## Delete the run and sweep dirs under outputs/ (only those the pipeline marked; live runs kept)
	$(PY) -m pipeline.clean $(if $(OUT),'dir=$(OUT)')

# Sweeps (Hydra multirun; each run in outputs/multirun/<sweep>/<job>_<overrides>/, report.md at the end)
DEPTHS ?= all,6,4,2,0

sweep: $(STAMP) ## Freeze-depth sweep + report: make sweep dataset=X [DEPTHS=all,6,4,2,0] [ARGS="..."]
	$(PY) -m pipeline.train --multirun strategy=partial strategy.freeze_depth=$(DEPTHS) $(HYDRA_OVERRIDES) $(ARGS)

hpo: $(STAMP) ## Optuna TPE search + report: make hpo dataset=X [ARGS="hydra.sweeper.n_trials=10"]
	$(PY) -m pipeline.train --multirun hparams_search=optuna $(HYDRA_OVERRIDES) $(ARGS)

rank: $(STAMP) ## Rank backbones by LogME per feature level: make rank dataset=X backbones=[a,b,c]
	$(PY) -m pipeline.rank 'hydra.run.dir=outputs/rank/$${now:%Y-%m-%d_%H-%M-%S}_$${hydra.runtime.choices.dataset}' $(HYDRA_OVERRIDES) $(ARGS)

bench-recipes: $(STAMP) ## Recipe bench (~50 min on 2 cores): defaults vs each technique vs the recipe, 3 seeds
	$(PY) bench/bench_recipes.py $(ARGS)

bench-budget: $(STAMP) ## Time budgets on full-size data (~10 h on 2 cores; ARGS="--configs auto --budgets 2m 5m" ~1.5 h, ARGS=--smoke ~20 min): auto vs probe vs partial/finetune, 3 seeds
	$(PY) bench/bench_budget.py $(ARGS)

bench-distill: $(STAMP) ## Distillation (~25 min): lite2 teacher -> lite0 student vs lite0 alone at equal time, 3 seeds, latency (docs/export.md)
	$(PY) bench/bench_distill.py $(ARGS)

bench-ood: $(STAMP) ## Unknown-image scores (~15 min): kNN vs Mahalanobis vs energy vs softmax on far/near sets (docs/export.md)
	$(PY) bench/bench_ood.py $(ARGS)

chaos: $(STAMP) ## Fault injection (~10 min): kill -9, concurrent runs, resume races, full/read-only disk, bomb files
	$(PY) bench/chaos.py $(ARGS)

bench: $(STAMP) ## Speed/memory vs bare-PyTorch ceilings (table + outputs/bench/bench.json): make bench [ARGS="--dataset X"]
	$(PY) bench/bench.py $(ARGS)

report: $(STAMP) ## Rebuild a sweep's report.md/.csv/.png: make report [SWEEP=outputs/multirun/<dir>] (default: latest)
	$(PY) -m pipeline.report $(if $(SWEEP),'sweep=$(SWEEP)') $(if $(OUT),'out=$(OUT)') $(HYDRA_OVERRIDES) $(ARGS)

# Export and predict (their own keys: run=, out=, images=, ...; export.* settings override the run's)
export: $(STAMP) ## Export a run: make export RUN=outputs/runs/<run> [OUT=dir] [export.opset=18 export.formats=[onnx] ...]
	$(PY) -m pipeline.export $(if $(RUN),'run=$(RUN)') $(if $(OUT),'out=$(OUT)') $(HYDRA_OVERRIDES) $(ARGS)

predict: $(STAMP) ## Predict: make predict RUN=<export dir> IMAGES=<files or folders> [BACKEND=onnx|onnx-int8] [TOPK=3] [OUT=file.csv] [CAM=true: Grad-CAM overlays] [CAM_DIR=dir]
	$(PY) -m pipeline.predict $(if $(RUN),'run=$(RUN)') $(foreach i,$(IMAGES),'images=$(i)') $(if $(BACKEND),'backend=$(BACKEND)') \
		$(if $(TOPK),'topk=$(TOPK)') $(if $(OUT),'csv=$(OUT)') $(if $(CAM),'cam=$(CAM)') $(if $(CAM_DIR),'cam_dir=$(CAM_DIR)') \
		$(HYDRA_OVERRIDES) $(ARGS)

# Data: audit and augmentation preview (Hydra overrides as for train; N/OUT are Make's own)
.PHONY: audit preview
audit: $(STAMP) ## Audit a dataset (counts, sizes, modes, odd files, duplicates, leakage): make audit dataset=X [OUT=dir]
	$(PY) -m pipeline.audit $(if $(OUT),'out=$(OUT)') $(HYDRA_OVERRIDES) $(ARGS)

preview: $(STAMP) ## PNG grid of augmented train samples: make preview dataset=X [augment=heavy] [N=16] [OUT=file.png]
	$(PY) -m pipeline.preview $(if $(N),'n=$(N)') $(if $(OUT),'out=$(OUT)') $(HYDRA_OVERRIDES) $(ARGS)

# Distillation (training/distill.py): a smaller student on a finished run's images, split and logits
.PHONY: distill
distill: $(STAMP) ## Distil a run into a student: make distill RUN=<teacher run> backbone=<student> [strategy=partial] [trainer.time_limit=5m] [distill.alpha=0.5]
	@test -n "$(RUN)" || { echo "make distill needs RUN=<teacher run dir> (a finished run: outputs/runs/<run>)" >&2; exit 2; }
	$(PY) -m pipeline.train distill.teacher=$(RUN) $(if $(filter command line,$(origin strategy)),,strategy=partial) \
		$(HYDRA_OVERRIDES) $(ARGS)

# Reliability: continue a run that was killed (kill -9, power loss) or stopped with Ctrl-C / SIGTERM
.PHONY: resume
resume: $(STAMP) ## Continue a killed/interrupted run from last.pt: make resume [RUN=<run dir>] (default: newest unfinished run of dataset=X)
	$(PY) -m pipeline.train trainer.resume=$(or $(RUN),auto) $(HYDRA_OVERRIDES) $(ARGS)
