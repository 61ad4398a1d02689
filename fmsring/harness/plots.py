"""Figures for readers, drawn from :mod:`fmsring.harness.analysis`'s tables.

Every function returns a matplotlib Figure (or None when the data it needs is
not there: a phase, strategy or column that was not measured is skipped, never
an error), one panel per run, and saves it as PNG and PDF (by default into
``<run>/figures/``). Conventions, so a figure reads without its caption:

* every log axis has several labelled ticks (1-2-5 per decade, finer when the
  data spans less), and lengths read as tokens ("8k");
* world sizes are "GPUs" for a GPU run and "ranks" for CPU processes;
* points that failed (oom, error, timeout) are drawn as x markers at the top of
  the panel with their status, a ``mismatch`` as a red ring at its time --
  never silently dropped;
* super-linear points (speedup above the world size) get a red ring and a
  legend entry that says to check the baseline;
* lines are medians; there is no shaded band.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from fmsring.harness import analysis, seed
from fmsring.harness.analysis import FAILED, tokens, config_label, unit
from fmsring.harness.schema import STRATEGIES, TOLERANCES

_BASE = {"single": "#1f77b4", "ring": "#d62728", "tp": "#2ca02c", "torch_cp": "#ff7f0e"}
_DASHES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


# ---------------------------------------------------------------------------
# axes


def log_ticks(lo: float, hi: float) -> list[float]:
    """At least three readable ticks spanning [lo, hi]: 1-2-5 per decade, finer sub-steps when
    the range is narrow. The caller sets the limits to the first and last tick."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi / lo < 1.7:
        mid = math.sqrt(lo * hi)
        lo, hi = mid / 1.3, mid * 1.3
    for subs in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        grid = [s * 10.0**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2) for s in subs]
        below = max(t for t in grid if t <= lo)
        above = min(t for t in grid if t >= hi)
        ticks = [t for t in grid if below <= t <= above]
        if len(ticks) >= 3:
            return [float(f"{t:.6g}") for t in ticks]
    return [float(f"{t:.6g}") for t in ticks]


def _num(v: float, _pos=None) -> str:
    return f"{v:g}"


def readable_log_y(ax, values: Iterable[float]) -> None:
    """A log y axis with :func:`log_ticks` over the positive ``values``."""
    v = [float(x) for x in values if x is not None and np.isfinite(x) and x > 0]
    if not v:
        return
    ticks = log_ticks(min(v), max(v))
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(_num))
    ax.set_ylim(ticks[0], ticks[-1])


def tokens_x(ax, values: Iterable[float], label: str = "prompt length (tokens)") -> None:
    """A log2 x axis with a labelled tick at every measured length (and neighbours when fewer than 3),
    but none within 30% of a smaller one: lengths like a follow-up's P+T would print over each other."""
    ticks: list[float] = []
    for v in sorted({float(v) for v in values if v and np.isfinite(v) and v > 0}):
        if not ticks or v >= ticks[-1] * 1.3:
            ticks.append(v)
    while 0 < len(ticks) < 3:
        ticks = sorted({ticks[0] / 2, *ticks, ticks[-1] * 2})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(tokens))
    if ticks:
        ax.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)
    ax.set_xlabel(label)


def _powers_of_two_y(ax, lo: float, hi: float) -> None:
    k0, k1 = math.floor(math.log2(min(lo, 1.0))), math.ceil(math.log2(hi))
    while k1 - k0 < 2:
        k0 -= 1
    ticks = [2.0**k for k in range(k0, k1 + 1)]
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(_num))
    ax.set_ylim(ticks[0] / 1.15, ticks[-1] * 1.15)


# ---------------------------------------------------------------------------
# styles and helpers


def _color(strategy: str, variant_index: int = 0) -> tuple[float, float, float]:
    """The strategy's fixed colour; its other variants lighter."""
    from matplotlib.colors import to_rgb

    base = np.array(to_rgb(_BASE.get(strategy, "#7f7f7f")))
    return tuple(base + (1 - base) * min(0.45 * variant_index, 0.7))


def _count(w: float, words: str) -> str:
    """2, "GPUs" -> "2 GPUs"; 1 -> "1 GPU"."""
    return f"{int(w)} {words if int(w) != 1 else words[:-1]}"


def _configs(d: pd.DataFrame) -> list[tuple[str, str]]:
    """(strategy, variant) pairs in a fixed order: strategies as STRATEGIES, default variant first."""
    pairs = set(zip(d["strategy"], d["variant"], strict=True))
    order = {s: i for i, s in enumerate(STRATEGIES)}
    return sorted(pairs, key=lambda p: (order.get(p[0], 99), p[0], p[1] != "", p[1]))


def _variant_index(d: pd.DataFrame, strategy: str, variant: str) -> int:
    variants = sorted(set(d.loc[d["strategy"] == strategy, "variant"]), key=lambda v: (v != "", v))
    return variants.index(variant) if variant in variants else 0


def _new_figure(nrows: int, ncols: int, width: float = 6.4, height: float = 4.4) -> tuple[Figure, np.ndarray]:
    sns.set_theme(style="whitegrid", context="notebook")  # one look for every figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _title(ax, what: str, run: str) -> None:
    ax.set_title(f"{what}\n{run}" if run else what, fontsize="medium")


def _legend(ax, extra: list | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    for h in extra or []:
        handles.append(h)
        labels.append(h.get_label())
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize="small")


def figures_dir(df: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> Path:
    """``out_dir``, or ``<run>/figures`` for one run, or ``<common parent>/figures`` for several."""
    if out_dir is not None:
        return Path(out_dir)
    dirs = sorted(set(df["run_dir"])) if "run_dir" in df.columns and len(df) else []
    if len(dirs) == 1:
        return Path(dirs[0]) / "figures"
    return Path(os.path.commonpath(dirs)) / "figures" if dirs else Path("figures")


def save_figure(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """Save ``fig`` as ``name``.png and ``name``.pdf in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    fig.saved_paths = paths  # type: ignore[attr-defined]
    return paths


def _runs(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return list(df.groupby("run", sort=False)) if "run" in df.columns else [("", df)]


def _mark_failures(ax, d: pd.DataFrame, y: str, colors: dict) -> list:
    """Failed points as x at the top of the panel with their status; mismatches as red rings."""
    handles = []
    failed = d[d["status"].isin(FAILED)]
    if len(failed):
        top = ax.get_xaxis_transform()
        for r in failed.itertuples():
            c = colors.get((r.strategy, r.variant), "gray")
            ax.plot([r.seq_len], [0.97], marker="x", color=c, markersize=8, transform=top, clip_on=False)
            ax.annotate(r.status, (r.seq_len, 0.97), xycoords=top, fontsize="x-small", color=c, rotation=90,
                        xytext=(3, -4), textcoords="offset points", va="top")  # fmt: skip
        handles.append(Line2D([], [], marker="x", color="gray", linestyle="", label="failed (status written)"))
    bad = d[(d["status"] == "mismatch") & d[y].notna()]
    if len(bad):
        ax.plot(bad["seq_len"], bad[y], linestyle="", marker="o", markersize=12, markerfacecolor="none",
                markeredgecolor="red", markeredgewidth=1.5)  # fmt: skip
        handles.append(Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor="red", linestyle="",
                              label="mismatch: logits beyond tolerance"))  # fmt: skip
    return handles


def _by_length(df: pd.DataFrame, phase: str, y: str, ylabel: str, what: str, statuses=("ok",)) -> Figure | None:
    """One line per (strategy, variant, world size) of ``y`` vs length, one panel per run."""
    d = df[df["phase"] == phase] if "phase" in df.columns else df.iloc[0:0]
    shown = d[d["status"].isin(statuses) & d[y].notna()] if y in d.columns else d.iloc[0:0]
    if shown.empty:
        return None
    runs = [(run, g) for run, g in _runs(d) if run in set(shown["run"])]
    fig, axes = _new_figure(1, len(runs))
    for ax, (run, g) in zip(axes[0], runs, strict=True):
        ok = g[g["status"].isin(statuses)].dropna(subset=[y]).sort_values("seq_len")
        worlds = sorted(g["world_size"].dropna().unique())
        colors = {c: _color(c[0], _variant_index(g, *c)) for c in _configs(g)}
        for strategy, variant in _configs(ok):
            for w, line in ok[(ok["strategy"] == strategy) & (ok["variant"] == variant)].groupby("world_size"):
                ax.plot(line["seq_len"], line[y], color=colors[(strategy, variant)],
                        marker=_MARKERS[worlds.index(w) % len(_MARKERS)],
                        linestyle=_DASHES[_variant_index(g, strategy, variant) % len(_DASHES)],
                        label=f"{config_label(strategy, variant)}, {_count(w, unit(g))}")  # fmt: skip
        tokens_x(ax, g["seq_len"])
        readable_log_y(ax, ok[y])
        extra = _mark_failures(ax, g, y, colors)
        ax.set_ylabel(ylabel)
        _title(ax, what, run)
        _legend(ax, extra)
    return fig


# ---------------------------------------------------------------------------
# plots


def plot_latency(df: pd.DataFrame, out_dir=None, phase: str = "prefill") -> Figure | None:
    """Median latency vs prompt length per strategy, variant and world size (log-log)."""
    fig = _by_length(df, phase, "latency_ms", f"{phase} latency (ms)", f"{phase} latency", ("ok", "mismatch"))
    if fig is not None:
        save_figure(fig, figures_dir(df, out_dir), f"latency_{phase}")
    return fig


def plot_decode(df: pd.DataFrame, out_dir=None) -> Figure | None:
    """Decode latency per generated token (median step) vs context length.

    The first step of a generation also captures fmsring's CUDA graph, so the
    CSV's max is a one-time cost, not a spread of steps: only the median is drawn.
    """
    fig = _by_length(df, "decode", "latency_ms", "decode latency (ms / token)", "decode latency per token",
                     ("ok", "mismatch"))  # fmt: skip
    if fig is not None:
        save_figure(fig, figures_dir(df, out_dir), "decode_per_token")
    return fig


def plot_memory(df: pd.DataFrame, out_dir=None, phase: str = "prefill") -> Figure | None:
    """Peak memory per GPU vs prompt length, with the card's capacity (GPU runs only)."""
    fig = _by_length(df, phase, "peak_mem_gib", "peak memory per GPU (GiB)", f"{phase} peak memory")
    if fig is None:
        return None
    shown = [(run, g) for run, g in _runs(df) if g["peak_mem_gib"].notna().any()]
    for ax, (_run, g) in zip(fig.axes, shown, strict=False):
        caps = {analysis.gpu_capacity_gib(n) for n in g["gpu_name"].dropna().unique()} - {None}
        for cap in caps:
            ax.axhline(cap, color="crimson", linestyle=":", linewidth=1.5, label=f"card capacity {cap:.0f} GiB")
        if caps:
            readable_log_y(ax, [*g["peak_mem_gib"].dropna(), *caps])
            _legend(ax, [h for h in ax.get_legend().legend_handles if h.get_label().startswith("failed")])
    save_figure(fig, figures_dir(df, out_dir), f"memory_{phase}")
    return fig


def _scaling_plot(df: pd.DataFrame, out_dir, phase: str, y: str, name: str, ylabel: str) -> Figure | None:
    t = analysis.scaling_table(df, phase, warn=False)
    if t.empty:
        return None
    runs = _runs(t)
    fig, axes = _new_figure(1, len(runs))
    for ax, (run, g) in zip(axes[0], runs, strict=True):
        words = unit(df[df["run"] == run])
        # a line without its own 1-GPU point starts at its reference (speedup and efficiency 1), so 1-2-4 read
        # as one curve; a line that has one (ring on one GPU) starts where it is
        line_key = ["strategy", "variant", "seq_len", "cached_len"]
        has_one = g[g["world_size"] == 1].set_index(line_key).index
        anchors = g[g["baseline_world_size"] == 1].drop_duplicates(line_key)
        anchors = anchors[~anchors.set_index(line_key).index.isin(has_one)]
        g = pd.concat([anchors.assign(world_size=1, speedup=1.0, efficiency=1.0, superlinear=False), g])
        ws = sorted(g["world_size"].unique())
        ideal = np.asarray(ws, dtype=float) if y == "speedup" else np.ones(len(ws))
        ax.plot(ws, ideal, color="black", linestyle="--", linewidth=1, label="ideal (linear)")
        lengths = sorted(g["seq_len"].unique())
        for ci, (strategy, variant) in enumerate(_configs(g)):
            for li, n in enumerate(lengths):
                line = g[(g["strategy"] == strategy) & (g["variant"] == variant) & (g["seq_len"] == n)]
                for cached, part in line.groupby("cached_len"):
                    part = part.sort_values("world_size")
                    after = f" after {tokens(cached)}" if cached else ""
                    ax.plot(part["world_size"], part[y], marker=_MARKERS[ci % len(_MARKERS)],
                            linestyle=_DASHES[ci % len(_DASHES)], color=_shade(li, len(lengths)),
                            label=f"{config_label(strategy, variant)}, {tokens(n)}{after}")  # fmt: skip
        sup = g[g["superlinear"]]
        extra = []
        if len(sup):
            ax.plot(sup["world_size"], sup[y], linestyle="", marker="o", markersize=14, markerfacecolor="none",
                    markeredgecolor="red", markeredgewidth=2)  # fmt: skip
            extra.append(Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor="red", linestyle="",
                                label=f"super-linear (> {words}): check the baseline"))  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ws))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(_num))
        ax.set_xlabel(f"{words} (world size)")
        if y == "efficiency":
            ax.set_ylim(0, max(1.1, float(g[y].max()) * 1.1))
        else:
            _powers_of_two_y(ax, float(g[y].min()), max(float(max(ws)), float(g[y].max())))
        ax.set_ylabel(ylabel.format(unit=words, one=words[:-1]))
        _title(ax, f"{phase} {name}, vs the fastest run on 1 {words[:-1]}", run)
        if (g["baseline_world_size"] > 1).any():
            ax.annotate(f"lengths too long for 1 {words[:-1]}: vs their smallest {words} count, ideal up to it assumed",
                        (0, -0.2), xycoords="axes fraction", fontsize="x-small", color="dimgray", va="top")  # fmt: skip
        _legend(ax, extra)
    save_figure(fig, figures_dir(df, out_dir), f"{name}_{phase}")
    return fig


def _shade(i: int, n: int) -> tuple:
    from matplotlib import colormaps

    return colormaps["viridis"](0.1 + 0.8 * i / max(n - 1, 1))


def plot_speedup(df: pd.DataFrame, out_dir=None, phase: str = "prefill") -> Figure | None:
    """Speedup vs world size per length, against the fastest one-GPU row, with the ideal line."""
    return _scaling_plot(df, out_dir, phase, "speedup", "speedup", "speedup (x, vs 1 {one})")


def plot_efficiency(df: pd.DataFrame, out_dir=None, phase: str = "prefill") -> Figure | None:
    """Parallel efficiency (speedup / world size, linear y) vs world size, ideal = 1."""
    return _scaling_plot(df, out_dir, phase, "efficiency", "efficiency", "parallel efficiency (speedup / {unit})")


def plot_max_prompt(df: pd.DataFrame, out_dir=None, phase: str = "prefill") -> Figure | None:
    """Longest prompt that ran before running out of memory, per configuration (bars)."""
    t = analysis.max_prompt_table(df, phase)
    if t.empty or t["max_ok_seq_len"].isna().all():
        return None
    t = t.dropna(subset=["max_ok_seq_len"])
    runs = _runs(t)
    fig, axes = _new_figure(1, len(runs), width=max(5.0, 0.9 * len(t) / len(runs) + 2))
    for ax, (run, g) in zip(axes[0], runs, strict=True):
        g = g.assign(_o=g["strategy"].map(lambda s: STRATEGIES.index(s) if s in STRATEGIES else 99))
        g = g.sort_values(["_o", "variant", "world_size"])
        words = unit(df[df["run"] == run])
        labels = [
            f"{config_label(s, v)} x{w}" for s, v, w in zip(g["strategy"], g["variant"], g["world_size"], strict=True)
        ]
        colors = [_color(s, _variant_index(g, s, v)) for s, v in zip(g["strategy"], g["variant"], strict=True)]
        x = np.arange(len(g))
        ax.bar(x, g["max_ok_seq_len"], color=colors)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_yscale("log", base=2)
        ticks = sorted(set(g["max_ok_seq_len"]) | set(g["max_tested_seq_len"]))
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(tokens))
        ax.set_ylim(min(ticks) / 2, max(ticks) * 2)
        for i, r in enumerate(g.itertuples()):
            note = f"OOM at {tokens(r.first_oom_seq_len)}" if not math.isnan(r.first_oom_seq_len) else "no OOM"
            ax.annotate(note, (i, r.max_ok_seq_len), ha="center", va="bottom", fontsize="small", xytext=(0, 2),
                        textcoords="offset points")  # fmt: skip
        ax.set_ylabel("longest prompt that ran (tokens)")
        ax.set_xlabel(f"configuration x {words}")
        _title(ax, f"{phase}: longest prompt before OOM", run)
    save_figure(fig, figures_dir(df, out_dir), f"max_prompt_{phase}")
    return fig


_TP_MARKERS = {1: "o", 2: "s", 4: "D", 8: "^", 16: "v"}  # tradeoff: the marker says how the weights are split


def plot_tradeoff(df: pd.DataFrame, out_dir=None) -> Figure | None:
    """Prefill time against decode ms/token, one point per configuration (``ring 2x2``: cp x tp),
    one panel per (run, world size, prompt length) with at least two configurations measured in
    both phases; each point's floor hollow, joined to it. Down and left is better: the panel shows
    what a factorisation of the same GPUs buys in one phase and pays in the other. The marker
    shape is the TP size."""
    t = analysis.tradeoff_table(df)
    if t.empty:
        return None
    t = t.dropna(subset=["prefill_ms", "decode_ms"])
    t = t[t["world_size"] > 1]
    panels = [(k, g) for k, g in t.groupby(["run", "world_size", "seq_len"], sort=True) if len(g) >= 2]
    if not panels:
        return None
    fig, axes = _new_figure(1, len(panels), width=6.0)
    for ax, ((run, world, seq_len), g) in zip(axes[0], panels, strict=True):
        for r in g.itertuples():
            color = _color(r.strategy, _variant_index(g, r.strategy, r.variant))
            marker = _TP_MARKERS.get(int(r.tp_size), "P")
            ax.scatter(r.prefill_ms, r.decode_ms, color=color, marker=marker, s=55, zorder=3, label=r.config)
            if math.isfinite(r.prefill_floor_ms) and math.isfinite(r.decode_floor_ms):
                ax.scatter(r.prefill_floor_ms, r.decode_floor_ms, facecolors="none", edgecolors=color, marker=marker,
                           s=55, zorder=3)  # fmt: skip
                ax.plot([r.prefill_floor_ms, r.prefill_ms], [r.decode_floor_ms, r.decode_ms], color=color, lw=0.8,
                        ls=":", zorder=2)  # fmt: skip
        ax.xaxis.set_major_formatter(FuncFormatter(_num))
        ax.set_yscale("log")
        readable_log_y(ax, [*g["decode_ms"], *g["decode_floor_ms"].dropna()])
        ax.set_xlabel("prefill (ms)")
        ax.set_ylabel("decode (ms/token)")
        floor = Line2D([], [], marker="o", ls=":", color="gray", markerfacecolor="none", label="floor (hollow)")
        _legend(ax, [floor])
        _title(ax, f"{tokens(seq_len)} tokens on {_count(world, unit(df[df['run'] == run]))}: prefill vs decode", run)
    save_figure(fig, figures_dir(df, out_dir), "tradeoff")
    return fig


def plot_seed_comparison(df: pd.DataFrame, out_dir=None) -> Figure | None:
    """fp32 prefill at the earlier project's 6998 tokens, per strategy and GPU count, beside the
    numbers that project reported on its own cards (hatched, labelled as reported)."""
    t = seed.seed_comparison(df)
    if t.empty:
        return None
    fig, axes = _new_figure(1, 1, width=max(6.0, 0.8 * len(t) + 2))
    ax = axes[0][0]
    theirs = t["source"] == seed.SOURCE
    x = np.arange(len(t))
    colors = [_color(c.split()[0]) if not r else (0.6, 0.6, 0.6) for c, r in zip(t["config"], theirs, strict=True)]
    bars = ax.bar(x, t["latency_ms"], color=colors)
    for bar, reported in zip(bars, theirs, strict=True):
        if reported:
            bar.set_hatch("//")
    ax.set_xticks(x, t["config"], rotation=30, ha="right")
    ax.set_ylabel("prefill (ms)")
    measured = sorted(set(t.loc[~theirs, "source"]))
    handles = [Patch(facecolor="white", edgecolor="black", label=m) for m in measured]
    handles += [Patch(facecolor=(0.6, 0.6, 0.6), hatch="//", label=seed.SOURCE)] if theirs.any() else []
    _legend(ax, handles)
    _title(ax, f"fp32, {seed.SEED_LENGTH} tokens: this run and the earlier project's report", "")
    save_figure(fig, figures_dir(df, out_dir), "seed_comparison")
    return fig


def plot_followup(df: pd.DataFrame, out_dir=None) -> Figure | None:
    """Follow-up latency vs new tokens T, one panel per cached length P (log-log): one line per
    strategy, variant and world size (marker: world size), its floor dashed, and ring's fresh
    prefill of the same P+T tokens dotted with hollow markers."""
    t = analysis.followup_table(df)
    if t.empty:
        return None
    panels = [(run, p, g) for run, r in _runs(t) for p, g in r.groupby("cached_len")]
    fig, axes = _new_figure(1, len(panels))
    for ax, (run, cached, g) in zip(axes[0], panels, strict=True):
        words = unit(df[df["run"] == run])
        all_rows = df[(df["run"] == run) & (df["phase"] == "followup") & (df["cached_len"] == cached)]
        colors = {c: _color(c[0], _variant_index(all_rows, *c)) for c in _configs(all_rows)}
        values, worlds = [], sorted(all_rows["world_size"].unique())
        for strategy, variant in _configs(g):
            for w, line in g[(g["strategy"] == strategy) & (g["variant"] == variant)].groupby("world_size"):
                line = line.sort_values("seq_len")
                c, label = colors[(strategy, variant)], f"{config_label(strategy, variant)}, {_count(w, words)}"
                m = _MARKERS[worlds.index(w) % len(_MARKERS)]
                ax.plot(line["seq_len"], line["latency_ms"], color=c, marker=m, label=label)
                if line["floor_ms"].notna().any():
                    ax.plot(line["seq_len"], line["floor_ms"], color=c, linestyle="--", linewidth=1,
                            label=f"{label}: floor")  # fmt: skip
                if strategy == "ring" and line["recompute_ms"].notna().any():
                    ax.plot(line["seq_len"], line["recompute_ms"], color=c, linestyle=":", marker=m,
                            markerfacecolor="white", label=f"{label}: fresh prefill of P+T")  # fmt: skip
                values += [*line["latency_ms"], *line["floor_ms"], *line["recompute_ms"]]
        tokens_x(ax, g["seq_len"], "new tokens T")
        readable_log_y(ax, values)
        extra = _mark_failures(ax, all_rows, "latency_ms", colors)
        ax.set_ylabel("follow-up latency (ms)")
        _title(ax, f"follow-up on a cache of P = {tokens(cached)} tokens", run)
        _legend(ax, extra)
    save_figure(fig, figures_dir(df, out_dir), "followup")
    return fig


def plot_accuracy(df: pd.DataFrame, out_dir=None) -> Figure | None:
    """Relative error of each compared row vs tokens in context, with the dtype's tolerance;
    mismatches ringed in red. Exact rows (error 0) sit on the bottom edge."""
    t = analysis.accuracy_table(df)
    t = t[t["rel_err"].notna()] if len(t) else t
    if t.empty:
        return None
    runs = _runs(t)
    fig, axes = _new_figure(1, len(runs))
    for ax, (run, g) in zip(axes[0], runs, strict=True):
        g = g.assign(context=g["seq_len"] + g["cached_len"])
        words = unit(df[df["run"] == run])
        tols = {TOLERANCES[d].rel_err: d for d in g["dtype"].unique() if d in TOLERANCES}
        positive = g.loc[g["rel_err"] > 0, "rel_err"]
        bottom = min([*positive, *tols]) / 10 if len(positive) or tols else 1e-9
        markers = {"prefill": "o", "decode": "s", "followup": "^"}
        for strategy, variant in _configs(g):
            for (w, phase), part in g[(g["strategy"] == strategy) & (g["variant"] == variant)].groupby(
                ["world_size", "phase"]
            ):
                ax.plot(part["context"], part["rel_err"].clip(lower=bottom), linestyle="",
                        marker=markers.get(phase, "o"), color=_color(strategy, _variant_index(g, strategy, variant)),
                        label=f"{config_label(strategy, variant)}, {_count(w, words)}, {phase}")  # fmt: skip
        for tol, dtype in tols.items():
            ax.axhline(tol, color="black", linestyle="--", linewidth=1, label=f"tolerance ({dtype})")
        bad = g[g["status"] == "mismatch"]
        if len(bad):
            ax.plot(bad["context"], bad["rel_err"].clip(lower=bottom), linestyle="", marker="o", markersize=12,
                    markerfacecolor="none", markeredgecolor="red", markeredgewidth=1.5, label="mismatch")  # fmt: skip
        tokens_x(ax, g["context"], "tokens in context (cached + new)")
        readable_log_y(ax, [*g["rel_err"].clip(lower=bottom), *tols])
        ax.set_ylabel("relative error of the logits vs single")
        _title(ax, "exactness against the one-GPU model", run)
        _legend(ax)
    save_figure(fig, figures_dir(df, out_dir), "accuracy")
    return fig


PLOTS = {
    "latency_prefill": lambda df, out: plot_latency(df, out, "prefill"),
    "speedup_prefill": lambda df, out: plot_speedup(df, out, "prefill"),
    "efficiency_prefill": lambda df, out: plot_efficiency(df, out, "prefill"),
    "memory_prefill": lambda df, out: plot_memory(df, out, "prefill"),
    "max_prompt_prefill": lambda df, out: plot_max_prompt(df, out, "prefill"),
    "decode_per_token": lambda df, out: plot_decode(df, out),
    "followup": lambda df, out: plot_followup(df, out),
    "tradeoff": lambda df, out: plot_tradeoff(df, out),
    "seed_comparison": lambda df, out: plot_seed_comparison(df, out),
    "accuracy": lambda df, out: plot_accuracy(df, out),
}


def plot_all(df: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> dict[str, Figure]:
    """Every plot the data allows, by name (plots without data are left out)."""
    figs = {}
    for name, fn in PLOTS.items():
        fig = fn(df, out_dir)
        if fig is not None:
            figs[name] = fig
    return figs


def plot_each_run(df: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> dict[str, dict[str, Figure]]:
    """One figure set per run (into ``<out_dir>/<run>/`` or each run's own ``figures/``), never one
    figure mixing unrelated runs: {run: {plot name: Figure}}."""
    return {
        run: plot_all(g, Path(out_dir) / run if out_dir is not None else None)
        for run, g in df.groupby("run", sort=False)
    }
