"""The earlier student project's reported numbers, to draw beside a run of its own setting.

"FMS-Ring" (HPML project; ``../shared/seeds/``) ran LLaMA-3-8B in fp32 with prompts up to 6998 tokens
on 2 and 4 NVIDIA L40S and reported "~6000 ms (baseline) -> ~4000 ms (Ring, 4 GPUs)": their words and
cards, approximate as written, never mixed with measured rows, only shown beside them as reported.
"""

from __future__ import annotations

import pandas as pd

SEED_LENGTH = 6998  # the longest prompt the project tested
REPORTED = (
    {"config": "baseline (as reported)", "latency_ms": 6000.0},
    {"config": "ring, 4 GPUs (as reported)", "latency_ms": 4000.0},
)
SOURCE = "FMS-Ring project, reported (~, fp32, 6998 tokens, L40S)"


def seed_comparison(df: pd.DataFrame, tolerance: int = 64) -> pd.DataFrame:
    """Measured fp32 prefill rows at the project's length (within ``tolerance`` tokens), the fastest variant
    per (run, strategy, world size), and the reported numbers after them; ``source`` says which is which."""
    need = {"dtype", "phase", "status", "seq_len", "latency_ms"}
    if df.empty or not need <= set(df.columns):
        return pd.DataFrame()
    d = df[(df["dtype"] == "float32") & (df["phase"] == "prefill") & (df["status"] == "ok")]
    d = d[(d["seq_len"] - SEED_LENGTH).abs() <= tolerance].dropna(subset=["latency_ms"])
    if d.empty:
        return pd.DataFrame()
    best = d.sort_values("latency_ms").groupby(["run", "strategy", "world_size"], as_index=False).first()
    best = best.sort_values(["run", "world_size", "strategy"])
    gpu = best["gpu_name"].fillna("") if "gpu_name" in best.columns else ""
    measured = pd.DataFrame({
        "config": [f"{s} x{int(w)}" for s, w in zip(best["strategy"], best["world_size"], strict=True)],
        "latency_ms": best["latency_ms"],
        "source": [f"measured ({g}, {run})" for g, run in zip(gpu, best["run"], strict=True)],
    })  # fmt: skip
    reported = pd.DataFrame(REPORTED).assign(source=SOURCE)
    return pd.concat([measured, reported], ignore_index=True)
