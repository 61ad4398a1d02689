"""The device's ceilings, measured once per bench run in a few seconds: the rates
that turn a row's work into its floor (:func:`fmsring.harness.flops.floor_ms`).

Datasheet peaks are not reachable, and differ between cards of one name
(clocks, power caps), so the floor divides by what this GPU does here: one
large GEMM in the run's dtype, one causal SDPA call at a representative block
with the model's head dim, one large device-to-device copy. The rates are kept
next to the CSV (``<out>.ceilings.json``), keyed by card, dtype and attention
shape, so every launch of a sweep divides by the same numbers and a floor can
be recomputed later.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmsring.harness.flops import Rates

FASTEST_SDPA = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
GEMM_SIZE = 8192
ATTENTION_BLOCK = 8192  # tokens of query and key: a ring block at 16K-128K prompts is this size or larger
COPY_BYTES = 1 << 30


def ceilings_path(out: str | os.PathLike) -> Path:
    """Where a CSV's rates are kept: ``results.csv`` -> ``results.ceilings.json``."""
    return Path(out).with_suffix(".ceilings.json")


def _time_ms(fn, iters: int) -> float:
    """Mean time of ``iters`` back-to-back calls after two warm-ups, by CUDA events."""
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _gemm_ms(device: torch.device, dtype: torch.dtype) -> float:
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, dtype=dtype, device=device)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, dtype=dtype, device=device)
    return _time_ms(lambda: a @ b, 10)


def _attention_ms(device: torch.device, dtype: torch.dtype, nheads: int, head_dim: int) -> float:
    q, k, v = (torch.randn(1, nheads, ATTENTION_BLOCK, head_dim, dtype=dtype, device=device) for _ in range(3))
    with sdpa_kernel(FASTEST_SDPA, set_priority=True):
        return _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 10)


def _copy_ms(device: torch.device) -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _time_ms(lambda: dst.copy_(src), 20)


def measure_rates(device: torch.device, dtype: torch.dtype, nheads: int, head_dim: int) -> Rates:
    """The three rates on ``device`` (CUDA only; a CPU has no floor worth the time)."""
    if device.type != "cuda":
        raise ValueError("rates are measured on CUDA devices only")
    gemm_ms = _gemm_ms(device, dtype)
    attn_ms = _attention_ms(device, dtype, nheads, head_dim)
    copy_ms = _copy_ms(device)
    torch.cuda.empty_cache()
    n, L = GEMM_SIZE, ATTENTION_BLOCK
    attn_flops = 2.0 * nheads * 2 * head_dim * L * (L + 1) / 2  # as flops.flop_parts counts a causal block
    return Rates(
        matmul_tflops=2.0 * n**3 / (gemm_ms * 1e-3) / 1e12,
        attention_tflops=attn_flops / (attn_ms * 1e-3) / 1e12,
        memory_gbps=2.0 * COPY_BYTES / (copy_ms * 1e-3) / 1e9,
    )


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
        rates = Rates(**{k: known[key][k] for k in Rates.__dataclass_fields__})
        log(f"[bench] ceilings from {path}: {_describe(rates)}")
        return rates
    if not cuda:
        return None
    rates = measure_rates(device, getattr(torch, dtype), nheads, head_dim)
    log(f"[bench] ceilings measured on {key}: {_describe(rates)}")
    if path is not None:
        known[key] = {**asdict(rates), "measured": datetime.now(UTC).isoformat(timespec="seconds")}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=2) + "\n")
        os.replace(tmp, path)
    return rates


def _describe(r: Rates) -> str:
    return (
        f"matmul {r.matmul_tflops:.0f} TFLOP/s, causal attention {r.attention_tflops:.0f} TFLOP/s, "
        f"copy {r.memory_gbps:.0f} GB/s"
    )


RING_SHIFT_BYTES = 256 * 2**20  # a K/V block of LLaMA-3-8B at 128K on 2 GPUs is 256 MiB


def measure_ring_shift_gbps(group: "torch.distributed.ProcessGroup | None" = None) -> float:
    """GB/s per direction of one ring shift (send to the next rank, receive from the previous),
    all ranks at once, as the ring's K/V exchange runs; NaN off CUDA or on one rank. Collective:
    every rank of ``group`` calls it."""
    import torch.distributed as dist

    from fmsring.comm import RingComm

    if not dist.is_initialized() or dist.get_world_size(group) < 2 or dist.get_backend(group) != "nccl":
        return float("nan")
    comm = RingComm(group)
    device = torch.device("cuda", torch.cuda.current_device())
    send = torch.empty(RING_SHIFT_BYTES, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)

    def shift() -> None:
        comm.send_recv(send, recv)
        comm.wait()

    dist.barrier(group)
    return RING_SHIFT_BYTES / (_time_ms(shift, 10) * 1e-3) / 1e9


def interconnect(device_type: str, gpu_count: int) -> str:
    """How the GPUs of this run talk: "pcie-like" when ``NCCL_P2P_DISABLE`` sends NCCL through
    host memory, else "nvlink" or "pcie" as ``nvidia-smi topo -m`` links GPU 0 and GPU 1; ""
    for CPUs, one GPU, or when nvidia-smi cannot tell."""
    if device_type != "cuda" or gpu_count < 2:
        return ""
    if os.environ.get("NCCL_P2P_DISABLE", "0").strip().lower() in ("1", "true", "yes"):
        return "pcie-like"
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return topo_link(out)


def topo_link(topo: str) -> str:
    """GPU 0's link to GPU 1 in ``nvidia-smi topo -m``'s matrix: "nvlink" (NV#), "pcie" (PIX, PXB,
    PHB, NODE, SYS), "" when the matrix has no such cell."""
    for line in topo.splitlines():
        cells = line.split()
        if line.startswith("GPU0") and len(cells) > 2:  # GPU0's row, not the header that names it
            link = cells[2]
            if link.startswith("NV"):
                return "nvlink"
            return "pcie" if link in ("PIX", "PXB", "PHB", "NODE", "SYS") else ""
    return ""
