"""fmsring.harness.plots on synthetic runs: what each figure drew (its lines, failure marks,
reference lines, axes), read back from the Figure seaborn made."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from fmsring.harness import analysis, plots, seed
from tests.harness.synthetic_runs import (
    factorisation_rows,
    followup_rows,
    row,
    scaling_rows,
    seed_rows,
    sweep_rows,
    write_run,
)  # fmt: skip


@pytest.fixture
def gpu_run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "runs", "h100-llama-3-8b", sweep_rows())


def line_through(ax, xs, ys):
    """The one line drawn through exactly these points."""
    found = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == list(xs) and np.allclose(ln.get_ydata(), ys)]
    assert len(found) == 1, (xs, ys, [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()])
    return found[0]


def labelled(ax, label: str):
    return [ln for ln in ax.get_lines() if ln.get_label() == label and len(ln.get_xdata())]


def legend(fig) -> list[str]:
    return [t.get_text() for lg in fig.legends for t in lg.get_texts()] + [
        t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()
    ]


def labelled_ticks(ax, axis: str = "y") -> list[str]:
    target = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    fmt = target.get_major_formatter()
    return [fmt(t) for t in target.get_major_locator()() if lo <= t <= hi and fmt(t)]


def test_log_axes_are_readable(tmp_path: Path):
    """Any range of times gets at least three labelled ticks and limits that hold every point."""
    for i in range(6):
        lo = 10 ** random.uniform(-3, 5)
        hi = lo * 10 ** random.uniform(0, 3)
        df = analysis.load_runs(write_run(tmp_path, f"r{i}", [row("single", 1, 1024, latency_ms=lo),
                                                            row("single", 1, 2048, latency_ms=hi)]))  # fmt: skip
        ax = plots.plot_latency(df).axes[0]
        assert len(labelled_ticks(ax)) >= 3, (lo, hi, labelled_ticks(ax))
        assert ax.get_ylim()[0] <= lo * 1.0001 and ax.get_ylim()[1] >= hi * 0.9999, (lo, hi, ax.get_ylim())


def test_latency_plot_draws_the_rows_and_the_failures(gpu_run: Path):
    df = analysis.load_runs(gpu_run)
    fig = plots.plot_latency(df)
    ax = fig.axes[0]
    want = df[(df.strategy == "ring") & (df.world_size == 8) & (df.phase == "prefill")].sort_values("seq_len")
    line_through(ax, want["seq_len"], want["latency_ms"])
    assert {"single", "ring", "tp", "1 GPU", "2 GPUs", "8 GPUs"} <= set(legend(fig))
    # every OOM point is an x marker with its status written beside it
    ooms = df[(df.phase == "prefill") & (df.status == "oom")]
    crosses = [ln for ln in ax.get_lines() if ln.get_marker() == "x" and len(ln.get_xdata())]
    assert len(crosses) == len(ooms) and sorted(c.get_xdata()[0] for c in crosses) == sorted(ooms["seq_len"])
    assert [t.get_text() for t in ax.texts].count("oom") == len(ooms)
    assert "failed (status written)" in legend(fig)
    assert len(labelled_ticks(ax, "y")) >= 3 and labelled_ticks(ax, "x")[:2] == ["1k", "2k"]
    assert not ax.collections  # no shaded band


def test_speedup_plot_flags_superlinear_points(tmp_path: Path):
    df = analysis.load_runs(write_run(tmp_path, "s", scaling_rows()))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "super-linear")  # the plot does not warn; the table does, once
        fig = plots.plot_speedup(df)
    ax = fig.axes[0]
    line_through(ax, [1, 2], [1.0, 2.5])  # ring at 8k, from its reference
    rings = [ln for ln in ax.get_lines() if ln.get_markeredgecolor() == "red" and len(ln.get_xdata())]
    assert len(rings) == 1 and list(rings[0].get_xdata()) == [2] and np.allclose(rings[0].get_ydata(), [2.5])
    assert {"super-linear (> GPUs): check the baseline", "ideal (linear)", "8k", "16k", "ring"} <= set(legend(fig))
    assert ax.get_xlabel() == "GPUs (world size)" and len(labelled_ticks(ax, "y")) >= 3


def test_cpu_runs_count_ranks(tmp_path: Path):
    rows = [r | {"device": "cpu", "gpu_name": "cpu"} for r in scaling_rows()]
    df = analysis.load_runs(write_run(tmp_path, "c", rows))
    assert plots.plot_speedup(df).axes[0].get_xlabel() == "ranks (world size)"
    assert "2 ranks" in legend(plots.plot_latency(df))


def test_followup_plot(tmp_path: Path):
    df = analysis.load_runs(write_run(tmp_path, "f", followup_rows()))
    fig = plots.plot_followup(df)
    assert len(fig.axes) == 2 and "P = 1k" in fig.axes[0].get_title() and "P = 4k" in fig.axes[1].get_title()
    ax = fig.axes[1]
    line_through(ax, [1, 4, 16], [7, 10, 22])  # ring, 2 GPUs
    assert line_through(ax, [1, 4, 16], [4, 7, 19]).get_linestyle() != "-"  # its floor
    line_through(ax, [1, 4, 16], [(4096 + t) / 50 for t in (1, 4, 16)])  # the fresh prefill of P+T
    line_through(ax, [1, 4, 16], [11, 14, 26])  # single, 1 GPU
    assert {"ring, 2 GPUs", "single, 1 GPU", "floor", "fresh prefill of P+T"} <= set(legend(fig))
    assert [t.get_text() for t in fig.axes[0].texts] == ["oom"]  # tp's failed follow-up, on P = 1k
    assert len(labelled_ticks(ax, "y")) >= 3


def test_accuracy_plot(tmp_path: Path):
    rows = [
        row("single", 1, 8192, latency_ms=100.0),
        row("ring", 2, 8192, latency_ms=40.0, max_abs_err=0.05, rel_err=4e-3, ref_norm=900.0),
        row("tp", 2, 8192, latency_ms=60.0, rel_err=0.05, max_abs_err=0.9, ref_norm=900.0, status="mismatch"),
    ]
    fig = plots.plot_accuracy(analysis.load_runs(write_run(tmp_path, "a", rows)))
    ax = fig.axes[0]
    assert np.allclose(labelled(ax, "tolerance (bfloat16)")[0].get_ydata(), [0.02, 0.02])
    points = {tuple(p) for c in ax.collections for p in c.get_offsets()}
    assert points == {(8192, 4e-3), (8192, 0.05)} and {"ring, 2 GPUs", "tp, 2 GPUs"} <= set(legend(fig))
    rings = [ln for ln in ax.get_lines() if ln.get_markeredgecolor() == "red"]
    assert [list(r.get_xdata()) for r in rings] == [[8192]]  # the mismatch


def test_every_plot_and_missing_data(gpu_run: Path, tmp_path: Path):
    df = analysis.load_runs(gpu_run)
    figs = plots.plot_all(df)
    assert set(figs) == set(plots.PLOTS) - {"followup", "seed_comparison"}  # no follow-ups, no fp32 at 6998
    assert not [ln for ln in figs["memory_prefill"].axes[0].get_lines() if "capacity" in ln.get_label()]  # no guess
    # the card's memory, where the bench recorded it in the row
    with_card = analysis.load_runs(write_run(tmp_path, "card", sweep_rows(gpu_memory_gib=79.2)))
    assert np.allclose(labelled(plots.plot_memory(with_card).axes[0], "card capacity 79 GiB")[0].get_ydata(), 79.2)
    # CPU, ring only, prefill only, no memory numbers: those plots are skipped, not failed
    cpu = [r | {"peak_mem_gib": np.nan, "device": "cpu"} for r in sweep_rows("cpu")]
    cpu = [r for r in cpu if r["strategy"] == "ring" and r["phase"] == "prefill"]
    d = analysis.load_runs(write_run(tmp_path, "cpu", cpu))
    assert plots.plot_memory(d) is None and plots.plot_decode(d) is None and plots.plot_followup(d) is None
    assert plots.plot_speedup(d) is not None  # ring at 1 process is the reference
    failed = [r | {"status": "error", "latency_ms": np.nan} for r in sweep_rows()[:6]]
    assert plots.plot_all(analysis.load_runs(write_run(tmp_path, "failed", failed))) == {}
    assert plots.plot_all(analysis.load_runs([])) == {}


def test_one_figure_set_per_run(tmp_path: Path):
    write_run(tmp_path / "runs", "first", followup_rows())
    write_run(tmp_path / "runs", "second", scaling_rows())
    sets = plots.plot_each_run(analysis.load_runs(tmp_path / "runs"), tmp_path / "out")
    assert set(sets) == {"first", "second"} and "followup" in sets["first"] and "followup" not in sets["second"]
    for run, figs in sets.items():
        assert all(len(f.axes[0].get_title().split("\n")) == 2 and run in f.axes[0].get_title() for f in figs.values())
        assert figs and all((tmp_path / "out" / run / "figures" / f"{name}.{ext}").exists() for name in figs
                            for ext in ("png", "pdf"))  # fmt: skip


def test_tradeoff_plot_weighs_factorisations(tmp_path: Path):
    """A point per configuration labelled cp x tp, its floor hollow beside it."""
    fig = plots.plot_tradeoff(analysis.load_runs(write_run(tmp_path, "r", factorisation_rows())))
    ax = fig.axes[0]
    points = {tuple(p) for c in ax.collections for p in c.get_offsets()}
    assert {(100, 9), (110, 7), (120, 70)} | {(50, 3), (55, 7 / 3), (60, 70 / 3)} == points
    assert {"ring 4x1", "ring/tp2 2x2", "tp 1x4", "floor (hollow)"} <= set(legend(fig))


def test_seed_comparison_plot_labels_the_earlier_project_as_theirs(tmp_path: Path):
    fig = plots.plot_seed_comparison(analysis.load_runs(write_run(tmp_path, "s", seed_rows())))
    assert seed.SOURCE in legend(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][:2] == ["single x1", "ring x4"]
    assert plots.plot_seed_comparison(analysis.load_runs(write_run(tmp_path, "b", seed_rows()[-1:]))) is None
