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
# # Analyse sweeps
#
# Loads the `results.csv` of one or more run folders (made by `notebooks/run.ipynb` or
# `python -m fmsring.sweep`) and shows, per run: points per status, latency tables, speedup against the
# fastest one-GPU row (super-linear points are warned about by name), an accuracy table (every row
# compared with `single`), follow-up latency against the fresh prefill of the same tokens, a profiled
# decode step's time by part against its bytes (where the run holds one), and figures:
# latency, speedup, parallel efficiency, peak memory, longest prompt before OOM, decode latency per
# token, follow-ups and exactness. Every figure is saved as PNG and PDF. A figure whose data is missing
# (a phase or strategy that was not run, memory on CPU) is skipped.
#
# Each run gets its own figure set in `<out_dir>/<run>/figures/` (by default under `runs/local/analysis/`,
# git-ignored, so the committed runs' figures are never rewritten); `compare = True` draws one set with a
# panel per run into `<out_dir>/compare/` instead. `make sweep` points `out_dir` at its own `runs/local/`.

# %% tags=["parameters"]
run_dirs: list = []  # run folders to load; empty means every folder under runs/ (runs/local/ too) with a results.csv
out_dir: str = "runs/local/analysis"  # figures go to <out_dir>/<run>/figures/ (<out_dir>/compare/ with compare)
compare: bool = False  # one figure set with a panel per run, instead of one set per run

# %%
# %matplotlib inline
import warnings
from pathlib import Path

import pandas as pd
from IPython.display import display

from fmsring.harness import analysis, plots, seed
from fmsring.harness.sweep import repo_root

ROOT = repo_root()
warnings.simplefilter("always", UserWarning)  # every super-linear point is named, in every run
pd.set_option("display.max_columns", 30, "display.width", 200)


def resolve(p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else ROOT / p


dirs = [resolve(d) for d in run_dirs] if run_dirs else analysis.find_runs(ROOT / "runs")
if not dirs:
    raise SystemExit("no run folder with a results.csv: run notebooks/run.ipynb (or make sweep) first")
df = analysis.load_runs(dirs)
print(f"{len(df)} points from {df['run'].nunique()} run(s):", ", ".join(df["run"].unique()))
display(analysis.status_table(df))

# %% [markdown]
# ## Tables

# %%
for phase in ("prefill", "decode", "followup"):
    table = analysis.summary(df, phase)
    if len(table):
        print(f"{phase} latency (ms)")
        display(table)
scaling = analysis.scaling_table(df, "prefill")
if len(scaling):
    print("prefill speedup against the fastest one-GPU row")
    index = ["run", "strategy", "variant", "world_size"]
    display(scaling.pivot_table(index=index, columns="seq_len", values="speedup").round(2))
accuracy = analysis.accuracy_table(df)
if len(accuracy):
    print("exactness against single (tolerance: the dtype's, see fmsring.harness.schema.TOLERANCES)")
    # errors in scientific notation: a fixed-point rendering of 1.99e-05 reads as 1.99
    errors = {"max_abs_err": "{:.2e}", "rel_err": "{:.2e}", "tolerance": "{:.0e}", "ref_norm": "{:.4g}"}
    display(accuracy.style.format(errors, na_rep="-"))
followup = analysis.followup_table(df)
if len(followup):
    print("follow-ups: cache_gain = fresh ring prefill of P+T / follow-up on the cache")
    display(followup)
earlier = seed.seed_comparison(df)
if len(earlier):
    print("the earlier FMS-Ring project's setting (fp32, 6998 tokens): this run beside what it reported")
    display(earlier)
links = analysis.interconnect_table(df)
if len(links):
    print("each peer's speedup over one GPU over NVLink and with NCCL through host memory (kept = pcie-like / nvlink)")
    display(links.drop(columns=["run"]).round(3))
tradeoff = analysis.tradeoff_table(df)
if len(tradeoff[tradeoff["tp_size"] > 1]) and (tradeoff["strategy"] == "ring").any():
    print("factorisations cp x tp of each world: prefill and decode against their floors")
    display(tradeoff.drop(columns=["strategy", "variant"]).round(2))
for run_dir in dirs:
    for profile_dir in sorted({p.parent for p in run_dir.rglob("decode_profile_rank*.json")}):  # one per folder
        profile = analysis.decode_profile_table(profile_dir)
        if not len(profile):
            continue
        where = profile_dir.relative_to(run_dir.parent)
        print(f"{where}: the profiled decode step (scripts/profile_decode.py) against its bytes, ms")
        table = profile.pivot_table(index="part", columns="rank", values=["ms", "over_ms"], sort=False, dropna=False)
        display(table.round(3))

# %% [markdown]
# ## Figures

# %%
out = resolve(out_dir)
figure_sets = {"compare": plots.plot_all(df, out / "compare")} if compare else plots.plot_each_run(df, out)
for run, figures in figure_sets.items():
    print(f"== {run}: {len(figures)} figures in {out / 'compare' if compare else out / run / 'figures'}")
    for fig_name, fig in figures.items():
        print(fig_name)
        display(fig)
    skipped = sorted(set(plots.PLOTS) - set(figures))
    if skipped:
        print("skipped (no data):", ", ".join(skipped))
