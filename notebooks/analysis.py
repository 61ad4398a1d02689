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
# `python -m fmsring.sweep`), then plots latency, speedup, parallel efficiency, peak memory,
# longest prompt before OOM and decode latency per token. Every figure is saved as PNG and PDF
# (by default in `<run>/figures/`). A plot whose data is missing (a phase or strategy that was
# not run, memory on CPU) is skipped.

# %% tags=["parameters"]
run_dirs: list = []  # run folders to load and compare; empty means every folder under runs/ that has a results.csv
out_dir: str = ""  # where figures are saved; empty means <run>/figures for one run, <common parent>/figures for several

# %%
# %matplotlib inline
from pathlib import Path

from IPython.display import display

from fmsring import analysis
from fmsring.sweep import repo_root

ROOT = repo_root()


def resolve(p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else ROOT / p


dirs = [resolve(d) for d in run_dirs] if run_dirs else analysis.find_runs(ROOT / "runs")
if not dirs:
    raise SystemExit("no run folder with a results.csv: run notebooks/run.ipynb (or make sweep) first")
df = analysis.load_runs(dirs)
print(f"{len(df)} points from {df['run'].nunique()} run(s):", ", ".join(df["run"].unique()))
display(df.pivot_table(index=["run", "strategy", "world_size"], columns="status", values="seq_len", aggfunc="count", fill_value=0))

# %% [markdown]
# ## Tables

# %%
for phase in ("prefill", "decode"):
    table = analysis.summary(df, phase)
    if len(table):
        print(f"{phase} latency (ms)")
        display(table)
scaling = analysis.scaling_table(df, "prefill")
if len(scaling):
    display(scaling.pivot_table(index=["run", "strategy", "world_size"], columns="seq_len", values="speedup").round(2))

# %% [markdown]
# ## Figures

# %%
figures = analysis.plot_all(df, resolve(out_dir) if out_dir else None)
for fig_name, fig in figures.items():
    print(fig_name, "->", ", ".join(str(p) for p in fig.saved_paths))
    display(fig)
skipped = sorted(set(analysis.PLOTS) - set(figures))
if skipped:
    print("skipped (no data):", ", ".join(skipped))
figures_dir = analysis.figures_dir(df, resolve(out_dir) if out_dir else None)
print("figures in", figures_dir)
