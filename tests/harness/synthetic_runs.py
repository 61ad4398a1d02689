"""Synthetic run folders for the analysis tests: results.csv rows with plausible defaults, and a needle run's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fmsring.harness import needle
from fmsring.harness.schema import AS_SHIPPED, COLUMNS, append_rows

GPU = "NVIDIA H100 80GB HBM3"


def row(strategy: str, world: int, seq_len: int, phase: str = "prefill", **kw) -> dict:
    """One results.csv row with plausible defaults."""
    base = {c: "" for c in COLUMNS} | {
        "strategy": strategy, "variant": "", "world_size": world, "seq_len": seq_len, "cached_len": 0, "batch": 1,
        "dtype": "bfloat16", "layout": "zigzag" if strategy == "ring" else "", "phase": phase, "status": "ok",
        "model": "llama/3-8b", "device": "cuda", "repeats": 3, "gpu_name": GPU, "gpu_count": 8, "git_sha": "abc",
        "timestamp": "2026-11-25T00:00:00+00:00",
    }  # fmt: skip
    return base | kw


def write_run(root: Path, name: str, rows: list[dict], decode_tokens: int = 32, csv: str = "results.csv") -> Path:
    """A run folder ``root/name`` holding ``rows`` (the columns of today's schema and any extra the rows set)."""
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys([*COLUMNS, *(k for r in rows for k in r)]))
    pd.DataFrame(rows, columns=columns).to_csv(run / csv, index=False)
    (run / "params.json").write_text(json.dumps({"config": {"decode_tokens": decode_tokens}}))
    return run


def write_needle_run(run_dir: Path, with_single: bool = True, timestamp: str = "2026-12-04T00:00:00+00:00") -> None:
    """A needle run's needle.csv: two lengths x two depths, FMS unsharded, ring at 2 ranks (a miss, a
    different answer) and at 4 (a case that failed, then finished on resume; another that failed for good)."""
    rows = []
    for strategy, world in [("single", 1), ("ring", 2), ("ring", 4)][0 if with_single else 1 :]:
        for length in (1024, 2048):
            for depth in (0, 100):
                found = not (strategy == "ring" and world == 2 and length == 2048 and depth == 0)
                same = None if strategy == "single" else not (world == 2 and length == 1024 and depth == 100)
                rows.append({"strategy": strategy, "world_size": world, "length": length, "depth": depth,
                             "prompt_tokens": length - 5, "needle": "a-b-1234", "answer": "a-b-1234" if found else "no",
                             "retrieved": found, "identical_tokens": same, "logits_max_abs_diff": None if same is None else 2e-5,
                             "prefill_s": length / 1000, "status": "ok"})  # fmt: skip
    failed = {"strategy": "ring", "world_size": 4, "depth": 0, "status": "error", "error": "exit code 1"}
    rows = rows[:-4] + [failed | {"length": 1024}] + rows[-4:-2] + [failed | {"length": 2048}] + rows[-1:]
    provenance = {"model": "smol", "device": "cpu", "dtype": "float32", "git_sha": "0123456789", "timestamp": timestamp}
    append_rows(run_dir / needle.CSV, [r | provenance for r in rows], needle.COLUMNS)


def sweep_rows(device: str = "cuda", **kw) -> list[dict]:
    """A plausible sweep: single OOMs past 32K, ring scales, tp in between; decode too."""
    rows = []
    gpu = GPU if device == "cuda" else "cpu"
    configs = [("single", 1)] + [(s, w) for s in ("ring", "tp") for w in (1, 2, 4, 8) if not (s == "tp" and w == 1)]
    for strategy, world in configs:
        for n in [1024 * 2**i for i in range(8)]:  # 1K .. 128K
            for phase in ("prefill", "decode"):
                mem = 16 + (60 if strategy != "ring" else 60 / world) * (n / 32768) ** (
                    1.5 if strategy == "single" else 1
                )
                status = "oom" if mem > 79 else "ok"
                lat = 0.004 * n**1.6 / (world**0.9 if strategy == "ring" else world**0.6)
                lat = lat if phase == "prefill" else 20 + n / 4096 / world
                timed = status == "ok"
                rows.append(row(strategy, world, n, phase, status=status, device=device, gpu_name=gpu,
                                latency_ms=lat if timed else np.nan, peak_mem_gib=mem if timed else np.nan,
                                max_abs_err=1e-3, rel_err=3e-3, ref_norm=900.0, same_next_token=True,
                                error="CUDA out of memory" if not timed else "", **kw))  # fmt: skip
    return rows


def scaling_rows() -> list[dict]:
    """Hand-sized: the fastest 1-GPU row is the default single (100 ms, not as-shipped's 130);
    ring x2 at 40 ms is super-linear (2.5x on 2 GPUs); at 16K single ran out of memory."""
    return [
        row("single", 1, 8192, latency_ms=100.0),
        row("single", 1, 8192, variant=AS_SHIPPED, latency_ms=130.0),
        row("ring", 2, 8192, latency_ms=40.0),
        row("tp", 2, 8192, latency_ms=60.0),
        row("tp", 2, 8192, variant=AS_SHIPPED, latency_ms=80.0),
        row("single", 1, 16384, status="oom", error="CUDA out of memory"),
        row("ring", 2, 16384, latency_ms=300.0),
        row("ring", 4, 16384, latency_ms=160.0),
        row("tp", 2, 16384, status="error", error="boom"),
    ]


def followup_rows() -> list[dict]:
    rows = []
    for p in (1024, 4096):
        for t in (1, 4, 16):
            rows.append(row("single", 1, t, "followup", cached_len=p, latency_ms=10 + t, floor_ms=5 + t))
            rows.append(row("ring", 2, t, "followup", cached_len=p, latency_ms=6 + t, floor_ms=3 + t))
            rows.append(row("ring", 2, p + t, "prefill", latency_ms=(p + t) / 50))
    rows.append(row("tp", 2, 4, "followup", cached_len=1024, status="oom", error="CUDA out of memory"))
    return rows


def factorisation_rows() -> list[dict]:
    """Every factorisation of 4 GPUs, prefill and decode with floors, and a ring row from before the mesh columns."""
    configs = [("ring", "", 4, 1, 100.0, 9.0), ("ring", "tp2", 2, 2, 110.0, 7.0), ("tp", "", 1, 4, 120.0, 70.0)]
    rows = []
    for s, v, cp, tp, pre, dec in configs:
        mesh = {"variant": v, "cp_size": cp, "tp_size": tp}
        rows.append(row(s, 4, 8192, "prefill", latency_ms=pre, floor_ms=pre / 2, **mesh))
        rows.append(row(s, 4, 8192, "decode", latency_ms=dec, floor_ms=dec / 3, **mesh))
    rows.append(row("ring", 2, 8192, "prefill", latency_ms=150.0))  # no mesh columns: an older row
    return rows


def seed_rows() -> list[dict]:
    """fp32 prefill at the earlier project's 6998 tokens, with rows that do not qualify."""
    return [row("single", 1, 6998, dtype="float32", latency_ms=2250.0),
            row("ring", 4, 6998, dtype="float32", latency_ms=600.0),
            row("ring", 4, 6998, dtype="float32", latency_ms=650.0, variant="slow"),
            row("ring", 4, 4096, dtype="float32", latency_ms=300.0),  # another length
            row("ring", 4, 6998, latency_ms=200.0, variant="bf16")]  # fmt: skip  # not the project's dtype
