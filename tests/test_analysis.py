"""fmsring.analysis on synthetic sweeps: loading, dedupe, every plot, and missing data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fmsring import analysis
from fmsring.bench import COLUMNS

GPU = "NVIDIA H100 80GB HBM3"


def synthetic_rows(gpu_name: str = GPU, device: str = "cuda") -> list[dict]:
    """A plausible sweep: single OOMs past 32K, ring scales, tp in between; decode too."""
    rows = []
    lens = [1024 * 2**i for i in range(8)]  # 1K .. 128K
    configs = [("single", 1)] + [(s, w) for s in ("ring", "tp") for w in (1, 2, 4, 8) if not (s == "tp" and w == 1)]
    for strategy, world in configs:
        for n in lens:
            for phase in ("prefill", "decode"):
                mem = 16 + (60 if strategy != "ring" else 60 / world) * (n / 32768) ** (
                    1.5 if strategy == "single" else 1
                )
                status = "oom" if mem > 79 else "ok"
                if phase == "prefill":
                    lat = 0.004 * n**1.6 / (world**0.9 if strategy == "ring" else world**0.6)
                else:
                    lat = 20 + n / 4096 / world
                rows.append({
                    "strategy": strategy, "world_size": world, "seq_len": n, "batch": 1, "dtype": "bfloat16",
                    "layout": "zigzag" if strategy == "ring" else "", "phase": phase,
                    "latency_ms": lat if status == "ok" else np.nan,
                    "latency_ms_min": lat * 0.97 if status == "ok" else np.nan,
                    "latency_ms_max": lat * 1.05 if status == "ok" else np.nan,
                    "ttft_ms": lat if phase == "decode" and status == "ok" else np.nan,
                    "peak_mem_gib": mem if status == "ok" else np.nan,
                    "tflops_per_gpu": 300.0, "max_abs_err": 1e-3, "rel_err": 1e-4, "same_next_token": True,
                    "status": status, "error": "CUDA out of memory" if status == "oom" else "",
                    "model": "llama/3-8b", "device": device, "repeats": 3, "gpu_name": gpu_name, "gpu_count": 8,
                    "git_sha": "abc", "torch_version": "2.13.0", "cuda_version": "12.8", "nccl_version": "2.27.3",
                    "timestamp": "2026-11-25T00:00:00+00:00",
                })  # fmt: skip
    return rows


def write_run(root: Path, name: str, rows: list[dict], decode_tokens: int = 32) -> Path:
    run = root / name
    run.mkdir(parents=True)
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(run / "results.csv", index=False)
    (run / "params.json").write_text(json.dumps({"config": {"decode_tokens": decode_tokens}}))
    return run


@pytest.fixture
def gpu_run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "runs", "h100-llama-3-8b", synthetic_rows())


def test_load_runs_tags_and_types(tmp_path: Path, gpu_run: Path):
    other = write_run(tmp_path / "runs", "h200-llama-3-8b", synthetic_rows("NVIDIA H200"))
    df = analysis.load_runs(tmp_path / "runs")  # a folder of runs
    assert set(df["run"]) == {"h100-llama-3-8b", "h200-llama-3-8b"}
    assert df["seq_len"].dtype.kind == "i" or df["seq_len"].dtype.kind == "f"
    assert df["latency_ms"].dtype.kind == "f"
    assert len(analysis.load_runs([gpu_run, other / "results.csv"])) == len(df)
    assert analysis.find_runs(tmp_path / "runs") == [gpu_run, other]


def test_dedupe_keeps_ok_then_latest(tmp_path: Path):
    base = {c: "" for c in COLUMNS} | {
        "strategy": "ring",
        "world_size": 2,
        "seq_len": 128,
        "batch": 1,
        "phase": "prefill",
    }
    rows = [
        base | {"status": "error", "error": "first try"},
        base | {"status": "ok", "latency_ms": 5.0},
        base | {"status": "timeout", "error": "later"},
        base | {"seq_len": 256, "status": "error", "error": "old"},
        base | {"seq_len": 256, "status": "timeout", "error": "new"},
    ]
    run = write_run(tmp_path, "r", rows)
    df = analysis.load_runs(run)
    assert len(df) == 2
    assert df.set_index("seq_len").loc[128, "status"] == "ok"
    assert df.set_index("seq_len").loc[256, "error"] == "new"
    assert len(analysis.load_runs(run, dedupe=False)) == 5


def _assert_saved(fig, out: Path, name: str):
    assert fig is not None
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        assert p.exists() and p.stat().st_size > 1000, p


def test_every_plot(gpu_run: Path):
    df = analysis.load_runs(gpu_run)
    out = gpu_run / "figures"
    _assert_saved(analysis.plot_latency(df), out, "latency_prefill")
    _assert_saved(analysis.plot_speedup(df), out, "speedup_prefill")
    _assert_saved(analysis.plot_efficiency(df), out, "efficiency_prefill")
    _assert_saved(analysis.plot_memory(df), out, "memory_prefill")
    _assert_saved(analysis.plot_max_prompt(df), out, "max_prompt_prefill")
    _assert_saved(analysis.plot_decode(df), out, "decode_per_token")
    assert set(analysis.plot_all(df)) == set(analysis.PLOTS)


def test_tables(gpu_run: Path):
    df = analysis.load_runs(gpu_run)
    t = analysis.scaling_table(df)
    ring8 = t[(t.strategy == "ring") & (t.world_size == 8) & (t.seq_len == 8192)].iloc[0]
    single = df[(df.strategy == "single") & (df.seq_len == 8192) & (df.phase == "prefill")].latency_ms.iloc[0]
    assert ring8.speedup == pytest.approx(single / ring8.latency_ms)
    assert ring8.efficiency == pytest.approx(ring8.speedup / 8)
    assert ring8.reference == "single x1"
    # past single's OOM the reference is ring at one GPU, then ring at its smallest world size
    no_single = analysis.scaling_table(df[df.strategy != "single"])
    ring_32k = no_single[
        (no_single.strategy == "ring") & (no_single.world_size == 8) & (no_single.seq_len == 32768)
    ].iloc[0]
    assert ring_32k.reference == "ring x1"
    ring_64k = t[(t.strategy == "ring") & (t.seq_len == 65536)].sort_values("world_size")
    assert ring_64k.iloc[0].reference.startswith("ring x2") and ring_64k.iloc[0].speedup == pytest.approx(2)
    # ring at 8 GPUs only: no reference measured, nothing to show
    only8 = df[(df.strategy == "ring") & (df.world_size == 8)]
    assert analysis.scaling_table(only8).empty and analysis.plot_speedup(only8) is None
    m = analysis.max_prompt_table(df).set_index(["strategy", "world_size"])
    assert m.loc[("single", 1), "max_ok_seq_len"] < m.loc[("single", 1), "first_oom_seq_len"]
    assert m.loc[("ring", 8), "max_ok_seq_len"] == 131072
    assert analysis.decode_per_token(df)["ms_per_token"].notna().all()
    assert not analysis.summary(df, "prefill").empty


def test_capacity_from_gpu_name():
    assert analysis.gpu_capacity_gib("NVIDIA H100 80GB HBM3") == pytest.approx(79.2, abs=0.5)
    assert analysis.gpu_capacity_gib("NVIDIA H200") == pytest.approx(139.8)
    assert analysis.gpu_capacity_gib("NVIDIA A100-SXM4-40GB") == pytest.approx(39.6, abs=0.5)
    assert analysis.gpu_capacity_gib("cpu") is None
    assert analysis.gpu_capacity_gib("") is None
    assert analysis.gpu_capacity_gib(None) is None


def test_missing_data_is_skipped(tmp_path: Path):
    rows = synthetic_rows(gpu_name="cpu", device="cpu")
    # CPU: no memory numbers, only ring, prefill only
    cpu = [r | {"peak_mem_gib": np.nan} for r in rows if r["strategy"] == "ring" and r["phase"] == "prefill"]
    df = analysis.load_runs(write_run(tmp_path, "cpu", cpu))
    assert analysis.plot_memory(df) is None
    assert analysis.plot_decode(df) is None
    assert analysis.plot_latency(df, phase="decode") is None
    assert analysis.plot_speedup(df) is not None  # ring at 1 process is the reference
    figs = analysis.plot_all(df)
    assert "memory_prefill" not in figs and "decode_per_token" not in figs

    # only failures, and an empty data frame: nothing to plot, no exception
    failed = [r | {"status": "error", "latency_ms": np.nan} for r in rows[:6]]
    df = analysis.load_runs(write_run(tmp_path, "failed", failed))
    assert analysis.plot_all(df) == {}
    assert (
        analysis.plot_all(pd.DataFrame(columns=["run", "strategy", "world_size", "seq_len", "phase", "status"])) == {}
    )

    # GPU memory without a capacity we know still plots
    unknown = [r | {"gpu_name": "Mystery Card"} for r in rows]
    assert analysis.plot_memory(analysis.load_runs(write_run(tmp_path, "unknown", unknown))) is not None


def test_figures_dir(gpu_run: Path, tmp_path: Path):
    df = analysis.load_runs(gpu_run)
    assert analysis.figures_dir(df) == gpu_run / "figures"
    assert analysis.figures_dir(df, tmp_path / "x") == tmp_path / "x"
    fig = analysis.plot_latency(df, out_dir=tmp_path / "x")
    assert (tmp_path / "x" / "latency_prefill.png").exists()
    assert fig.saved_paths[0] == tmp_path / "x" / "latency_prefill.png"


def test_scaling_lines_start_at_one_gpu(tmp_path: Path):
    """Runs with 2 and 4 GPUs only still draw each line from its 1-GPU reference."""
    rows = [
        r
        for r in synthetic_rows()
        if (r["world_size"] in (2, 4) or r["strategy"] == "single") and r["seq_len"] <= 8192  # one GPU ran these
    ]
    df = analysis.load_runs(write_run(tmp_path / "runs", "two-and-four", rows))
    for plot, y in ((analysis.plot_speedup, 1.0), (analysis.plot_efficiency, 1.0)):
        lines = [ln for ln in plot(df).axes[0].get_lines() if ln.get_label() != "ideal" and len(ln.get_xdata()) > 1]
        assert lines
        for ln in lines:
            assert ln.get_xdata()[0] == 1 and ln.get_ydata()[0] == pytest.approx(y)
