# fmsring: `make help` lists the targets.
#
#   make sweep                                  CPU smoke test (2-layer llama/micro, gloo, 1/2/4 processes)
#   make sweep DEVICE=cuda MODEL=3-8b NPROC=2,4 SEQ_LENS=8K,32K DTYPE=bfloat16
#   make sweep DEVICE=cuda MODEL=3-8b NPROC=4 RING_TP=1,2,4 STRATEGIES=ring,tp   every factorisation cp x tp
#   make sweep PARAMS=my_sweep.yaml             any notebooks/run.ipynb parameters, from YAML
#   make analysis                               one figure set per run folder under runs/ (and runs/local/)
#   make analysis RUNS="runs/a runs/b"          compare runs, a panel per run
#
# Sweep variables left empty keep notebooks/run.ipynb's defaults (or PARAMS's values).
# Everything generated here goes under runs/local/ (git-ignored); runs/README.md says how to commit a run.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUT_DIR ?= runs/local
ANALYSIS_DIR ?= runs/local/analysis

# notebooks/run.ipynb parameters
PARAMS ?=
NAME ?=
DEVICE ?=
ARCH ?=
MODEL ?=
MODEL_PATH ?=
SOURCE ?=
MODEL_KWARGS ?=
DTYPE ?=
NPROC ?=
STRATEGIES ?=
SEQ_LENS ?=
PHASES ?=
CACHED_LENS ?=
RING_VARIANTS ?=
RING_TP ?=
AS_SHIPPED ?=
DECODE_TOKENS ?=
REPEATS ?=
WARMUP ?=
BATCH ?=
LAYOUT ?=
LAUNCHER ?=
TIMEOUT ?=
# notebooks/analysis.ipynb: run folders (space separated); empty = each run under runs/, one figure set per run
RUNS ?=

PAPERMILL := $(PY) -m papermill -k python3 --log-level WARNING

# Explicit variables become papermill parameters; -p beats -y beats -f (PARAMS).
# A MODEL without MODEL_KWARGS drops the smoke test's {"nlayers": 2}.
SWEEP_PARAMS = $(if $(PARAMS),-f $(PARAMS)) \
	$(if $(DEVICE),-p device $(DEVICE)) \
	$(if $(ARCH),-p architecture $(ARCH)) \
	$(if $(MODEL),-p variant $(MODEL) $(if $(MODEL_KWARGS),,-y 'model_kwargs: {}')) \
	$(if $(MODEL_KWARGS),-y 'model_kwargs: $(MODEL_KWARGS)') \
	$(if $(MODEL_PATH),-p model_path $(MODEL_PATH)) \
	$(if $(SOURCE),-p source $(SOURCE)) \
	$(if $(DTYPE),-p dtype $(DTYPE)) \
	$(if $(NPROC),-y 'world_sizes: [$(NPROC)]') \
	$(if $(STRATEGIES),-y 'strategies: [$(STRATEGIES)]') \
	$(if $(SEQ_LENS),-y 'seq_lens: [$(SEQ_LENS)]') \
	$(if $(PHASES),-y 'phases: [$(PHASES)]') \
	$(if $(CACHED_LENS),-y 'cached_lens: [$(CACHED_LENS)]') \
	$(if $(RING_VARIANTS),-y 'ring_variants: $(RING_VARIANTS)') \
	$(if $(RING_TP),-y 'ring_tp: [$(RING_TP)]') \
	$(if $(AS_SHIPPED),-p as_shipped $(AS_SHIPPED)) \
	$(if $(DECODE_TOKENS),-p decode_tokens $(DECODE_TOKENS)) \
	$(if $(REPEATS),-p repeats $(REPEATS)) \
	$(if $(WARMUP),-p warmup $(WARMUP)) \
	$(if $(BATCH),-p batch $(BATCH)) \
	$(if $(LAYOUT),-p layout $(LAYOUT)) \
	$(if $(LAUNCHER),-p launcher $(LAUNCHER)) \
	$(if $(TIMEOUT),-p timeout_s $(TIMEOUT))

# The run folder's name, resolved the way the notebook resolves it (NAME, PARAMS's name, or derived).
NAME_FLAGS = $(if $(PARAMS),--params $(PARAMS)) $(if $(DEVICE),--device $(DEVICE)) $(if $(ARCH),--architecture $(ARCH)) \
	$(if $(MODEL),--variant $(MODEL)) $(if $(MODEL_PATH),--model-path $(MODEL_PATH)) $(if $(DTYPE),--dtype $(DTYPE))
RUN_NAME = $(or $(NAME),$(shell $(PY) -m fmsring.sweep --print-name $(NAME_FLAGS)))

.PHONY: help venv test test-all test-gpu sweep analysis kernel notebooks clean-venv

help: ## list the targets
	@echo "targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)/  \1\t\2/' | expand -t 16
	@echo
	@echo "sweep variables (empty = notebooks/run.ipynb defaults, a CPU smoke test):"
	@echo "  DEVICE=cpu|cuda MODEL=<variant> ARCH=llama MODEL_PATH= SOURCE=hf MODEL_KWARGS='{\"nlayers\": 2}'"
	@echo "  DTYPE=float32|bfloat16 NPROC=1,2,4 STRATEGIES=single,ring,tp,torch_cp SEQ_LENS=128,8K"
	@echo "  PHASES=prefill,decode,followup CACHED_LENS=32K,128K (followup: tokens already cached; SEQ_LENS = new tokens)"
	@echo "  RING_VARIANTS='{\"\": {}, \"eager\": {\"ring_cuda_graphs\": false}}' AS_SHIPPED=true (peers unfused too)"
	@echo "  RING_TP=1,2,4 (every ring variant at each TP size: ring x tensor parallel, cp = NPROC / tp)"
	@echo "  DECODE_TOKENS= REPEATS= WARMUP= BATCH= LAYOUT= LAUNCHER=torchrun|srun TIMEOUT=<s per launch>"
	@echo "  NAME=<run folder> OUT_DIR=runs/local PARAMS=<file.yaml>   analysis: RUNS=\"runs/a runs/b\" ANALYSIS_DIR="

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed ## create .venv (python3.11) and install fmsring with its dev extras

test: venv ## the fast tier, what CI runs: every test but those marked slow (cuda ones skip without a GPU)
	$(PY) -m pytest -m "not slow"

test-all: venv ## every test, the slow end-to-end ones too
	$(PY) -m pytest

test-gpu: venv ## run only the tests that need a GPU (pytest -m cuda)
	$(PY) -m pytest -m cuda

sweep: venv ## run notebooks/run.ipynb (a sweep), then notebooks/analysis.ipynb on its run folder
	@set -e; name="$(RUN_NAME)"; run="$(OUT_DIR)/$$name"; mkdir -p "$$run"; \
	echo "sweep -> $$run (executed notebooks, results.csv, params.json, logs/, figures/)"; \
	if ! $(PAPERMILL) notebooks/run.ipynb "$$run/run.ipynb" $(SWEEP_PARAMS) -p name "$$name" -p out_dir "$(OUT_DIR)"; then \
		echo "sweep failed: see $$run/run.ipynb and $$run/logs/" >&2; exit 1; fi; \
	$(PAPERMILL) notebooks/analysis.ipynb "$$run/analysis.ipynb" -y "run_dirs: ['$$run']"; \
	$(PY) -c "import json, sys; print('points:', json.load(open(sys.argv[1]))['sessions'][-1]['statuses'])" "$$run/params.json"; \
	echo "results: $$run/results.csv"; \
	echo "plots:   $$run/figures/"; ls "$$run/figures" | sed 's/^/  /'

analysis: venv ## run notebooks/analysis.ipynb: one figure set per run under runs/, or RUNS="a b" compared
	@set -e; mkdir -p "$(ANALYSIS_DIR)"; \
	if [ -n "$(RUNS)" ]; then \
		dirs="$$(printf "'%s', " $(RUNS))"; \
		$(PAPERMILL) notebooks/analysis.ipynb "$(ANALYSIS_DIR)/compare.ipynb" -y "run_dirs: [$${dirs%, }]" \
			-p compare True -p out_dir "$(ANALYSIS_DIR)/compare"; \
		echo "executed notebook: $(ANALYSIS_DIR)/compare.ipynb, figures: $(ANALYSIS_DIR)/compare/"; \
	else \
		$(PAPERMILL) notebooks/analysis.ipynb "$(ANALYSIS_DIR)/analysis.ipynb" -p out_dir "$(ANALYSIS_DIR)"; \
		echo "executed notebook: $(ANALYSIS_DIR)/analysis.ipynb, figures: $(ANALYSIS_DIR)/<run>/"; \
	fi

kernel: venv ## register this venv as the Jupyter kernel "fmsring" (for interactive use; user-wide)
	$(PY) -m ipykernel install --user --name fmsring --display-name "Python (fmsring)"

notebooks: venv ## regenerate the .ipynb files from their paired notebooks/*.py (outputs stripped)
	$(PY) -m jupytext --update --to ipynb notebooks/run.py notebooks/analysis.py

clean-venv: ## delete .venv
	rm -rf $(VENV)
