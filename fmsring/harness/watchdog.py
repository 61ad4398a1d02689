"""A point that runs far past its predicted cost is recorded as stalled, and the launch stops.

Near the memory limit PyTorch's default CUDA allocator can flush and retry
for many minutes without a message (docs/performance.md), and a collective
timeout or a sweep's wall-clock limit only fires long after. Rank 0 arms a
timer around every point instead: its budget is ``factor`` times the point's
predicted time -- every call the point makes, at its floors -- plus
``min_s`` for loading, compiling and capturing. When it fires, the point's
row is written with status ``timeout`` and the process exits, which torchrun
turns into the end of every rank: finished rows stay, and the failure says
what it was.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

from fmsring.harness.flops import FlopShape, Rates, decode_steps, floor_ms

STALL_EXIT = 3  # the bench's exit code when it stopped a stalled point


def predicted_s(
    shape: FlopShape | None, rates: Rates | None, cp: int, tp: int, phase: str, batch: int, seq_len: int,
    cached_len: int, decode_tokens: int, calls: int,
) -> float:
    """Seconds ``calls`` runs of a point take at their floors (NaN without rates): a decode run is a
    prefill and its steps, a follow-up point also builds its cache once."""

    def floor(phase_: str, n: int, cached: int = 0) -> float:
        return floor_ms(shape, rates, cp, tp, phase_, batch, n, cached, decode_tokens) / 1e3

    if phase == "decode":
        return calls * (floor("prefill", seq_len) + decode_steps(decode_tokens) * floor("decode", seq_len))
    if phase == "followup":
        return floor("prefill", cached_len) + calls * floor("followup", seq_len, cached_len)
    return calls * floor("prefill", seq_len)


class StallGuard:
    """``with StallGuard(budget_s, on_stall):`` calls ``on_stall(budget_s)`` from a timer thread if
    the block is still running after ``budget_s`` seconds (no guard for a NaN or non-positive budget).

    The block's end and the timer race for one lock: a block that ends as the timer fires either
    ends first (the timer then does nothing) or waits while ``on_stall`` runs -- which exits the
    process in the bench -- so a point never gets both its own row and a stall row."""

    def __init__(self, budget_s: float, on_stall: Callable[[float], Any]):
        armed = math.isfinite(budget_s) and budget_s > 0
        self.timer = threading.Timer(budget_s, self._fire, args=(on_stall, budget_s)) if armed else None
        if self.timer is not None:
            self.timer.daemon = True
        self._lock = threading.Lock()
        self._ended = False

    def _fire(self, on_stall: Callable[[float], Any], budget_s: float) -> None:
        with self._lock:
            if not self._ended:
                on_stall(budget_s)

    def __enter__(self) -> StallGuard:
        if self.timer is not None:
            self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._ended = True
        if self.timer is not None:
            self.timer.cancel()
