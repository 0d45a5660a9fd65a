# mat-lightning — the front door. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MAT := $(VENV)/bin/mat
NAME ?= smoke
ARGS ?=
CFG = experiments/$(NAME).yaml
# Tests never touch the network or a W&B account.
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline

.PHONY: help install test test-full lint experiment print-config eval seeds table bench benchmark clean check-name grid gpu-check

help:  ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-14s %s\n",$$1,$$2}'

install:  ## Create .venv and install the package, dev tools and the optional adapters
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev,adapters]'
	@# torchattacks pins requests~=2.25.1 in its metadata; at run time it needs only torch.
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	@echo "installed: activate with 'source $(VENV)/bin/activate' or use 'make ...'"

test:  ## Fast offline test suite (excludes @slow)
	$(TEST_ENV) $(PY) -m pytest -m "not slow" -q

test-full:  ## All tests, including the slow ones (full smoke runs)
	$(TEST_ENV) $(PY) -m pytest -q

lint:  ## ruff format check + lint
	$(VENV)/bin/ruff format --check mat_lightning tests benchmarks
	$(VENV)/bin/ruff check mat_lightning tests benchmarks

check-name:
	@test -f $(CFG) || { echo "error: no experiment '$(NAME)': $(CFG) does not exist. Known: $$(ls experiments/*.yaml | xargs -n1 basename | sed 's/\.yaml$$//' | tr '\n' ' ')" >&2; exit 2; }

experiment: check-name  ## Run experiments/NAME.yaml: make experiment NAME=smoke ARGS="--model.lr=1e-4"
	$(MAT) fit --config $(CFG) --experiment=$(NAME) $(ARGS)

print-config: check-name  ## Print the fully resolved config of NAME (a valid config: make print-config NAME=x > x.yaml)
	@$(MAT) fit --config $(CFG) --experiment=$(NAME) $(ARGS) --print_config

eval: check-name  ## Robust evaluation of a checkpoint: make eval NAME=smoke CKPT=runs/.../last.ckpt
	$(MAT) robust-eval --config $(CFG) --experiment=$(NAME)-eval $(if $(CKPT),--ckpt_path=$(CKPT)) $(ARGS)

table:  ## Paper-style table of all runs under runs/ (or RUNS="dir ...")
	$(MAT) report $(or $(RUNS),runs) --out $(or $(OUT),runs)

SEEDS ?= 0 1 2
RUN_ROOT ?= runs

# Values reach the recipe through the environment, never pasted into shell code.
seeds: export MAT_NAME = $(NAME)
seeds: export MAT_SEEDS = $(SEEDS)
seeds: export MAT_ARGS = $(ARGS)
seeds: export MAT_RUN_ROOT = $(RUN_ROOT)
seeds: check-name  ## Run NAME once per seed: make seeds NAME=smoke SEEDS="0 1 2", then make table (mean ± std)
	@set -e; for s in $$MAT_SEEDS; do \
	  case "$$s" in ''|*[!0-9]*) echo "error: SEEDS must be integers, got '$$s'" >&2; exit 2;; esac; \
	done; \
	for s in $$MAT_SEEDS; do \
	  echo "== $$MAT_NAME seed $$s" >&2; \
	  $(MAT) fit --config "experiments/$$MAT_NAME.yaml" --experiment="$$MAT_NAME" --seed_everything="$$s" \
	    --run_root="$$MAT_RUN_ROOT" $$MAT_ARGS; \
	done
DEFENSES ?= clean image_at tecoa fare text_at mmcoa mat mat_1n
ABLATIONS ?= eda rewrite i2t t2i image_aug all
BENCH_ROOT ?= runs/benchmark
QUIET := --trainer.enable_progress_bar=false --robust_eval.progress=false

benchmark:  ## The synthetic benchmark: 8 defenses x 3 seeds + mat_1n ablations x 1 seed, then the table
	@set -e; start=$$(date +%s); \
	for d in $(DEFENSES); do \
	  $(MAKE) -s seeds NAME=synthetic_$$d SEEDS="$(SEEDS)" RUN_ROOT=$(BENCH_ROOT) ARGS="$(QUIET) $(ARGS)" VENV=$(VENV) > /dev/null; \
	done; \
	for a in $(ABLATIONS); do \
	  echo "== synthetic_mat_1n_$$a seed 0"; \
	  $(MAT) fit --config experiments/synthetic_mat_1n_$$a.yaml --seed_everything=0 --run_root=$(BENCH_ROOT) $(QUIET) $(ARGS) > /dev/null; \
	done; \
	echo "benchmark wall time: $$(( ($$(date +%s) - start) / 60 )) min"
	$(MAT) report $(BENCH_ROOT) --out $(BENCH_ROOT) --attacks clean pgd bert_attack sep_attack co_attack sga
	$(MAT) report $(BENCH_ROOT) --out $(BENCH_ROOT)/r10 --metrics tr_r10 ir_r10 --attacks clean pgd bert_attack sep_attack co_attack sga

DATA ?= flickr30k
ROOT ?=
grid: export MAT_DATA = $(DATA)
grid: export MAT_ROOT = $(ROOT)
grid: export MAT_ARGS = $(ARGS)
grid:  ## The paper's grid on DATA=flickr30k|coco (ROOT=<data folder>): every experiments/DATA_*.yaml, then make table
	@set -e; case "$$MAT_DATA" in flickr30k|coco) ;; *) echo "error: DATA must be flickr30k or coco, got '$$MAT_DATA'" >&2; exit 2;; esac; \
	for f in experiments/"$$MAT_DATA"_*.yaml; do n=$$(basename "$$f" .yaml); \
	  case "$$n" in *_zeroshot) cmd=robust-eval;; *) cmd=fit;; esac; \
	  echo "== $$n ($$cmd)" >&2; \
	  $(MAT) $$cmd --config "$$f" $${MAT_ROOT:+--data.root="$$MAT_ROOT"} $(QUIET) $$MAT_ARGS; \
	done

gpu-check:  ## GPU readiness (<= 5 min, no downloads): rates per stage, peak memory, projected grid hours
	$(PY) -m benchmarks.gpu_check $(ARGS)

bench:  ## Speed/memory benchmarks, reported as ratios measured side by side
	$(PY) -m benchmarks.run

clean:  ## Remove run outputs (keeps .venv and the synthetic-world cache)
	rm -rf runs wandb lightning_logs .pytest_cache
