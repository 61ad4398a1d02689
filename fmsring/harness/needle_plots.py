"""Reading a needle run (:mod:`fmsring.harness.needle`): its rows, a table per strategy, and heatmaps
of length x depth, one panel per strategy -- whether the needle was found, and whether the answer's
tokens are the unsharded model's -- drawn with seaborn and saved as PNG and PDF."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fmsring.harness.analysis import tokens
from fmsring.harness.needle import CSV

KEY = ["strategy", "world_size", "length", "depth"]
YES, NO, NONE = "#2ca02c", "#d62728", "#d9d9d9"  # found / missed / failed or not compared


def load(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A run folder's cases, one row each (its ``ok`` row, else its latest: a failed case retried on
    resume keeps its answer), in panel order, with ``panel`` naming the strategy and its ranks."""
    text = {c: str for c in ("needle", "answer", "error", "model", "git_sha")}  # "0042" stays a string
    df = pd.read_csv(Path(run_dir) / CSV, keep_default_na=False, na_values=[""], dtype=text)
    for col in ("retrieved", "identical_tokens"):
        df[col] = df[col].map({True: True, False: False, "True": True, "False": False})
    df["_ok"] = df["status"].eq("ok")
    df = df.sort_values("_ok", kind="stable").groupby(KEY, sort=False).tail(1).drop(columns="_ok")
    ranks = "GPU" if (df["device"] == "cuda").any() else "rank"
    names = {"single": "FMS unsharded", "hf": "HF transformers"}
    df["panel"] = [
        names.get(s) or f"ring, {w} {ranks}{'s' if w > 1 else ''}" for s, w in zip(df.strategy, df.world_size)
    ]
    df["_order"] = df["strategy"].map({"single": 0, "hf": 1, "ring": 2})
    return df.sort_values(["_order", "world_size", "length", "depth"]).drop(columns="_order").reset_index(drop=True)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: cases, needles found, answers identical to the unsharded model's (tokens), the
    largest first-token logit difference to it, the median prefill, cases that failed."""

    def count(s: pd.Series) -> str:
        s = s.dropna()
        return f"{int(s.sum())}/{len(s)}" if len(s) else "-"

    rows = []
    for panel, g in df.groupby("panel", sort=False):
        ok = g[g["status"] == "ok"]
        diff = ok["logits_max_abs_diff"].max() if ok["logits_max_abs_diff"].notna().any() else np.nan
        rows.append({"strategy": panel, "cases": len(g), "found": count(ok["retrieved"]),
                     "identical tokens": count(ok["identical_tokens"]), "max logit diff": diff,
                     "median prefill s": ok["prefill_s"].median(), "failed": int((g["status"] != "ok").sum())})  # fmt: skip
    return pd.DataFrame(rows)


def heatmap(df: pd.DataFrame, column: str, title: str, yes: str, no: str) -> Figure | None:
    """``column`` (True/False) over length (x) and depth (y), a panel per strategy, its count in the
    title; cells of failed cases grey with their status, of cases not run grey and empty. None where
    no row has ``column``."""
    df = df[df[column].notna() | (df["status"] != "ok")]
    if not df[column].notna().any():
        return None
    sns.set_theme(style="white", context="notebook")
    panels = list(dict.fromkeys(df["panel"]))
    lengths, depths = sorted(df["length"].unique()), sorted(df["depth"].unique())
    width = 0.7 * len(lengths) + 0.8
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + 1.5, 0.45 * len(depths) + 1.8),
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, panel in zip(axes[0], panels):
        d = df[df["panel"] == panel]
        value = d.pivot_table(index="depth", columns="length", values=column, aggfunc="first").astype(float)
        text = d.assign(_t=np.where(d["status"] != "ok", d["status"], d[column].map({True: yes, False: no})))
        text = text.pivot_table(index="depth", columns="length", values="_t", aggfunc="first")
        value, text = (t.reindex(index=depths, columns=lengths) for t in (value, text))
        sns.heatmap(value, ax=ax, vmin=0, vmax=1, cmap=ListedColormap([NO, YES]), cbar=False, linewidths=1,
                    linecolor="white")  # fmt: skip
        ax.set_facecolor(NONE)  # the cells seaborn leaves empty: failed cases, or none at that length and depth
        for (i, j), label in np.ndenumerate(text.fillna("").to_numpy()):  # seaborn writes no text in empty cells
            color = "black" if np.isnan(value.iat[i, j]) else "white"
            ax.text(j + 0.5, i + 0.5, label, ha="center", va="center", size="x-small", color=color)
        ax.set_title(f"{panel}: {int(d[column].sum())}/{int(d[column].notna().sum())}", size="medium")
        ax.set_xticklabels([tokens(n) for n in lengths], rotation=0)
        ax.set_yticklabels([f"{d:g}%" for d in depths], rotation=0)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth" if ax is axes[0][0] else "")
    handles = [Patch(color=c, label=t) for c, t in ((YES, yes), (NO, no), (NONE, "failed (status written) or not run"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.02), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    plt.close(fig)  # returned, not shown: the caller displays or saves it
    return fig


def figures(df: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> dict[str, Figure]:
    """The run's heatmaps by name (``retrieval``; ``identical`` where the unsharded model ran), each
    saved to ``out_dir`` as PNG and PDF."""
    model = ", ".join(df["model"].dropna().unique())
    figs = {"retrieval": heatmap(df, "retrieved", f"Needle in a haystack: {model}, greedy answers", "found", "missed"),
            "identical": heatmap(df, "identical_tokens", f"{model}: answer tokens against FMS unsharded", "identical",
                                 "different")}  # fmt: skip
    figs = {name: fig for name, fig in figs.items() if fig is not None}
    for name, fig in figs.items() if out_dir is not None else ():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            fig.savefig(Path(out_dir) / f"{name}.{ext}", dpi=150, bbox_inches="tight")
    return figs
