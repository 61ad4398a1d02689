"""Figures for readers, drawn with seaborn from :mod:`fmsring.harness.analysis`'s tables: each a
Figure with a facet per run, or None where its data was not measured (skipped, never an error).

So that a figure reads without its caption: log axes carry 1-2-5 ticks (limits rounded out to whole
decades), lengths read as tokens ("8k"), world sizes as "GPUs" (or "ranks" for CPU processes); failed
points are x markers at the top of the facet with their status, a ``mismatch`` or a super-linear
speedup a red ring; lines are medians.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from fmsring.harness import analysis, seed
from fmsring.harness.analysis import FAILED, config_label, tokens, unit
from fmsring.harness.schema import STRATEGIES, TOLERANCES

_BASE = {"single": "#1f77b4", "ring": "#d62728", "tp": "#2ca02c", "torch_cp": "#ff7f0e"}
# Every figure sets the same theme, since matplotlib reads the limits' mode again when a figure is saved.
THEME = {"style": "whitegrid", "context": "notebook", "rc": {"axes.autolimit_mode": "round_numbers"}}


def log_axis(axis, base: int = 10, fmt=lambda v, _pos=None: f"{v:g}", span=None) -> None:
    """A log axis with labelled 1-2-5 ticks (powers of ``base`` otherwise), no unlabelled minor ones,
    and with ``span`` limits just outside those values (a length axis: a tick at every power of two)."""
    (axis.axes.set_xscale if axis.axis_name == "x" else axis.axes.set_yscale)("log", base=base)
    axis.set_major_locator(LogLocator(base, subs=(1.0, 2.0, 5.0) if base == 10 else (1.0,)))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(fmt))
    if span is not None and len(v := pd.Series(span).dropna()):
        (axis.axes.set_xlim if axis.axis_name == "x" else axis.axes.set_ylim)(v.min() / 1.25, v.max() * 1.25)


def _worlds(d: pd.DataFrame, df: pd.DataFrame) -> list[str]:
    """Each row's world size as its run (in ``df``) counts it: "2 GPUs", "1 GPU", "4 ranks" (CPU processes)."""
    words = {r: unit(g) for r, g in df.groupby("run")}
    return [f"{int(w)} {words[r] if int(w) != 1 else words[r][:-1]}" for w, r in zip(d.world_size, d.run, strict=True)]


def _palette(d: pd.DataFrame, hue: str) -> dict[str, tuple]:
    """``hue``'s values in legend order (strategies as STRATEGIES, the default variant first), each
    strategy in its fixed colour and its further values (variants, world sizes) lighter."""
    rank = {s: i for i, s in enumerate(STRATEGIES)}
    first = d.drop_duplicates(hue).assign(_s=lambda t: t.strategy.map(rank),
                                          _v=lambda t: t.variant != "").sort_values(["_s", "_v", hue])  # fmt: skip
    shade = first.groupby("strategy").cumcount()
    base = [np.array(to_rgb(_BASE.get(s, "#7f7f7f"))) for s in first["strategy"]]
    return {h: tuple(c + (1 - c) * min(0.45 * i, 0.7)) for h, c, i in zip(first[hue], base, shade, strict=True)}


def _config(d: pd.DataFrame) -> pd.Series:
    """Legend names: ``ring/eager``, with the batch and padding where not the default."""
    batch, padding = d["batch"].fillna(1), d["padding"].fillna(0)
    return pd.Series([config_label(s, v) + (f" batch {b:g}" if b > 1 else "") + (f" padding {p:g}" if p else "")
                      for s, v, b, p in zip(d.strategy, d.variant, batch, padding, strict=True)], index=d.index)


def _facets(d: pd.DataFrame, kind: str, x: str, y: str, hue: str, style: str, order=None, **kw) -> sns.FacetGrid:
    """seaborn's relplot of ``d``, one facet per value of ``panel`` (its title), its legend beside the facets."""
    sns.set_theme(**THEME)
    panels = list(dict.fromkeys(d["panel"]))
    palette = kw.pop("palette", None) or _palette(d, hue)
    hue_order = order or list(palette)
    g = sns.relplot(data=d, kind=kind, x=x, y=y, hue=hue, hue_order=hue_order, style=style, palette=palette,
                    col="panel", col_order=panels, col_wrap=min(len(panels), 3), height=4.4, aspect=1.3,
                    facet_kws={"sharex": False, "sharey": False}, **kw)  # fmt: skip
    g.set_titles("{col_name}", size="medium")
    g.palette = palette
    plt.close(g.figure)  # returned, not shown: the caller displays or saves it (and pyplot keeps no reference)
    return g


def _legend(g: sns.FacetGrid, *extra) -> None:
    """seaborn's legend with ``extra`` handles (failure markers, reference lines) added once each."""
    data = dict(zip([t.get_text() for t in g.legend.texts], g.legend.legend_handles, strict=True))
    g.legend.remove()
    g.add_legend({**data, **{h.get_label(): h for h in extra}})


def _ring(ax, x, y, label: str) -> Line2D:
    """Red rings around points that need a second look (a mismatch, a super-linear speedup); the legend's handle."""
    style = {"marker": "o", "markerfacecolor": "none", "markeredgecolor": "red", "linestyle": ""}
    ax.plot(x, y, markersize=13, markeredgewidth=1.8, **style)
    return Line2D([], [], label=label, **style)


def _mark_failures(g: sns.FacetGrid, d: pd.DataFrame, hue: str, y: str) -> list:
    """Failed points as x at the top of their facet with the status written; mismatches ringed in red."""
    extra = {}
    for panel, rows in d.groupby("panel"):
        ax = g.axes_dict[panel]
        for r in rows[rows["status"].isin(FAILED)].itertuples():
            top, c = ax.get_xaxis_transform(), g.palette.get(getattr(r, hue), "gray")
            ax.plot([r.seq_len], [0.97], marker="x", color=c, markersize=8, transform=top, clip_on=False)
            ax.annotate(r.status, (r.seq_len, 0.97), xycoords=top, fontsize="x-small", color=c, rotation=90,
                        xytext=(3, -4), textcoords="offset points", va="top")  # fmt: skip
            extra["failed"] = Line2D([], [], marker="x", color="gray", linestyle="", label="failed (status written)")
        if len(bad := rows[rows["status"] == "mismatch"]):
            extra["mismatch"] = _ring(ax, bad["seq_len"], bad[y], "mismatch: logits beyond tolerance")
    return list(extra.values())


def plot_by_length(df: pd.DataFrame, y: str, ylabel: str, what: str, phase: str = "prefill", statuses=("ok",),
                   followup: bool = False) -> Figure | None:  # fmt: skip
    """``y`` against length per configuration (colour) and world size (marker), log-log, one facet per run.

    With ``followup`` the x axis is the new tokens T, a facet per run and cached length P, and each
    line comes with its floor and ring's fresh prefill of the same P+T tokens (line style).
    """
    d = df[df["phase"] == phase].sort_values(["cached_len", "seq_len"], kind="stable") if len(df) else df
    shown = d[d["status"].isin(statuses)].dropna(subset=[y]) if y in d else d.iloc[0:0]
    if shown.empty:
        return None
    d = d[d["run"].isin(shown["run"])].assign(config=_config, world=lambda t: _worlds(t, df))
    d["panel"] = [f"{what}\n{r}" for r in d["run"]]
    if followup:
        d["panel"] = [f"follow-up on a cache of P = {tokens(p)} tokens\n{r}" for r, p in zip(d.run, d.cached_len)]
        d["config"] = d["config"] + ", " + d["world"]
        d["fresh prefill of P+T"] = analysis.fresh_prefill_ms(df, d)
    lines = d[d["status"].isin(statuses)].rename(columns={y: "measured", "floor_ms": "floor"})
    measures = ["measured", *(["floor", "fresh prefill of P+T"] if followup else [])]
    lines = lines.melt(id_vars=["panel", "seq_len", "config", "strategy", "variant", "world"], value_vars=measures,
                       var_name="line", value_name=y).dropna(subset=[y])  # fmt: skip
    d = d[d["panel"].isin(lines["panel"])]
    style = "line" if followup else "world"
    g = _facets(lines, "line", "seq_len", y, "config", style, markers=True, errorbar=None,
                style_order=measures if followup else sorted(set(lines.world), key=lambda w: int(w.split()[0])))
    extra = _mark_failures(g, d, "config", y)
    for panel, ax in g.axes_dict.items():
        log_axis(ax.xaxis, 2, tokens, d.loc[d["panel"] == panel, "seq_len"])
        log_axis(ax.yaxis)
        ax.set(xlabel="new tokens T" if followup else "prompt length (tokens)", ylabel=ylabel)
        if y == "peak_mem_gib" and "gpu_memory_gib" in d:  # the card's own total_memory, where the row has it
            for cap in d.loc[d["panel"] == panel, "gpu_memory_gib"].dropna().unique():
                extra.append(ax.axhline(cap, color="crimson", linestyle=":", label=f"card capacity {cap:.0f} GiB"))
    _legend(g, *extra)
    return g.figure


def plot_latency(df: pd.DataFrame, phase: str = "prefill") -> Figure | None:
    """Median latency vs prompt length per strategy, variant and world size."""
    return plot_by_length(df, "latency_ms", f"{phase} latency (ms)", f"{phase} latency", phase, ("ok", "mismatch"))


def plot_decode(df: pd.DataFrame) -> Figure | None:
    """Decode latency per generated token (the median step: the first also captures the CUDA graph)."""
    return plot_by_length(df, "latency_ms", "decode latency (ms / token)", "decode latency per token", "decode",
                          ("ok", "mismatch"))  # fmt: skip


def plot_memory(df: pd.DataFrame, phase: str = "prefill") -> Figure | None:
    """Peak memory per GPU vs prompt length, with the card's capacity where the rows record it."""
    return plot_by_length(df, "peak_mem_gib", "peak memory per GPU (GiB)", f"{phase} peak memory", phase)


def plot_followup(df: pd.DataFrame) -> Figure | None:
    """Follow-up latency vs new tokens T, a facet per cached length P, with floors and ring's fresh prefill."""
    return plot_by_length(df, "latency_ms", "follow-up latency (ms)", "", "followup", ("ok",), followup=True)


def _scaling(df: pd.DataFrame, phase: str, y: str) -> Figure | None:
    """Speedup (log) or parallel efficiency (speedup / world size, linear) vs world size, a line per
    configuration and length, against the fastest one-GPU row, with the ideal."""
    t = analysis.scaling_table(df, phase, warn=False)
    if t.empty:
        return None
    # a line without its own one-GPU point starts at its reference (1 at one GPU), so 1-2-4 read as one curve
    key = ["run", "strategy", "variant", "seq_len", "cached_len"]
    anchors = t[t["baseline_world_size"] == 1].drop_duplicates(key)
    anchors = anchors[~anchors.set_index(key).index.isin(t[t["world_size"] == 1].set_index(key).index)]
    t = pd.concat([anchors.assign(world_size=1, speedup=1.0, efficiency=1.0, superlinear=False), t])
    words = {r: unit(g) for r, g in df.groupby("run")}
    t["panel"] = [f"{phase} {y}, vs the fastest run on 1 {words[r][:-1]}\n{r}" for r in t["run"]]
    t = t.assign(config=_config(t), length=[tokens(n) + (f" after {tokens(c)}" if c else "")
                 for n, c in zip(t["seq_len"], t["cached_len"], strict=True)])  # fmt: skip
    lengths = list(dict.fromkeys(t.sort_values(["cached_len", "seq_len"])["length"]))
    g = _facets(t, "line", "world_size", y, "length", "config", order=lengths, palette="viridis", markers=True,
                errorbar=None)
    extra = [Line2D([], [], color="black", linestyle="--", label="ideal (linear)")]
    for panel, ax in g.axes_dict.items():
        p = t[t["panel"] == panel]
        ws, w = sorted(p["world_size"].unique()), words[p["run"].iloc[0]]
        ax.plot(ws, ws if y == "speedup" else np.ones(len(ws)), color="black", linestyle="--", linewidth=1)
        if len(sup := p[p["superlinear"]]):
            extra.append(_ring(ax, sup["world_size"], sup[y], f"super-linear (> {w}): check the baseline"))
        log_axis(ax.xaxis, 2, span=ws)
        if y == "efficiency":
            ax.set(ylim=(0, max(1.1, float(p[y].max()) * 1.1)), ylabel=f"parallel efficiency (speedup / {w})")
        else:
            log_axis(ax.yaxis, 2)
            ax.set_ylabel(f"speedup (x, vs 1 {w[:-1]})")
        ax.set_xlabel(f"{w} (world size)")
        if (p["baseline_world_size"] > 1).any():
            ax.annotate(f"lengths too long for 1 {w[:-1]}: vs their smallest {w} count, ideal up to it assumed",
                        (0, -0.2), xycoords="axes fraction", fontsize="x-small", color="dimgray", va="top")  # fmt: skip
    _legend(g, *extra)
    return g.figure


def plot_speedup(df: pd.DataFrame, phase: str = "prefill") -> Figure | None:
    return _scaling(df, phase, "speedup")


def plot_efficiency(df: pd.DataFrame, phase: str = "prefill") -> Figure | None:
    return _scaling(df, phase, "efficiency")


def plot_max_prompt(df: pd.DataFrame, phase: str = "prefill") -> Figure | None:
    """Longest prompt that ran before running out of memory, per configuration (bars, log2 tokens)."""
    t = analysis.max_prompt_table(df, phase)
    if t.empty or (t := t.dropna(subset=["max_ok_seq_len"])).empty:
        return None
    t["config"] = [config_label(s, v) for s, v in zip(t["strategy"], t["variant"], strict=True)]
    t["label"] = t["config"] + " x" + t["world_size"].astype(str)
    t["panel"] = f"{phase}: longest prompt before OOM\n" + t["run"]
    t["device"] = t["run"].map(df.groupby("run")["device"].first())  # what unit() counts
    palette = _palette(t, "config")  # a strategy's colour, its variants lighter: as in every other figure
    t = t.assign(_o=t["config"].map(list(palette).index)).sort_values(["_o", "world_size"])

    def bars(data: pd.DataFrame, **_kw) -> None:
        ax = plt.gca()
        notes = ["no OOM" if np.isnan(n) else f"OOM at {tokens(n)}" for n in data["first_oom_seq_len"]]
        ax.bar_label(ax.bar(data["label"], data["max_ok_seq_len"], color=[palette[k] for k in data["config"]]),
                     notes, fontsize="small", padding=2)  # fmt: skip
        log_axis(ax.yaxis, 2, tokens)
        ax.set_ylim(data["max_ok_seq_len"].min() / 2, data["max_tested_seq_len"].max() * 2)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        ax.set(ylabel="longest prompt that ran (tokens)", xlabel=f"configuration x {unit(data)}")

    sns.set_theme(**THEME)
    g = sns.FacetGrid(t, col="panel", col_wrap=min(t["panel"].nunique(), 3), sharex=False, sharey=False, height=4.4,
                      aspect=max(1.0, (0.9 * t.groupby("panel").size().max() + 2) / 4.4))  # a bar's label fits
    g.map_dataframe(bars).set_titles("{col_name}", size="medium")
    plt.close(g.figure)
    return g.figure


def plot_tradeoff(df: pd.DataFrame) -> Figure | None:
    """Prefill time against decode ms/token, a point per configuration (``ring 2x2``: cp x tp; marker:
    the TP size), a facet per (run, world size, length) with at least two configurations in both
    phases; each point's floor hollow and joined to it. Down and left is better."""
    t = analysis.tradeoff_table(df)
    t = t[t["world_size"] > 1].dropna(subset=["prefill_ms", "decode_ms"]) if len(t) else t
    if t.empty or (t := t[t.groupby(["run", "world_size", "seq_len"]).config.transform("size") >= 2]).empty:
        return None
    t["tp"] = t["tp_size"].astype(int).map("TP {}".format)
    t["panel"] = [f"{tokens(n)} tokens on {w}: prefill vs decode\n{r}"
                  for r, w, n in zip(t.run, _worlds(t, df), t.seq_len, strict=True)]  # fmt: skip
    g = _facets(t, "scatter", "prefill_ms", "decode_ms", "config", "tp", s=55, zorder=3)
    for panel, ax in g.axes_dict.items():
        for r in t[t["panel"] == panel].itertuples():
            c = g.palette[r.config]
            ax.scatter(r.prefill_floor_ms, r.decode_floor_ms, facecolors="none", edgecolors=c, s=55, zorder=3)
            ax.plot([r.prefill_floor_ms, r.prefill_ms], [r.decode_floor_ms, r.decode_ms], color=c, lw=0.8, ls=":")
        log_axis(ax.yaxis)
        ax.set(xlabel="prefill (ms)", ylabel="decode (ms/token)")
    _legend(g, Line2D([], [], marker="o", ls=":", color="gray", markerfacecolor="none", label="floor (hollow)"))
    return g.figure


def plot_seed_comparison(df: pd.DataFrame) -> Figure | None:
    """fp32 prefill at the earlier project's 6998 tokens, per strategy and GPU count, beside the
    numbers that project reported on its own cards (hatched, labelled as reported)."""
    t = seed.seed_comparison(df)
    if t.empty:
        return None
    sns.set_theme(**THEME)
    fig = Figure(figsize=(max(6.0, 0.8 * len(t) + 2), 4.4), layout="constrained")
    ax = fig.subplots()
    theirs = t["source"] == seed.SOURCE
    colors = [(0.6,) * 3 if r else _BASE.get(c.split()[0], "gray") for c, r in zip(t["config"], theirs, strict=True)]
    ax.bar(range(len(t)), t["latency_ms"], color=colors, hatch=["//" if r else "" for r in theirs])
    ax.set_xticks(range(len(t)), t["config"], rotation=30, ha="right")
    ax.set(ylabel="prefill (ms)", xlabel="", title=f"fp32, {seed.SEED_LENGTH} tokens: this run and the earlier "
           "project's report")  # fmt: skip
    handles = [Patch(facecolor="white", edgecolor="black", label=m) for m in sorted(set(t.loc[~theirs, "source"]))]
    handles += [Patch(facecolor=(0.6,) * 3, hatch="//", label=seed.SOURCE)] * bool(theirs.any())
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize="small")
    return fig


def plot_accuracy(df: pd.DataFrame) -> Figure | None:
    """Relative error of each compared row vs tokens in context, with the dtype's tolerance;
    mismatches ringed in red. Exact rows (error 0) sit on the bottom edge."""
    t = analysis.accuracy_table(df)
    t = t[t["rel_err"].notna()] if len(t) else t
    if t.empty:
        return None
    t = t.assign(seq_len=t["seq_len"] + t["cached_len"], panel=[f"exactness against the one-GPU model\n{r}"
                 for r in t["run"]], batch=1, padding=0)  # fmt: skip
    t["config"] = _config(t) + ", " + _worlds(t, df)
    tols = {TOLERANCES[d].rel_err: d for d in t["dtype"].unique() if d in TOLERANCES}
    t["rel_err"] = t["rel_err"].clip(lower=min([*t.loc[t["rel_err"] > 0, "rel_err"], *tols, 1e-8]) / 10)
    g = _facets(t, "scatter", "seq_len", "rel_err", "config", "phase", s=50)
    extra = _mark_failures(g, t, "config", "rel_err")
    for panel, ax in g.axes_dict.items():
        extra += [ax.axhline(tol, color="black", linestyle="--", linewidth=1, label=f"tolerance ({d})")
                  for tol, d in tols.items()]  # fmt: skip
        log_axis(ax.xaxis, 2, tokens, t.loc[t["panel"] == panel, "seq_len"])
        log_axis(ax.yaxis)
        ax.set(xlabel="tokens in context (cached + new)", ylabel="relative error of the logits vs single")
    _legend(g, *extra)
    return g.figure


PLOTS = {"latency_prefill": plot_latency, "speedup_prefill": plot_speedup, "efficiency_prefill": plot_efficiency,
         "memory_prefill": plot_memory, "max_prompt_prefill": plot_max_prompt, "decode_per_token": plot_decode,
         "followup": plot_followup, "tradeoff": plot_tradeoff, "seed_comparison": plot_seed_comparison,
         "accuracy": plot_accuracy}  # fmt: skip


def plot_all(df: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> dict[str, Figure]:
    """Every plot the data allows, by name; with ``out_dir`` each is saved there as PNG and PDF."""
    figs = {name: fig for name, plot in PLOTS.items() if (fig := plot(df)) is not None}
    for name, fig in figs.items() if out_dir is not None else ():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            fig.savefig(Path(out_dir) / f"{name}.{ext}", dpi=150, bbox_inches="tight")
    return figs


def plot_each_run(df: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, dict[str, Figure]]:
    """One figure set per run, into ``<out_dir>/<run>/figures/`` (the layout of runs/), never one
    figure mixing unrelated runs: {run: {plot name: Figure}}."""
    return {run: plot_all(g, Path(out_dir) / run / "figures") for run, g in df.groupby("run", sort=False)}
