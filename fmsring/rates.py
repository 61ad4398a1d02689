"""What this device sustains, measured on it in a few seconds: dense GEMM and
causal attention FLOP/s, device copy bytes/s and the ring shift's link bytes/s.

Datasheet peaks are not reachable, and differ between cards of one name
(clocks, power caps), so whatever divides work by a rate -- the harness's
floors, the follow-up rule (:func:`fmsring.modes.followup.choose_followup`)
-- divides by what this device does here: one large GEMM in the run's dtype,
one causal SDPA call at a representative block with the model's head dim,
one large device-to-device copy, one ring shift of a large block. On a CPU
(tests) the sizes are small: the rates only have to be of the right order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmsring.comm import RingComm, group_device

FASTEST_SDPA = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@dataclass(frozen=True)
class Sizes:
    """How large each measurement is: large enough to run at the device's rate."""

    gemm: int
    attention_block: int  # tokens of query and key
    copy_bytes: int
    shift_bytes: int


# a ring block at 16K-128K prompts is 8K tokens or larger, a K/V block at long prompts hundreds of MiB
CUDA_SIZES = Sizes(gemm=8192, attention_block=8192, copy_bytes=1 << 30, shift_bytes=256 << 20)
CPU_SIZES = Sizes(gemm=256, attention_block=256, copy_bytes=16 << 20, shift_bytes=4 << 20)


@dataclass(frozen=True)
class Rates:
    """What one device sustains: dense matmul and causal attention TFLOP/s in the run's dtype,
    memory bandwidth in GB/s (bytes read plus written by a copy, per s), and the ring shift's
    GB/s per direction (None where not measured: one rank)."""

    matmul_tflops: float
    attention_tflops: float
    memory_gbps: float
    link_gbps: float | None = None


def time_ms(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Mean time of ``iters`` back-to-back calls after two warm-ups (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    return 2.0 * n**3 / (time_ms(lambda: a @ b, 10, device) * 1e-3) / 1e12


def attention_tflops(device: torch.device, dtype: torch.dtype, nheads: int, head_dim: int, block: int) -> float:
    q, k, v = (torch.randn(1, nheads, block, head_dim, dtype=dtype, device=device) for _ in range(3))
    with sdpa_kernel(FASTEST_SDPA, set_priority=True):
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 10, device)
    flops = 2.0 * nheads * 2 * head_dim * block * (block + 1) / 2  # a causal block: half the scores, QK and PV
    return flops / (ms * 1e-3) / 1e12


def memory_gbps(device: torch.device, n_bytes: int) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2.0 * n_bytes / (time_ms(lambda: dst.copy_(src), 20, device) * 1e-3) / 1e9


def ring_shift_gbps(group: dist.ProcessGroup | None, device: torch.device, n_bytes: int) -> float:
    """GB/s per direction of one ring shift (send to the next rank, receive from the previous),
    all ranks at once, as the ring's K/V exchange runs. Collective: every rank of ``group``."""
    comm = RingComm(group)
    send = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)

    def shift() -> None:
        comm.send_recv(send, recv)
        comm.wait()

    dist.barrier(group)
    return n_bytes / (time_ms(shift, 10, device) * 1e-3) / 1e9


def measure(
    device: torch.device, dtype: torch.dtype, nheads: int, head_dim: int, group: dist.ProcessGroup | None = None
) -> Rates:
    """This device's rates; with a ``group`` of several ranks also its ring shift (then collective)."""
    sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    link = None
    if group is not None and dist.get_world_size(group) > 1:
        link = ring_shift_gbps(group, device, sizes.shift_bytes)
    rates = Rates(
        matmul_tflops=matmul_tflops(device, dtype, sizes.gemm),
        attention_tflops=attention_tflops(device, dtype, nheads, head_dim, sizes.attention_block),
        memory_gbps=memory_gbps(device, sizes.copy_bytes),
        link_gbps=link,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rates


def agreed(rates: Rates, groups: Sequence[dist.ProcessGroup | None]) -> Rates:
    """Rank 0's ``rates`` on every rank of ``groups`` (each group in turn, as
    :func:`fmsring.comm.sync_rng` does), so that a choice made from them is
    the same on every rank: ranks that chose differently would deadlock."""
    values = [float("nan") if v is None else v for v in astuple(rates)]
    for group in groups:
        buf = torch.tensor(values, dtype=torch.float64, device=group_device(group))
        src = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
        dist.broadcast(buf, src=src, group=group)
        values = buf.tolist()
    *dense, link = values
    return Rates(*dense, link_gbps=None if link != link else link)
