"""The allocator configuration fmsring sets where it owns the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fmsring.allocator import ALLOC_CONF, STALL_FREE, configure_allocator, fragmentation_warning


def test_expandable_segments_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ALLOC_CONF, raising=False)
    assert configure_allocator() == STALL_FREE
    monkeypatch.setenv(ALLOC_CONF, "max_split_size_mb:128")
    assert configure_allocator() == "max_split_size_mb:128"  # the user's setting wins, untouched


def test_the_bench_process_runs_with_it():
    """``python -m fmsring.bench`` sets it before anything touches CUDA (here: its rows' process)."""
    code = (
        "import os, runpy, sys; sys.argv = ['fmsring.bench', '--help']\n"
        "try:\n    runpy.run_module('fmsring.bench', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print(os.environ.get('{ALLOC_CONF}'))"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != ALLOC_CONF}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == STALL_FREE, out.stderr


def test_fragmentation_near_the_limit_is_named():
    gib = 2**30
    total = 80 * gib
    # 6 GiB reserved but idle, 1 GiB free: the stall's state
    msg = fragmentation_warning(70 * gib, 64 * gib, 1 * gib, total, "")
    assert "6.0 GiB reserved but unused" in msg and STALL_FREE in msg
    assert fragmentation_warning(70 * gib, 64 * gib, 1 * gib, total, "expandable_segments:True") == ""
    assert fragmentation_warning(70 * gib, 64 * gib, 9 * gib, total, "") == ""  # far from the limit
    assert fragmentation_warning(70 * gib, 69 * gib, 0, total, "") == ""  # full, not fragmented
