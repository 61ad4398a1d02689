"""The device's rates (:mod:`fmsring.rates`) for a bench run: measured once per
card, dtype and attention shape, and kept next to the CSV (``<out>.ceilings.json``),
so every launch of a sweep divides by the same numbers and a floor
(:func:`fmsring.harness.flops.floor_ms`) can be recomputed later.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from fmsring.harness.provenance import now, write_json
from fmsring.rates import CUDA_SIZES, FASTEST_SDPA, Rates, measure, ring_shift_gbps

__all__ = ["FASTEST_SDPA", "ceilings_path", "load_or_measure", "measure_ring_shift_gbps", "rates_key"]


def ceilings_path(out: str | os.PathLike) -> Path:
    """Where a CSV's rates are kept: ``results.csv`` -> ``results.ceilings.json``."""
    return Path(out).with_suffix(".ceilings.json")


def rates_key(gpu_name: str, dtype: str, nheads: int, head_dim: int) -> str:
    return f"{gpu_name} | {dtype} | {nheads}x{head_dim}"


def load_or_measure(
    path: Path | None, device: torch.device, dtype: str, nheads: int, head_dim: int, log=print
) -> Rates | None:
    """The rates for this card, dtype and attention shape: from ``path`` when it holds
    them, else measured now (and added to ``path``). A CPU is never measured (None),
    but rates written for it by hand ("cpu | ..." keys) are used, so the floor's
    plumbing can be exercised without a GPU."""
    cuda = device.type == "cuda"
    key = rates_key(torch.cuda.get_device_name(device) if cuda else "cpu", dtype, nheads, head_dim)
    known = json.loads(path.read_text()) if path is not None and path.exists() else {}
    if key in known:
        rates = Rates(**{k: known[key][k] for k in Rates.__dataclass_fields__ if k in known[key]})
        log(f"[bench] ceilings from {path}: {_describe(rates)}")
        return rates
    if not cuda:
        return None
    rates = measure(device, getattr(torch, dtype), nheads, head_dim)
    log(f"[bench] ceilings measured on {key}: {_describe(rates)}")
    if path is not None:
        known[key] = {**asdict(rates), "measured": now()}
        write_json(path, known)
    return rates


def _describe(r: Rates) -> str:
    return (
        f"matmul {r.matmul_tflops:.0f} TFLOP/s, causal attention {r.attention_tflops:.0f} TFLOP/s, "
        f"copy {r.memory_gbps:.0f} GB/s"
    )


def measure_ring_shift_gbps(group: dist.ProcessGroup | None = None) -> float:
    """GB/s per direction of one ring shift, all ranks at once (:func:`fmsring.rates.ring_shift_gbps`);
    NaN off CUDA or on one rank. Collective: every rank of ``group`` calls it."""
    if not dist.is_initialized() or dist.get_world_size(group) < 2 or dist.get_backend(group) != "nccl":
        return float("nan")
    device = torch.device("cuda", torch.cuda.current_device())
    return ring_shift_gbps(group, device, CUDA_SIZES.shift_bytes)
