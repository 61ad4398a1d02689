# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Run a benchmark sweep
#
# One `torchrun -m fmsring.bench` per (world size, strategy); `single` runs once, on one process.
# Everything lands in one run folder, `<out_dir>/<name>/`: `results.csv`, `params.json` (config and
# environment) and `logs/` (each launch's stdout/stderr; nothing is printed here but the progress bar).
#
# * **Checked first**: the whole grid is validated before anything is launched (unknown names, a GPU that
#   is not there, tensor-parallel sizes the heads do not divide, ...); a bad grid fails here with every problem named.
# * **Resume**: run the notebook again with the same parameters; finished points (ok, skipped, mismatch) are skipped.
# * **Faults**: a launch that fails, runs out of memory or hangs past `timeout_s` becomes
#   `error`/`oom`/`timeout` rows and the sweep goes on; a row whose logits differ from `single`'s
#   beyond the dtype's tolerance is `mismatch`. The notebook fails at the end if no point succeeded.
# * **Baselines**: the peers (`single`, `tp`, `torch_cp`) run in their strongest configuration (fused,
#   fastest SDPA backend); `as_shipped` adds them as FMS/PyTorch ship them, labelled `as-shipped`, and
#   `compile_peers` (a torch.compile mode) `single` and `tp` compiled whole as FMS's inference script compiles
#   them, labelled `compiled`; decode rows' `first_step_ms` shows what the compile costs the first token.
# * **Follow-ups**: with the `followup` phase, every `seq_lens` value T is a follow-up prompt on a cache
#   of each `cached_lens` value P (ring also times a fresh prefill of P+T).
# * Headless: `make sweep` (CPU smoke test),
#   `make sweep DEVICE=cuda MODEL=3-8b NPROC=2,4 SEQ_LENS=8K,32K DTYPE=bfloat16`,
#   or `papermill notebooks/run.ipynb out.ipynb -p device cuda -y "world_sizes: [2, 4]"`.
#
# The parameters are every `SweepConfig` field (`fmsring.harness.grid.update_notebook` writes them); their
# defaults, `notebooks/presets/smoke.yaml`, are a CPU smoke test (a 2-layer `llama/micro`, gloo) that finishes in
# a few minutes on 2 cores.

# %% tags=["parameters"]
architecture: str = 'llama'  # FMS architecture
variant: str = 'micro'  # FMS variant, e.g. micro or 3-8b (random weights, seeded)
model_path: str = ''  # checkpoint to load instead of random weights
source: str = ''  # checkpoint format for model_path, e.g. hf
model_kwargs: dict = {'nlayers': 2}  # JSON passed to get_model, e.g. {"nlayers": 2}
device: str = 'cpu'  # cpu (gloo) or cuda (nccl)
dtype: str = 'float32'  # float32, bfloat16 or float16
strategies: list = ['single', 'ring']  # among single, ring, tp, torch_cp
phases: list = ['prefill', 'decode', 'followup']  # among prefill, decode, followup
seq_lens: list = [64, 128, 256]  # prompt lengths (followup: new tokens T); K/M suffixes
cached_lens: list = [256]  # followup: tokens P already cached, e.g. 32K,128K
batch: int = 1  # prompts per batch
padding: float = 0.0  # decode a batch of unequal prompts: sequence i of b left-padded by F*i/(b-1) of the prompt, as FMS's generate pads them
layout: str = 'zigzag'  # ring token layout
repeats: int = 2  # timed runs per point
warmup: int = 1  # untimed runs per point
decode_tokens: int = 8  # greedy steps timed per decode run
ring_variants: dict = {'': {}}  # JSON {name: {fmsring.get_model ring_* options}}, e.g. {"": {}, "eager": {"ring_cuda_graphs": false}}
ring_kwargs: dict = {}  # JSON ring_* options merged into every ring variant
ring_tp: list = [1]  # TP sizes for ring, e.g. 1,2,4: each ring variant once per size (cp: world / tp)
as_shipped: bool = False  # also measure single/tp/torch_cp unfused, default SDPA backend
compile_peers: str = ''  # also measure single/tp compiled whole, as FMS's inference script compiles them, in this torch.compile mode (default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs), labelled compiled; empty: not. Their first points compile: leave stall_min_s room for it. Modes with CUDA graphs time prefill only (FMS's growing cache)
followup_recompute: bool = True  # with followup: also time ring's fresh prefill of P+T tokens
check: bool = True  # compare logits with single's (beyond the dtype's tolerance: mismatch)
stall_factor: float = 5.0  # a point past this many times its predicted time plus stall_min_s is recorded as timeout and the launch stops; 0 turns it off
stall_min_s: float = 180.0  # see stall_factor
seed: int = 0  # seeds weights and prompts (identical on every rank)
world_sizes: list = [1, 2, 4]  # processes (GPUs) per launch
out_dir: str = 'runs/local'  # folder of run folders (runs/local is git-ignored)
name: str = ''  # run folder under out_dir; empty derives one from device, model and dtype
launcher: str = 'torchrun'  # torchrun (one node) or srun (a Slurm allocation, c10d rendezvous)
timeout_s: float = 900.0  # wall-clock limit of one launch in seconds; then it is killed
bench_timeout_s: str = ''  # the bench's collective timeout; empty: timeout_s
gpus_per_node: str = ''  # srun: processes per node; empty: SLURM_GPUS_ON_NODE, else 8
rdzv_port: int = 29500  # srun: c10d rendezvous port on the head node
env: dict = {}  # extra environment variables of the launched processes

# %%
from IPython.display import display

from fmsring.harness import analysis
from fmsring.harness.grid import notebook_config
from fmsring.harness.sweep import SweepConfig, describe, grid_status, repo_root, run_sweep

cfg = notebook_config({n: globals()[n] for n in SweepConfig.names()}, repo_root())
print("run folder:", cfg.run_dir)
print("launches:", ", ".join(f"{s} x{w}" for w, s in cfg.groups()), f"({len(cfg.grid())} points)")

# %%
run_dir = run_sweep(cfg)
print(run_dir)

# %% [markdown]
# ## What came back
# Points per status, then latency (ms) per length; failed points show their status.

# %%
df = analysis.load_runs(run_dir)
display(analysis.status_table(df))
for phase in cfg.phases:
    print(phase)
    display(analysis.summary(df, phase))
failed = df[~df["status"].isin(["ok", "skipped"])]
if len(failed):
    display(failed[["strategy", "variant", "world_size", "seq_len", "cached_len", "phase", "status", "error"]])
counts = grid_status(cfg)
if not counts["ok"]:
    raise RuntimeError(f"no point of the sweep succeeded ({describe(counts)}); see {run_dir / 'logs'}")

# %% [markdown]
# Next: plot it with `notebooks/analysis.ipynb` (`run_dirs` = this run folder).
