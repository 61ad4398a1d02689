"""Process-group plumbing: the ring's point-to-point exchange and the few
collectives fmsring needs (input check, RNG sync, padded gathers)."""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

# how long a clean exit lets gloo's worker threads drop their last works (maybe_init_dist)
GLOO_DRAIN_S = 0.1


def maybe_init_dist(device_type: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes, or make one of this process alone; return (rank, world).

    Without torchrun the same script then runs as one process (ring
    attention runs on one rank too), so ``python script.py`` works as
    ``torchrun script.py`` does. A group that already exists is kept.

    A group made here is destroyed when the process exits cleanly, as torch
    asks of every script. A gloo group's worker threads drop a finished
    exchange's work a moment after ``wait`` returns; where that frees a
    tensor Python let go of, the drop needs the GIL, and if the interpreter
    is finalizing by then, the process aborts ("terminate called without an
    active exception") in a share of runs. So a clean exit first gives the
    GIL up for a moment; a barrier would not do, since its own work holds the
    earlier ones. After an uncaught exception the group is left alone, so
    that the failed rank's peers fail fast.

    Args:
        device_type: "cuda" picks NCCL, anything else gloo (CPU ranks on a GPU
            machine need gloo); default: "cuda" where the host has a GPU.
        timeout_s: how long a collective waits for its peers: a dead or stuck
            peer becomes an error instead of a hang.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    atexit.unregister(_destroy_on_clean_exit)  # once, however many groups this process makes
    atexit.register(_destroy_on_clean_exit)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _destroy_on_clean_exit() -> None:
    # the interpreter sets sys.last_exc (3.12) / sys.last_value when an uncaught exception ended the script
    failed = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if dist.is_initialized() and failed is None:
        if dist.get_backend() == "gloo":
            time.sleep(GLOO_DRAIN_S)
        dist.destroy_process_group()


def group_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where tensors for collectives on ``group`` must live (NCCL: the GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RingComm:
    """Send to the next rank and receive from the previous one, one batched P2P per step.

    One exchange is in flight at a time, and its receive buffer may be read
    only after :meth:`wait`: both rules are checked, since breaking either
    silently reads a half-received block.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.send_rank = dist.get_global_rank(self.group, (self.rank + 1) % self.world_size)
        self.recv_rank = dist.get_global_rank(self.group, (self.rank - 1) % self.world_size)
        self._reqs: list[dist.Work] | None = None

    def send_recv(self, to_send: torch.Tensor, recv_into: torch.Tensor) -> None:
        """Start the exchange; ``wait()`` before reading ``recv_into`` or starting another."""
        if self._reqs is not None:
            raise RuntimeError("RingComm.send_recv: the previous exchange is still in flight; call wait() first")
        if not (to_send.is_contiguous() and recv_into.is_contiguous()):
            raise ValueError("RingComm.send_recv needs contiguous tensors")
        ops = [
            dist.P2POp(dist.isend, to_send, self.send_rank, self.group),
            dist.P2POp(dist.irecv, recv_into, self.recv_rank, self.group),
        ]
        self._reqs = dist.batch_isend_irecv(ops)

    def wait(self) -> None:
        """Finish the exchange in flight."""
        if self._reqs is None:
            raise RuntimeError("RingComm.wait: no exchange in flight (send_recv was not called)")
        for req in self._reqs:
            req.wait()
        self._reqs = None


def all_to_all(chunks: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``chunks[r]`` goes to rank r; returns ``out`` with ``out[r]`` from rank r (dim 0 = ranks)."""
    gdev = group_device(group)
    send = chunks.contiguous().to(gdev)
    out = torch.empty_like(send)
    dist.all_to_all_single(out, send, group=group)
    return out.to(chunks.device)


# elements a checksum reads at once: a padded batch's [b, L, L] mask is gigabytes at 32K, its float64 copy more
CHECKSUM_CHUNK = 1 << 24


def checksum(t: torch.Tensor) -> torch.Tensor:
    """A float64 sum of ``t``'s values weighted by their position (mod a prime), read in chunks of
    :data:`CHECKSUM_CHUNK` elements so its scratch stays small whatever ``t``'s size."""
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for lo in range(0, flat.numel(), CHECKSUM_CHUNK):
        part = torch.nan_to_num(flat[lo : lo + CHECKSUM_CHUNK].to(torch.float64), nan=7.0, posinf=3.0e6, neginf=-3.0e6)
        weights = torch.arange(lo + 1, lo + 1 + part.numel(), device=t.device, dtype=torch.float64).remainder(9973)
        total += (part * weights).sum()
    return total + t.numel()


def check_same_on_all_ranks(tensors: list[torch.Tensor | None], groups: Sequence[dist.ProcessGroup | None]) -> None:
    """Raise if any rank of ``groups`` was given different tensors (one tiny all-reduce per group).

    Ring attention silently computes garbage when ranks disagree on the prompt,
    so every rank checksums what it got and compares the min and max. For a
    mesh, the (max, -min) is reduced over its row then its column, which
    gives every rank the whole mesh's, so all raise together or none does.
    """
    groups = [g for g in groups if dist.get_world_size(g) > 1]
    if not groups:  # one rank: nothing to disagree with
        return
    device = tensors[0].device
    local = torch.stack([checksum(t) if t is not None else torch.zeros((), dtype=torch.float64, device=device)
                         for t in tensors])  # fmt: skip
    both = torch.cat([local, -local])
    for group in groups:  # the max of the rows' maxima is the mesh's: every rank sees the same verdict
        both = both.to(group_device(group))
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, neg_lo = both.chunk(2)
    if not torch.equal(hi, -neg_lo):
        raise ValueError(
            "ranks were given different inputs (input_ids, position_ids or mask differ); "
            "every rank must pass the same full tensors. If sampled tokens diverged, "
            "seed every rank identically. Disable this check with ring_check_inputs=False."
        )


def sync_rng(groups: Sequence[dist.ProcessGroup | None], device: torch.device) -> None:
    """Give every rank the RNG state of rank 0 of each group in turn, so sampling picks the same tokens.

    For a mesh, a row's groups then a column's: after the first broadcast every
    row holds its first rank's state, after the second every rank holds the
    first row's, which is the mesh's first rank's.
    """
    for group in groups:
        gdev = group_device(group)
        states = [torch.get_rng_state()]
        if device.type == "cuda":
            states.append(torch.cuda.get_rng_state(device))
        src = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
        synced = []
        for state in states:
            buf = state.to(gdev)
            dist.broadcast(buf, src=src, group=group)
            synced.append(buf.cpu())
        torch.set_rng_state(synced[0])
        if device.type == "cuda":
            torch.cuda.set_rng_state(synced[1], device)


def all_gather_padded(t: torch.Tensor, dim: int, group: dist.ProcessGroup | None, max_len: int) -> list[torch.Tensor]:
    """All-gather tensors whose size along ``dim`` differs per rank (at most ``max_len``).

    Returns every rank's tensor still padded to ``max_len``; callers trim.
    """
    world = dist.get_world_size(group)
    if t.size(dim) < max_len:
        pad_shape = list(t.shape)
        pad_shape[dim] = max_len - t.size(dim)
        t = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
    t = t.contiguous()
    gdev = group_device(group)
    outs = [torch.empty_like(t, device=gdev) for _ in range(world)]
    dist.all_gather(outs, t.to(gdev), group=group)
    return [o.to(t.device) for o in outs]


def broadcast_weights(model: torch.nn.Module, group: dist.ProcessGroup | None, skip: tuple[type, ...] = ()) -> None:
    """Give every rank group-rank 0's parameters and buffers (but those inside modules of the ``skip`` types).

    Replicated random-init models must be identical on all ranks, or ring
    attention mixes K/V from different models; loading a checkpoint does not
    need this. Over a TP group only the replicated tensors are made equal
    (``skip`` the TP-sharded modules): each shard is its own draw, as in FMS.
    """
    src = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
    gdev = group_device(group)
    skipped = {id(t) for m in model.modules() if isinstance(m, skip) for t in [*m.parameters(), *m.buffers()]}
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or id(t) in skipped:
            continue
        seen.add(id(t))
        buf = t.data.to(gdev)
        dist.broadcast(buf, src=src, group=group)
        t.data.copy_(buf)
