"""fmsring.harness.watchdog: the stall timer against the end of its point."""

from __future__ import annotations


def test_a_point_ending_as_its_stall_timer_fires_gets_one_outcome():
    """The stall timer and the end of the guarded block race for one lock: a timer firing after
    the block ended does nothing, and a block ending while the stall is being recorded waits
    (in the bench the stall then exits the process), so no point gets two rows."""
    import threading
    import time

    from fmsring.harness.watchdog import StallGuard

    calls = []
    guard = StallGuard(60.0, calls.append)
    with guard:
        pass
    guard._fire(calls.append, 60.0)  # the timer thread, had it started just as the block ended
    assert calls == []

    stalling, release, ended = threading.Event(), threading.Event(), threading.Event()

    def on_stall(budget_s: float) -> None:
        calls.append(budget_s)
        stalling.set()
        release.wait(5)

    def point() -> None:
        with StallGuard(0.01, on_stall):
            stalling.wait(5)  # the point ends just as its stall is being recorded
        ended.set()

    worker = threading.Thread(target=point)
    worker.start()
    assert stalling.wait(5)
    time.sleep(0.1)
    assert not ended.is_set()  # the block's end waits for the stall's outcome
    release.set()
    worker.join(5)
    assert ended.is_set() and calls == [0.01]
