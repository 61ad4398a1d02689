"""fmsring.comm on real gloo ranks: the ring exchange guards its own misuse; all_to_all routes chunks."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.distributed as dist

from tests.distributed import run_ranks


def _ring(rank, world):
    from fmsring.comm import RingComm

    comm = RingComm()
    errors = {}
    try:
        comm.wait()
    except RuntimeError as e:
        errors["wait_first"] = str(e)
    send, recv = torch.full((3,), float(rank)), torch.empty(3)
    comm.send_recv(send, recv)
    try:
        comm.send_recv(send, torch.empty(3))
    except RuntimeError as e:
        errors["send_twice"] = str(e)
    comm.wait()
    try:
        comm.send_recv(torch.zeros(4, 2).t(), recv)
    except ValueError as e:
        errors["strided"] = str(e)
    dist.barrier()
    return errors, recv


def test_ring_exchange_refuses_misuse_and_still_works():
    world = 3
    for rank, (errors, recv) in enumerate(run_ranks(world, _ring)):
        assert "no exchange in flight" in errors["wait_first"]
        assert "still in flight" in errors["send_twice"]
        assert "contiguous" in errors["strided"]
        assert torch.equal(recv, torch.full((3,), float((rank - 1) % world)))  # from the previous rank


def _a2a(rank, world):
    from fmsring.comm import all_to_all

    chunks = torch.stack([torch.tensor([rank, dst]) for dst in range(world)])  # chunk dst goes to rank dst
    return all_to_all(chunks, None)


def test_all_to_all_delivers_chunk_r_to_rank_r():
    world = 3
    for rank, got in enumerate(run_ranks(world, _a2a)):
        assert got.tolist() == [[src, rank] for src in range(world)]


EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))  # runs after fmsring's
import fmsring
fmsring.maybe_init_dist("cpu")
if sys.argv[1] == "raise":
    raise RuntimeError("a rank failed")
"""


def test_the_group_it_makes_is_destroyed_at_a_clean_exit_and_left_after_a_failure():
    """A gloo group left to interpreter teardown can abort the process; after a failure, destroying it could
    wait on the failed rank's exchanges, so only a clean exit destroys it."""
    runs = {
        how: subprocess.Popen(
            [sys.executable, "-c", EXIT_SCRIPT, how], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for how in ("clean", "raise")
    }
    out = {how: p.communicate(timeout=120) for how, p in runs.items()}
    assert runs["clean"].returncode == 0, out["clean"][1]
    assert "group alive at exit: False" in out["clean"][0], out["clean"]
    assert runs["raise"].returncode == 1 and "a rank failed" in out["raise"][1], out["raise"]
    assert "group alive at exit: True" in out["raise"][0], out["raise"]


def test_the_input_checksum_reads_in_chunks_and_sees_every_element():
    """The checksum of a tensor spanning many chunks is the one-pass weighted sum; changing its
    last element, or swapping two, changes it."""
    from unittest import mock

    from fmsring import comm

    t = torch.randn(5, 11, 13)
    t[0, 0, 0] = float("-inf")
    flat = torch.nan_to_num(t.reshape(-1).double(), nan=7.0, posinf=3.0e6, neginf=-3.0e6)
    whole = (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder(9973)).sum() + t.numel()
    with mock.patch.object(comm, "CHECKSUM_CHUNK", 7):
        assert torch.allclose(comm.checksum(t), whole, rtol=1e-12)
        changed = t.clone()
        changed[-1, -1, -1] += 1
        swapped = t.clone()
        swapped[1, 2, 3], swapped[4, 5, 6] = t[4, 5, 6], t[1, 2, 3]
        assert comm.checksum(changed) != comm.checksum(t) and comm.checksum(swapped) != comm.checksum(t)
