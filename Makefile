# mat-lightning — the front door. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV ?= .venv
NAME ?= smoke
ARGS ?=
SEEDS ?= 0 1 2
DEFENSES ?= clean image_at tecoa fare text_at mmcoa mat mat_1n
ABLATIONS ?= eda rewrite i2t t2i image_aug all
BENCH_ROOT ?= runs/benchmark
RUN_ROOT ?= runs
# Tests never touch the network or a W&B account.
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline
QUIET := --trainer.enable_progress_bar=false --robust_eval.progress=false

# User values never become shell or Make text. `$(call q,X)` is X's raw text (`value`: no Make expansion) as one
# single-quoted shell word; recipes read them as shell variables and quote every use. `unexport`: Make would
# otherwise expand command-line variables (running any `$(shell ...)` in them) to export them to every recipe.
USER_VARS := VENV NAME ARGS CKPT RUNS OUT SEEDS DEFENSES ABLATIONS BENCH_ROOT RUN_ROOT DATA ROOT JOBS
unexport $(USER_VARS)
q = '$(subst ','\'',$(value $(1)))'
# Shell prelude of the recipes: user values as shell variables, ARGS split on blanks only (`set -f`: no globbing;
# a split word is never re-parsed, so `;`, `$(...)` and backticks in it are plain characters), and check_name.
VARS = set -f; venv=$(call q,VENV); name=$(call q,NAME); args=$(call q,ARGS); ckpt=$(call q,CKPT); \
	runs=$(call q,RUNS); out=$(call q,OUT); seeds=$(call q,SEEDS); defenses=$(call q,DEFENSES); \
	ablations=$(call q,ABLATIONS); bench_root=$(call q,BENCH_ROOT); run_root=$(call q,RUN_ROOT); extra=($$args); mat="$$venv/bin/mat"; \
	data=$(call q,DATA); root=$(call q,ROOT); jobs=$(call q,JOBS); \
	py="$$venv/bin/python"; \
	check_name() { \
	  if [[ ! $$1 =~ ^[A-Za-z0-9_]+$$ ]]; then \
	    printf "error: %s='%s' is not an experiment name (letters, digits and _ only)\n" "$$2" "$$1" >&2; exit 2; \
	  elif [[ ! -f experiments/$$1.yaml ]]; then \
	    printf "error: no experiment '%s': experiments/%s.yaml does not exist. Known: %s\n" "$$1" "$$1" \
	      "$$(ls experiments | sed -n 's/\.yaml$$//p' | tr '\n' ' ')" >&2; exit 2; \
	  fi; \
	}; \
	check_seeds() { \
	  for s in $$seeds; do \
	    [[ $$s =~ ^[0-9]+$$ ]] || { printf "error: SEEDS must be integers, got '%s'\n" "$$s" >&2; exit 2; }; \
	  done; \
	};

.PHONY: help install test test-full lint experiment print-config eval seeds table bench benchmark calibrate clean grid gpu-check

help:  ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-14s %s\n",$$1,$$2}'

install:  ## Create .venv and install the package, dev tools and the optional adapters
	@$(VARS) set -e; \
	python3 -m venv "$$venv"; \
	"$$py" -m pip install --upgrade --quiet pip; \
	"$$py" -m pip install --quiet -e '.[dev,adapters]'; \
	: torchattacks pins requests~=2.25.1 in its metadata, at run time it needs only torch; \
	"$$py" -m pip install --quiet --no-deps torchattacks==3.5.1; \
	printf "installed: activate with 'source %s/bin/activate' or use 'make ...'\n" "$$venv"

test:  ## Fast offline test suite (excludes @slow)
	@$(VARS) $(TEST_ENV) "$$py" -m pytest -m "not slow" -q

test-full:  ## All tests, including the slow ones (full smoke runs)
	@$(VARS) $(TEST_ENV) "$$py" -m pytest -q

lint:  ## ruff format check + lint
	@$(VARS) "$$venv/bin/ruff" format --check mat_lightning tests benchmarks && \
	"$$venv/bin/ruff" check mat_lightning tests benchmarks

experiment:  ## Run experiments/NAME.yaml: make experiment NAME=smoke ARGS="--model.lr=1e-4"
	@$(VARS) check_name "$$name" NAME; \
	"$$mat" fit --config "experiments/$$name.yaml" --experiment="$$name" "$${extra[@]}"

print-config:  ## Print the fully resolved config of NAME (a valid config: make print-config NAME=x > x.yaml)
	@$(VARS) check_name "$$name" NAME; \
	"$$mat" fit --config "experiments/$$name.yaml" --experiment="$$name" "$${extra[@]}" --print_config

eval:  ## Robust evaluation of a checkpoint: make eval NAME=smoke CKPT=runs/.../last.ckpt (or CKPT=last)
	@$(VARS) check_name "$$name" NAME; ckpt_arg=(); \
	if [[ $$ckpt == last ]]; then \
	  ckpt=$$(find "runs/$$name" -path '*/checkpoints/last.ckpt' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-); \
	  [[ -n $$ckpt ]] || { printf "error: CKPT=last: no runs/%s/*/checkpoints/last.ckpt\n" "$$name" >&2; exit 2; }; \
	fi; \
	if [[ -n $$ckpt ]]; then \
	  if [[ ! -f $$ckpt ]]; then \
	    printf "error: CKPT='%s': no such file (give a checkpoint file, or CKPT=last)\n" "$$ckpt" >&2; exit 2; \
	  fi; \
	  ckpt_arg=(--ckpt_path="$$ckpt"); \
	fi; \
	"$$mat" robust-eval --config "experiments/$$name.yaml" --experiment="$$name-eval" "$${ckpt_arg[@]}" "$${extra[@]}"

seeds:  ## Run NAME once per seed: make seeds NAME=smoke SEEDS="0 1 2", then make table (mean ± std)
	@$(VARS) set -e; check_name "$$name" NAME; check_seeds; \
	for s in $$seeds; do \
	  echo "== $$name seed $$s" >&2; \
	  "$$mat" fit --config "experiments/$$name.yaml" --experiment="$$name" --seed_everything="$$s" \
	    --run_root="$$run_root" "$${extra[@]}"; \
	done

table:  ## Paper-style table of all runs under runs/ (or RUNS="dir ...")
	@$(VARS) runs_list=($${runs:-runs}); \
	"$$mat" report "$${runs_list[@]}" --out "$${out:-runs}"

benchmark:  ## The synthetic benchmark: 8 defenses x 3 seeds + mat_1n ablations x 1 seed, then the table (JOBS=2: 2 runs at a time)
	@$(VARS) set -e; \
	for d in $$defenses; do check_name "synthetic_$$d" DEFENSES; done; \
	for a in $$ablations; do check_name "synthetic_mat_1n_$$a" ABLATIONS; done; \
	check_seeds; jobs=$${jobs:-1}; \
	[[ $$jobs =~ ^[1-9][0-9]?$$ ]] || { printf "error: JOBS must be a number of parallel runs (1-99), got '%s'\n" "$$jobs" >&2; exit 2; }; \
	: one torch thread per run when runs share the cores; \
	if (( jobs > 1 )); then export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; fi; \
	queue=(); for d in $$defenses; do for s in $$seeds; do queue+=("synthetic_$$d $$s"); done; done; \
	for a in $$ablations; do queue+=("synthetic_mat_1n_$$a 0"); done; \
	start=$$(date +%s); failed=0; \
	for item in "$${queue[@]}"; do \
	  set -- $$item; \
	  echo "== $$1 seed $$2"; \
	  "$$mat" fit --config "experiments/$$1.yaml" --seed_everything="$$2" --run_root="$$bench_root" \
	    $(QUIET) "$${extra[@]}" > /dev/null & \
	  while (( $$(jobs -rp | wc -l) >= jobs )); do wait -n || failed=1; done; \
	done; \
	while (( $$(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done; \
	echo "benchmark wall time: $$(( ($$(date +%s) - start) / 60 )) min"; \
	(( failed == 0 )) || { echo "error: a benchmark run failed (its log: rerun it with make experiment)" >&2; exit 1; }; \
	attacks=(--attacks clean pgd bert_attack bert_attack_synonym bert_attack_strong sep_attack co_attack sga); \
	"$$mat" report "$$bench_root" --out "$$bench_root" "$${attacks[@]}"; \
	"$$mat" report "$$bench_root" --out "$$bench_root/r10" --metrics tr_r10 ir_r10 "$${attacks[@]}"

grid:  ## The paper's grid on DATA=flickr30k|coco (ROOT=<data folder>): every experiments/DATA_*.yaml, then make table
	@$(VARS) set -e; data=$${data:-flickr30k}; \
	[[ $$data == flickr30k || $$data == coco ]] || { printf "error: DATA must be flickr30k or coco, got '%s'\n" "$$data" >&2; exit 2; }; \
	root_arg=(); [[ -z $$root ]] || root_arg=(--data.root="$$root"); \
	set +f; files=(experiments/"$$data"_*.yaml); set -f; \
	for f in "$${files[@]}"; do n=$$(basename "$$f" .yaml); \
	  case "$$n" in *_zeroshot) cmd=robust-eval;; *) cmd=fit;; esac; \
	  echo "== $$n ($$cmd)" >&2; \
	  "$$mat" "$$cmd" --config "$$f" "$${root_arg[@]}" $(QUIET) "$${extra[@]}"; \
	done

calibrate:  ## The world vs. CLIP ViT-B/16 on Flickr30K: flip rates of the benchmark world's pretrained CLIP (ARGS="--data.world=default")
	@$(VARS) "$$py" -m benchmarks.calibrate "$${extra[@]}"

gpu-check:  ## GPU readiness (<= 5 min, no downloads): rates per stage, peak memory, projected grid hours
	@$(VARS) "$$py" -m benchmarks.gpu_check "$${extra[@]}"

bench:  ## Speed/memory benchmarks, reported as ratios measured side by side
	@$(VARS) "$$py" -m benchmarks.run

clean:  ## Remove run outputs (keeps .venv and the synthetic-world cache)
	rm -rf runs wandb lightning_logs .pytest_cache
