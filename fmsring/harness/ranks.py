"""This process's place in a bench run, and how its ranks agree.

Every rank must take part in the same collectives in the same order, or the
run hangs. So a point's outcome is merged across ranks before anyone moves on
(the worst status wins), rank 0's view of what is left to measure is broadcast,
and waiting happens on a gloo control group, never on a GPU stream.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fmsring.comm import maybe_init_dist
from fmsring.harness.schema import STATUSES


@dataclass
class DistEnv:
    """This process's place in the run. ``ctrl`` is a gloo group for the control
    plane (status agreement, barriers), so waiting never occupies a GPU stream."""

    rank: int
    world: int
    device: torch.device
    ctrl: Any
    owns_group: bool


def setup_dist(device: str, timeout_s: float) -> DistEnv:
    """Join torchrun's group (or make a 1-rank one, which ring needs too), with ``timeout_s``."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    owns = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    maybe_init_dist(device, timeout_s=timeout_s)
    timeout = timedelta(seconds=timeout_s)
    ctrl = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else dist.group.WORLD
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev, ctrl, owns)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def align(env: DistEnv, all_ranks: bool) -> None:
    """Drain this GPU and line the ranks up, so a repeat's time is not another rank's lag."""
    sync(env.device)
    if all_ranks and env.world > 1:
        dist.barrier(group=env.ctrl)


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier(group=env.ctrl)


def broadcast(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if env.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=env.ctrl)
    return box[0]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Measured:
    """One rank's outcome of one point. ``output`` (logits, tokens) stays local; the rest is gathered.
    ``first_step_ms``: the point's first step in its first run (:func:`fmsring.harness.timing.repeat`);
    ``streamed``: a generation's streamed steps (:mod:`fmsring.harness.timing`)."""

    status: str = "ok"
    error: str = ""
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    streamed: list[float] = field(default_factory=list)
    first_step_ms: float = math.nan
    peak_gib: float = math.nan
    output: tuple[torch.Tensor, torch.Tensor] | None = None


def classify(exc: BaseException, context: str = "") -> Measured:
    """A failed point: CUDA/host OOMs apart from other errors, the message on one line."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    oom = isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()
    return Measured(status="oom" if oom else "error", error=f"{context}{text}")


def agree(local: Measured, env: DistEnv) -> Measured:
    """Every rank's outcome merged: worst status wins, times and memory are maxima over ranks."""
    if env.world == 1:
        return local
    mine = dataclasses.replace(local, output=None)
    gathered: list[Measured | None] = [None] * env.world
    dist.all_gather_object(gathered, mine, group=env.ctrl)
    parts = [g for g in gathered if g is not None]
    worst = max(range(len(parts)), key=lambda r: (STATUSES.index(parts[r].status), -r))
    merged = Measured(
        status=parts[worst].status, peak_gib=max((p.peak_gib for p in parts), default=math.nan), output=local.output
    )
    if merged.status != "ok":
        merged.error = parts[worst].error if merged.status == "skipped" else f"rank {worst}: {parts[worst].error}"
        return merged
    merged.latencies = [max(v) for v in zip(*(p.latencies for p in parts))]
    merged.ttfts = [max(v) for v in zip(*(p.ttfts for p in parts))]
    merged.streamed = [max(v) for v in zip(*(p.streamed for p in parts))]
    merged.first_step_ms = max(p.first_step_ms for p in parts)
    return merged
