"""fmsring.harness.launch: a launch's process tree killed whole, and its failure read from torchrun's error file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fmsring.harness import launch

# a launcher whose child starts a session of its own (as torchrun's workers do), then both sleep
TREE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
time.sleep(600)
"""


def test_kill_tree_stops_descendants_in_other_sessions():
    proc = subprocess.Popen([sys.executable, "-c", TREE], start_new_session=True)
    deadline = time.monotonic() + 30
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = psutil.Process(proc.pid).children()
    launch.kill_tree(proc, grace_s=1.0)
    assert proc.poll() is not None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_run_launch_times_out_and_kills(tmp_path: Path):
    cmd = [sys.executable, "-c", TREE]
    out = launch.run_launch(cmd, {}, tmp_path / "o.log", tmp_path / "e.log", timeout_s=1.0, grace_s=1.0)
    assert out.timed_out and 1.0 <= out.seconds < 20
    assert (tmp_path / "o.log").read_text().startswith("# ")  # the command heads its log


# a notebook's kernel, say: it starts a launch, then is killed outright (no cleanup of its own runs)
STARTER = """
import sys
from pathlib import Path
from fmsring.harness import launch
launch.run_launch([sys.executable, "-c", "import time; time.sleep(600)"], {}, Path(sys.argv[1]) / "o.log",
                  Path(sys.argv[1]) / "e.log", timeout_s=600, grace_s=1)
"""


def test_a_launch_dies_with_the_process_that_started_it(tmp_path: Path):
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path)], env=launch.child_env({}))
    deadline = time.monotonic() + 60
    while not psutil.Process(starter.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = psutil.Process(starter.pid).children()
    starter.kill()
    starter.wait()
    gone, alive = psutil.wait_procs([child], timeout=30)
    for p in alive:  # leave nothing behind when it fails
        p.kill()
    assert gone, "the launch outlived the process that started it"


def error_file(tmp_path: Path, message: str) -> Path:
    path = tmp_path / "error.json"  # what torch.distributed.elastic's record writes
    path.write_text(json.dumps({"message": {"message": message, "extraInfo": {"py_callstack": "..."}}}))
    return path


def test_failure_reason_from_the_error_file(tmp_path: Path):
    oom = error_file(tmp_path, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    assert launch.failure_reason(oom, 1, False, 60) == (
        "oom",
        "out of memory: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB",
    )
    err = error_file(tmp_path, "RuntimeError: boom\n  on two lines")
    assert launch.failure_reason(err, 1, False, 60) == ("error", "exit code 1: RuntimeError: boom on two lines")
    assert launch.failure_reason(err, None, True, 30.0) == ("timeout", "group killed after 30 s timeout: RuntimeError: "
                                                                        "boom on two lines")  # fmt: skip
    missing = tmp_path / "none.json"  # a rank killed by a signal writes none
    assert launch.failure_reason(missing, 1, False, 60) == ("error", "exit code 1 (a rank killed by a signal?)")
    assert launch.failure_reason(missing, 0, False, 60)[1] == "bench exited 0 without writing this point"
