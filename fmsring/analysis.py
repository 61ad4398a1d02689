"""Load sweep results and plot them.

``load_runs`` reads the ``results.csv`` of one or more run folders (see
:mod:`fmsring.sweep`) into one DataFrame, tagged by run. Each ``plot_*``
function returns a matplotlib Figure (or ``None`` when the data it needs is
not there: a missing phase, strategy or column is skipped, never an error)
and saves it as PNG and PDF, by default into ``<run>/figures/``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

NUMERIC = (
    "world_size", "seq_len", "batch", "latency_ms", "latency_ms_min", "latency_ms_max", "ttft_ms",
    "peak_mem_gib", "tflops_per_gpu", "max_abs_err", "rel_err", "repeats", "gpu_count",
)  # fmt: skip
KEY = ("run", "strategy", "world_size", "seq_len", "batch", "phase")

# Usable memory (GiB, as torch reports it) of cards whose name gives no size.
_CARD_GIB = {
    "H200": 139.8, "H100": 79.1, "H800": 79.1, "GH200": 94.5, "B200": 178.4, "A100": 79.1, "A800": 79.1,
    "L40S": 44.4, "L40": 44.4, "L4": 22.0, "A10G": 22.0, "A10": 22.0, "A40": 44.4, "A6000": 47.5,
    "V100": 31.7, "T4": 14.6, "4090": 23.6, "3090": 23.6, "MI300X": 191.5, "MI250X": 63.98,
}  # fmt: skip


# ---------------------------------------------------------------------------
# loading


def find_runs(root: str | os.PathLike = "runs") -> list[Path]:
    """Run folders (those holding a results.csv) under ``root``, sorted."""
    root = Path(root)
    if (root / "results.csv").exists():
        return [root]
    return sorted(p.parent for p in root.glob("*/results.csv"))


def _expand(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        s = str(p)
        hits = [Path(h) for h in sorted(glob.glob(s))] if any(c in s for c in "*?[") else [Path(s)]
        for h in hits:
            if h.is_file():
                out.append(h.parent)
            elif (h / "results.csv").exists():
                out.append(h)
            elif h.is_dir():
                out.extend(find_runs(h))
            else:
                raise FileNotFoundError(f"no run folder or results.csv at {h}")
    return list(dict.fromkeys(p.resolve() for p in out))


def read_params(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's params.json ({} when absent)."""
    p = Path(run_dir) / "params.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def load_runs(paths: str | os.PathLike | Iterable[str | os.PathLike] = "runs", dedupe: bool = True) -> pd.DataFrame:
    """All rows of the given run folders (or results.csv files, or folders of runs).

    Adds ``run`` (the folder's name), ``run_dir`` and ``decode_tokens`` (from
    params.json). With ``dedupe`` a point measured more than once (a failed
    point retried on resume) keeps its ``ok`` row, or else its latest row.
    """
    frames = []
    for run_dir in _expand(paths):
        csv_path = run_dir / "results.csv"
        try:
            df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, on_bad_lines="skip")
        except pd.errors.EmptyDataError:
            continue
        if df.empty:
            continue
        cfg = read_params(run_dir).get("config", {})
        df.insert(0, "run", run_dir.name)
        df.insert(1, "run_dir", str(run_dir))
        if "decode_tokens" not in df.columns:
            df["decode_tokens"] = cfg.get("decode_tokens", np.nan)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["run", "run_dir", "strategy", "world_size", "seq_len", "phase", "status"])
    df = pd.concat(frames, ignore_index=True)
    for col in (*NUMERIC, "decode_tokens"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col].replace("", np.nan), errors="coerce")
    df = df[df["status"].isin(("ok", "oom", "error", "timeout", "skipped"))].copy()
    if "same_next_token" in df.columns:
        df["same_next_token"] = df["same_next_token"].map(
            {"True": True, "true": True, "1": True, "False": False, "false": False, "0": False}
        )
    if dedupe and not df.empty:
        key = [k for k in KEY if k in df.columns]
        df["_order"] = np.arange(len(df))
        df["_ok"] = df["status"].eq("ok")
        df = df.sort_values(["_ok", "_order"]).groupby(key, dropna=False, sort=False).tail(1)
        df = df.sort_values("_order").drop(columns=["_order", "_ok"])
    return df.reset_index(drop=True)


def summary(df: pd.DataFrame, phase: str = "prefill", value: str = "latency_ms") -> pd.DataFrame:
    """``value`` per (run, strategy, world size) x prompt length; failed points show their status."""
    d = df[df["phase"] == phase] if "phase" in df.columns else df
    if d.empty or value not in d.columns:
        return pd.DataFrame()
    shown = d[value].round(2).astype(object).where(d["status"] == "ok", d["status"])
    return d.assign(_v=shown).pivot_table(
        index=["run", "strategy", "world_size"], columns="seq_len", values="_v", aggfunc="last"
    )


# ---------------------------------------------------------------------------
# plotting helpers


def gpu_capacity_gib(gpu_name: str | None) -> float | None:
    """Memory of one card, from its name ("NVIDIA H100 80GB HBM3" -> 79.1); None for CPUs or unknown cards."""
    if not isinstance(gpu_name, str) or not gpu_name.strip() or gpu_name.strip().lower() in ("cpu", "nan", "none"):
        return None
    name = gpu_name.upper()
    m = re.search(r"(\d+)\s*GB", name)
    if m:
        return int(m.group(1)) * 0.99  # "80GB" cards show ~79.2 GiB to torch
    for card, gib in sorted(_CARD_GIB.items(), key=lambda kv: -len(kv[0])):
        if card in name:
            return gib
    return None


def figures_dir(df: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> Path:
    """``out_dir``, or ``<run>/figures`` for one run, or ``<common parent>/figures`` for several."""
    if out_dir is not None:
        return Path(out_dir)
    dirs = sorted(set(df["run_dir"])) if "run_dir" in df.columns and len(df) else []
    if len(dirs) == 1:
        return Path(dirs[0]) / "figures"
    if dirs:
        return Path(os.path.commonpath(dirs)) / "figures"
    return Path("figures")


def save_figure(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """Save ``fig`` as ``name``.png and ``name``.pdf in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    fig.saved_paths = paths  # type: ignore[attr-defined]
    return paths


def _tokens(n: float, _pos: Any = None) -> str:
    n = int(round(n))
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def _log2_axis(ax, values: Iterable[float], axis: str = "x", fmt=_tokens) -> None:
    ticks = sorted({float(v) for v in values if v and v > 0 and not math.isnan(v)})
    ax.set_xscale("log", base=2) if axis == "x" else ax.set_yscale("log", base=2)
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_minor_locator(NullLocator())
    target.set_major_formatter(FuncFormatter(fmt))


def _g(v: float, _pos: Any = None) -> str:
    return f"{v:g}"


def _log_y(ax, values: pd.Series) -> None:
    """Log y (plain numbers) when the data spans a decade or more; linear otherwise."""
    v = values[values > 0]
    if v.empty or v.max() / v.min() < 10:
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(_g))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _legend_outside(ax) -> None:
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize="small")


def _new_figure(n_panels: int, width: float = 6.0, height: float = 4.2) -> tuple[Figure, list]:
    sns.set_theme(style="whitegrid", context="notebook")
    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _ok(df: pd.DataFrame, phase: str | None, column: str) -> pd.DataFrame:
    if df.empty or column not in df.columns or "status" not in df.columns:
        return df.iloc[0:0]
    d = df[df["status"] == "ok"]
    if phase is not None:
        d = d[d["phase"] == phase] if "phase" in d.columns else d.iloc[0:0]
    return d.dropna(subset=[column, "seq_len", "world_size"])


def _panels(d: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(run, g) for run, g in d.groupby("run", sort=False)] if "run" in d.columns else [("", d)]


def _labelled(d: pd.DataFrame) -> pd.DataFrame:
    d = d.copy()
    d["GPUs"] = d["world_size"].astype(int).astype(str)
    return d


def _strategy_order(strategies: Iterable[str]) -> list[str]:
    known = ["single", "ring", "tp", "torch_cp"]
    present = set(strategies)
    return [s for s in known if s in present] + sorted(present - set(known))


def _strategy_palette(d: pd.DataFrame) -> dict[str, Any]:
    """Fixed colours: the same strategy looks the same in every plot."""
    strategies = list(dict.fromkeys(["single", "ring", "tp", "torch_cp", *sorted(d["strategy"].unique())]))
    colors = sns.color_palette("tab10", len(strategies))
    return {s: colors[strategies.index(s)] for s in _strategy_order(d["strategy"])}


def _by_length(
    d: pd.DataFrame, y: str, ylabel: str, title: str, band: tuple[str, str] | None = None, logy: bool = True
):
    panels = _panels(d)
    fig, axes = _new_figure(len(panels))
    palette = _strategy_palette(d)
    for ax, (run, g) in zip(axes, panels):
        g = _labelled(g).sort_values(["strategy", "world_size", "seq_len"])
        gpus = sorted(g["GPUs"].unique(), key=int)
        sns.lineplot(data=g, x="seq_len", y=y, hue="strategy", hue_order=list(palette), style="GPUs", style_order=gpus,
                     markers=True, dashes=True, palette=palette, ax=ax, errorbar=None)  # fmt: skip
        if band and all(c in g.columns for c in band) and g.groupby(["strategy", "world_size"]).ngroups <= 6:
            for (s, _w), line in g.groupby(["strategy", "world_size"]):
                line = line.dropna(subset=list(band))
                if len(line):
                    ax.fill_between(
                        line["seq_len"], line[band[0]], line[band[1]], color=palette[s], alpha=0.15, linewidth=0
                    )
        _log2_axis(ax, g["seq_len"])
        if logy:
            _log_y(ax, g[y])
        _legend_outside(ax)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{run}" if run else title, fontsize="medium")
    return fig, axes


# ---------------------------------------------------------------------------
# plots


def plot_latency(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, phase: str = "prefill") -> Figure | None:
    """Latency vs prompt length per strategy and GPU count (log2 x, log y; band = min..max of repeats)."""
    d = _ok(df, phase, "latency_ms")
    if d.empty:
        return None
    fig, _ = _by_length(
        d, "latency_ms", f"{phase} latency (ms)", f"{phase} latency", band=("latency_ms_min", "latency_ms_max")
    )
    save_figure(fig, figures_dir(df, out_dir), f"latency_{phase}")
    return fig


def scaling_table(df: pd.DataFrame, phase: str = "prefill") -> pd.DataFrame:
    """Speedup and parallel efficiency of every ok point against one GPU at the same prompt length.

    The reference (column ``reference``) is ``single`` at world size 1 when
    that point is ok, else the same strategy at world size 1. A prompt that no
    single GPU ran (it ran out of memory) is measured against the strategy's
    smallest world size W0 that ran it, counted as a speedup of W0 (ideal up
    to W0); its ``reference`` says so.
    """
    d = _ok(df, phase, "latency_ms")
    cols = ["reference", "baseline_ms", "baseline_world_size", "speedup", "efficiency"]
    rows = d[d["strategy"] != "single"].copy() if len(d) else d.copy()
    if rows.empty:
        return rows.assign(**{c: [] for c in cols})
    single = d[(d["strategy"] == "single") & (d["world_size"] == 1)].groupby(["run", "seq_len"])["latency_ms"].min()
    smallest = (
        rows.sort_values("world_size")
        .groupby(["run", "strategy", "seq_len"])
        .head(1)
        .set_index(["run", "strategy", "seq_len"])
    )

    def reference(r: pd.Series) -> tuple[str, float, float]:
        if (r["run"], r["seq_len"]) in single.index:
            return "single x1", float(single[(r["run"], r["seq_len"])]), 1.0
        s = smallest.loc[(r["run"], r["strategy"], r["seq_len"])]
        w0 = int(s["world_size"])
        label = f"{r['strategy']} x1" if w0 == 1 else f"{r['strategy']} x{w0} (ideal up to {w0} assumed)"
        return label, float(s["latency_ms"]), float(w0)

    refs = [reference(r) for _, r in rows.iterrows()]
    rows["reference"] = [r[0] for r in refs]
    rows["baseline_ms"] = [r[1] for r in refs]
    rows["baseline_world_size"] = [r[2] for r in refs]
    rows["speedup"] = rows["baseline_world_size"] * rows["baseline_ms"] / rows["latency_ms"]
    rows["efficiency"] = rows["speedup"] / rows["world_size"]
    # a prompt whose only point is its own assumed-ideal reference says nothing
    anchor_only = (rows["world_size"] == rows["baseline_world_size"]) & (rows["baseline_world_size"] > 1)
    measured = (~anchor_only).groupby([rows["run"], rows["strategy"], rows["seq_len"]]).transform("any")
    return rows[measured]


def _scaling_plot(df, out_dir, phase, y: str, name: str, ylabel: str) -> Figure | None:
    t = scaling_table(df, phase)
    if t.empty:
        return None
    panels = _panels(t)
    fig, axes = _new_figure(len(panels))
    for ax, (run, g) in zip(axes, panels):
        # every line starts at its 1-GPU reference (speedup and efficiency 1), so 1-2-4 GPUs read as one curve
        anchors = g[g["baseline_world_size"] == 1].drop_duplicates(["strategy", "seq_len"])
        g = pd.concat([anchors.assign(world_size=1, speedup=1.0, efficiency=1.0), g])
        g = g.sort_values(["strategy", "seq_len", "world_size"])
        g["prompt"] = g["seq_len"].astype(int).map(_tokens)
        ws = sorted(g["world_size"].unique())
        ideal = np.asarray(ws, dtype=float) if y == "speedup" else np.ones(len(ws))
        ax.plot(ws, ideal, color="black", linestyle="--", linewidth=1, label="ideal")
        palette = sns.color_palette("viridis", g["prompt"].nunique())
        sns.lineplot(
            data=g,
            x="world_size",
            y=y,
            hue="prompt",
            style="strategy",
            markers=True,
            palette=palette,
            ax=ax,
            errorbar=None,
        )
        _log2_axis(ax, ws)
        ax.set_xlabel("GPUs (world size)")
        ax.set_ylabel(ylabel)
        if y == "efficiency":
            ax.set_ylim(0, max(1.1, float(g[y].max()) * 1.1))
        else:
            lo, hi = min(1.0, float(g[y].min())), max(float(max(ws)), float(g[y].max()))
            ticks = [2.0**k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
            _log2_axis(ax, ticks, axis="y", fmt=lambda v, _p=None: f"{v:g}")
            ax.set_ylim(lo * 0.8, hi * 1.25)
        _legend_outside(ax)
        title = f"{phase} {ylabel.split(' (')[0]}"
        ax.set_title(f"{title}\n{run}" if run else title, fontsize="medium")
        if (g["baseline_world_size"] > 1).any():
            ax.annotate("prompts too long for 1 GPU: vs their smallest GPU count, ideal up to it assumed",
                        (0, -0.18), xycoords="axes fraction", fontsize="x-small", color="dimgray",
                        va="top")  # fmt: skip
    save_figure(fig, figures_dir(df, out_dir), f"{name}_{phase}")
    return fig


def plot_speedup(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, phase: str = "prefill") -> Figure | None:
    """Speedup vs number of GPUs per prompt length, with the ideal (linear) line."""
    return _scaling_plot(df, out_dir, phase, "speedup", "speedup", "speedup (x, vs 1 GPU)")


def plot_efficiency(
    df: pd.DataFrame, out_dir: str | os.PathLike | None = None, phase: str = "prefill"
) -> Figure | None:
    """Parallel efficiency (speedup / GPUs, linear y) vs number of GPUs, ideal = 1."""
    return _scaling_plot(df, out_dir, phase, "efficiency", "efficiency", "parallel efficiency (speedup / GPUs)")


def plot_memory(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, phase: str = "prefill") -> Figure | None:
    """Peak memory per GPU vs prompt length, with the card's capacity (GPU runs only)."""
    d = _ok(df, phase, "peak_mem_gib")
    if d.empty:
        return None
    fig, axes = _by_length(d, "peak_mem_gib", "peak memory per GPU (GiB)", f"{phase} peak memory", logy=False)
    for ax, (_run, g) in zip(axes, _panels(d)):
        names = g["gpu_name"].dropna().unique() if "gpu_name" in g.columns else []
        on_gpu = "device" not in g.columns or (g["device"] != "cpu").any()
        caps = {gpu_capacity_gib(n) for n in names} - {None} if on_gpu else set()
        for cap in caps:
            ax.axhline(cap, color="crimson", linestyle=":", linewidth=1.5)
            ax.annotate(f"card capacity {cap:.0f} GiB", (0.01, cap), xycoords=("axes fraction", "data"),
                        va="bottom", fontsize="small", color="crimson")  # fmt: skip
        if caps:
            ax.set_ylim(0, max(caps) * 1.08)
        _legend_outside(ax)
    save_figure(fig, figures_dir(df, out_dir), f"memory_{phase}")
    return fig


def max_prompt_table(df: pd.DataFrame, phase: str = "prefill") -> pd.DataFrame:
    """Per (run, strategy, GPUs): longest ok prompt, and the shortest one that ran out of memory."""
    if df.empty or "phase" not in df.columns:
        return pd.DataFrame()
    d = df[df["phase"] == phase].dropna(subset=["seq_len", "world_size"])
    if d.empty or not (d["status"] == "ok").any():
        return pd.DataFrame()
    out = []
    for (run, s, w), g in d.groupby(["run", "strategy", "world_size"]):
        ok = g.loc[g["status"] == "ok", "seq_len"]
        oom = g.loc[g["status"] == "oom", "seq_len"]
        out.append({
            "run": run, "strategy": s, "world_size": int(w),
            "max_ok_seq_len": int(ok.max()) if len(ok) else np.nan,
            "first_oom_seq_len": int(oom.min()) if len(oom) else np.nan,
            "max_tested_seq_len": int(g["seq_len"].max()),
        })  # fmt: skip
    return pd.DataFrame(out)


def plot_max_prompt(
    df: pd.DataFrame, out_dir: str | os.PathLike | None = None, phase: str = "prefill"
) -> Figure | None:
    """Longest prompt that ran before running out of memory, per strategy and GPU count (bars)."""
    t = max_prompt_table(df, phase)
    if t.empty or t["max_ok_seq_len"].isna().all():
        return None
    t = t.dropna(subset=["max_ok_seq_len"])
    t = (
        t.assign(_o=t["strategy"].map(_strategy_order(t["strategy"]).index))
        .sort_values(["_o", "world_size"])
        .drop(columns="_o")
    )
    t["config"] = t["strategy"] + " x" + t["world_size"].astype(str)
    panels = _panels(t)
    fig, axes = _new_figure(len(panels), width=max(5.0, 0.9 * t["config"].nunique() + 2))
    for ax, (run, g) in zip(axes, panels):
        palette = _strategy_palette(g)
        sns.barplot(
            data=g, x="config", y="max_ok_seq_len", hue="strategy", palette=palette, dodge=False, ax=ax, legend=False
        )
        _log2_axis(ax, sorted(set(g["max_ok_seq_len"]) | set(g["max_tested_seq_len"])), axis="y")
        ax.set_ylim(min(g["max_ok_seq_len"]) / 2, max(g["max_tested_seq_len"]) * 2)
        for i, (_, r) in enumerate(g.iterrows()):
            note = f"OOM at {_tokens(r['first_oom_seq_len'])}" if not math.isnan(r["first_oom_seq_len"]) else "no OOM"
            ax.annotate(
                note,
                (i, r["max_ok_seq_len"]),
                ha="center",
                va="bottom",
                fontsize="small",
                xytext=(0, 2),
                textcoords="offset points",
            )
        ax.set_xlabel("")
        ax.set_ylabel("longest prompt that ran (tokens)")
        ax.tick_params(axis="x", rotation=30)
        title = f"{phase}: longest prompt before OOM"
        ax.set_title(f"{title}\n{run}" if run else title, fontsize="medium")
    save_figure(fig, figures_dir(df, out_dir), f"max_prompt_{phase}")
    return fig


def decode_per_token(df: pd.DataFrame) -> pd.DataFrame:
    """ok decode rows with ``ms_per_token`` (and its min/max).

    fmsring.bench's decode ``latency_ms`` is already the median time of one
    greedy step (``ttft_ms`` is the cached prefill before them).
    """
    d = _ok(df, "decode", "latency_ms").copy()
    for src, dst in (
        ("latency_ms", "ms_per_token"),
        ("latency_ms_min", "ms_per_token_min"),
        ("latency_ms_max", "ms_per_token_max"),
    ):
        if src in d.columns:
            d[dst] = d[src]
    return d


def plot_decode(df: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> Figure | None:
    """Decode latency per generated token (median step) vs prompt (context) length.

    No min..max band: a generation's first step also captures fmsring's CUDA
    graph, so the max is a one-time cost (in the CSV), not the spread of steps.
    """
    d = decode_per_token(df)
    if d.empty:
        return None
    fig, _ = _by_length(d, "ms_per_token", "decode latency (ms / token)", "decode latency per token")
    save_figure(fig, figures_dir(df, out_dir), "decode_per_token")
    return fig


PLOTS = {
    "latency_prefill": lambda df, out: plot_latency(df, out, "prefill"),
    "speedup_prefill": lambda df, out: plot_speedup(df, out, "prefill"),
    "efficiency_prefill": lambda df, out: plot_efficiency(df, out, "prefill"),
    "memory_prefill": lambda df, out: plot_memory(df, out, "prefill"),
    "max_prompt_prefill": lambda df, out: plot_max_prompt(df, out, "prefill"),
    "decode_per_token": lambda df, out: plot_decode(df, out),
}


def plot_all(df: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> dict[str, Figure]:
    """Every plot the data allows, by name (plots without data are left out)."""
    figs = {}
    for name, fn in PLOTS.items():
        fig = fn(df, out_dir)
        if fig is not None:
            figs[name] = fig
    return figs
