"""tests/distributed.py keeps a gloo group per world size across calls: each call must still start
from a fresh rank's state, and a broken call must not reach the next one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import GLOO_CONNECT_FAILED, run_ranks

ADDED: set[str] = set()  # a call adds to it in place
BOUND = "as imported"  # a call rebinds it


def _leave_traces(rank, world):
    ADDED.add("by a call")
    globals()["BOUND"] = "by a call"
    os.environ["FMSRING_LEFT_BY_A_CALL"] = "1"
    dist.new_group(list(range(world)))
    torch.set_num_threads(2)
    return os.getpid()


def _state(rank, world, parent_env):
    return {
        "pid": os.getpid(),
        "added": set(ADDED),
        "bound": BOUND,
        "left": os.environ.get("FMSRING_LEFT_BY_A_CALL"),
        "parent": os.environ.get(parent_env),
        "groups": len(dist.distributed_c10d._world.pg_map),
        "threads": torch.get_num_threads(),
        "draw": torch.rand(3),
        "rank_env": (os.environ["RANK"], os.environ["WORLD_SIZE"]),
    }


def test_a_call_starts_from_a_fresh_ranks_state(monkeypatch: pytest.MonkeyPatch, test_seed: int):
    pids = run_ranks(2, _leave_traces)
    monkeypatch.setenv("FMSRING_SET_BY_THE_TEST", "yes")
    states = run_ranks(2, _state, "FMSRING_SET_BY_THE_TEST")
    want = torch.rand(3, generator=torch.Generator().manual_seed(test_seed))
    for rank, state in enumerate(states):
        assert state["pid"] == pids[rank]  # the same processes, kept
        assert state["added"] == set() and state["bound"] == "as imported"
        assert state["left"] is None and state["parent"] == "yes"
        assert state["groups"] == 1 and state["threads"] == 1
        assert torch.equal(state["draw"], want)  # seeded from the test's seed, alike on every rank
        assert state["rank_env"] == (str(rank), "2")


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank 1 was given a bad case")
    dist.barrier()  # rank 0 waits for a rank that will never come


def _sleep(rank, world):
    time.sleep(60)


def _pid(rank, world):
    return os.getpid()


def test_a_failed_or_hung_call_raises_and_the_next_gets_a_fresh_group():
    before = run_ranks(2, _pid)
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed.*_fail_on_rank_1.*bad case"):
        run_ranks(2, _fail_on_rank_1)
    after_failure = run_ranks(2, _pid)
    assert not set(after_failure) & set(before)
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish in 2s"):
        run_ranks(2, _sleep, timeout=2)
    assert not set(run_ranks(2, _pid)) & set(after_failure)


def _connect_fails(rank, world, tally, times):
    """Rank 1 fails as gloo does when it cannot connect, ``times`` calls in a row (counted in ``tally``)."""
    tally = Path(tally)  # rank 1's alone: another rank reading it could catch it half written
    failed = int(tally.read_text()) if rank == 1 and tally.exists() else 0
    if rank == 1 and failed < times:
        tally.write_text(str(failed + 1))
        raise RuntimeError(f"{GLOO_CONNECT_FAILED} with [pair.cc] Connection closed by peer (a stand-in)")
    return os.getpid()


def test_a_call_gloo_could_not_connect_runs_once_more_on_a_fresh_group(tmp_path):
    before = run_ranks(2, _pid)
    pids = run_ranks(2, _connect_fails, str(tmp_path / "once"), 1)
    assert (tmp_path / "once").read_text() == "1" and not set(pids) & set(before)
    with pytest.raises(RuntimeError, match=GLOO_CONNECT_FAILED):  # once more, not forever
        run_ranks(2, _connect_fails, str(tmp_path / "twice"), 2)
    assert (tmp_path / "twice").read_text() == "2"
