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
#   fastest SDPA backend); `as_shipped` adds them as FMS/PyTorch ship them, labelled `as-shipped`.
# * **Follow-ups**: with the `followup` phase, every `seq_lens` value T is a follow-up prompt on a cache
#   of each `cached_lens` value P (ring also times a fresh prefill of P+T).
# * Headless: `make sweep` (CPU smoke test),
#   `make sweep DEVICE=cuda MODEL=3-8b NPROC=2,4 SEQ_LENS=8K,32K DTYPE=bfloat16`,
#   or `papermill notebooks/run.ipynb out.ipynb -p device cuda -y "world_sizes: [2, 4]"`.
#
# The defaults below are a CPU smoke test (a 2-layer `llama/micro`, gloo) that finishes in a few minutes on 2 cores.

# %% tags=["parameters"]
name: str = ""  # run folder name under out_dir; empty derives one from device, model and dtype
out_dir: str = "runs/local"  # folder of run folders, git-ignored (relative paths start at the repository root)
architecture: str = "llama"  # FMS architecture
variant: str = "micro"  # FMS variant, e.g. micro or 3-8b (seeded random weights unless model_path is set)
model_path: str = ""  # checkpoint to load instead of random weights; empty for none
source: str = ""  # checkpoint format for model_path, e.g. hf
model_kwargs: dict = {"nlayers": 2}  # extra fms get_model arguments, e.g. {"nlayers": 2}
device: str = "cpu"  # cpu (gloo) or cuda (nccl)
dtype: str = "float32"  # float32, bfloat16 or float16
world_sizes: list = [1, 2, 4]  # processes (GPUs) per launch
strategies: list = ["single", "ring"]  # among single, ring, tp, torch_cp; single runs once, on one process
seq_lens: list = [64, 128, 256]  # prompt lengths in tokens (followup: new tokens T); strings like 8K work too
phases: list = ["prefill", "decode", "followup"]  # among prefill, decode, followup
cached_lens: list = [256]  # followup: tokens P already in the cache; empty without the followup phase
ring_variants: dict = {"": {}}  # ring configurations {name: {fmsring.get_model ring_* options}}; "" is the default
ring_tp: list = [1]  # every ring variant at each TP size (ring x tensor parallel; the ring gets world size / tp)
as_shipped: bool = False  # also measure single/tp/torch_cp unfused with the default SDPA backend (as-shipped)
decode_tokens: int = 8  # greedy steps timed per decode run
repeats: int = 2  # timed runs per point
warmup: int = 1  # untimed runs per point
batch: int = 1  # prompts per batch
padding: float = 0.0  # decode only: left-pad sequence i of the batch by padding * i / (batch - 1) of the prompt
layout: str = "zigzag"  # ring token layout (zigzag or contiguous)
launcher: str = "torchrun"  # torchrun (one node) or srun (inside a Slurm allocation, c10d rendezvous)
timeout_s: float = 900.0  # wall-clock limit of one (world size, strategy) launch in seconds; then it is killed
check: bool = True  # compare each strategy's logits with single (max_abs_err, rel_err; beyond tolerance: mismatch)
extra: dict = {}  # any other SweepConfig field, e.g. {"bench_timeout_s": 600, "followup_recompute": False}

# %%
from pathlib import Path

from IPython.display import display

from fmsring.harness import analysis
from fmsring.harness.sweep import SweepConfig, describe, grid_status, repo_root, run_sweep

ROOT = repo_root()
cfg = SweepConfig(
    name=name,
    out_dir=str(Path(out_dir) if Path(out_dir).is_absolute() else ROOT / out_dir),
    architecture=architecture,
    variant=variant,
    model_path=model_path or None,
    source=source or None,
    model_kwargs=model_kwargs,
    device=device,
    dtype=dtype,
    world_sizes=world_sizes,
    strategies=strategies,
    seq_lens=seq_lens,
    phases=phases,
    cached_lens=cached_lens if "followup" in phases else [],
    ring_variants=ring_variants,
    ring_tp=ring_tp,
    as_shipped=as_shipped,
    decode_tokens=decode_tokens,
    repeats=repeats,
    warmup=warmup,
    batch=batch,
    padding=padding,
    layout=layout,
    launcher=launcher,
    timeout_s=timeout_s,
    check=check,
    **extra,
)
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
