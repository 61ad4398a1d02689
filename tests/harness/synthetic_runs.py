"""Synthetic run folders for the analysis tests: results.csv rows with plausible defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fmsring.harness.schema import COLUMNS

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
