"""Starting, watching and stopping one benchmark launch: the torchrun (one node) or
srun + torchrun (a Slurm allocation, c10d rendezvous) command line, a process
tree that is killed whole on timeout or interrupt (psutil) or when the process
that started it dies, and a one-line reason for a launch that left points
unfinished, read from torchrun's error file (the first failed rank's exception,
which the bench's ``main`` records).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

LAUNCHERS = ("torchrun", "srun")
# Linux's prctl, looked up here: a launch's child only calls it (nothing loaded between fork and exec)
_PRCTL = __import__("ctypes").CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1
_SOURCE_ROOT = Path(os.path.abspath(__file__)).parents[2]


def torchrun_command(
    nproc_per_node: int, *, nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
    node_rank: int | None = None,
) -> list[str]:
    """``python -m torch.distributed.run`` with a standalone or a c10d rendezvous."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if rdzv_endpoint is None:
        if nnodes != 1:
            raise ValueError("several nodes need an rdzv_endpoint")
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        if rdzv_id is not None:
            cmd.append(f"--rdzv_id={rdzv_id}")
        if node_rank is not None:
            cmd.append(f"--node_rank={node_rank}")
    cmd.append(f"--nproc_per_node={nproc_per_node}")
    return cmd


def head_node() -> str:
    """The rendezvous host for srun: $FMSRING_RDZV_HOST, else the first host of the Slurm job."""
    if os.environ.get("FMSRING_RDZV_HOST"):
        return os.environ["FMSRING_RDZV_HOST"]
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            hosts = out.stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
        if re.fullmatch(r"[\w.-]+", nodelist):
            return nodelist
    return socket.gethostname()


def launch_command(
    launcher: str, world_size: int, args: list[str], tag: str = "0", gpus_per_node: int | None = None,
    rdzv_port: int = 29500,
) -> list[str]:
    """The full command line of one launch of ``python args...`` on ``world_size`` ranks."""
    if launcher == "torchrun":
        return torchrun_command(world_size) + args
    per_node = gpus_per_node or int(os.environ.get("SLURM_GPUS_ON_NODE") or 8)
    nnodes = math.ceil(world_size / per_node)
    if world_size % nnodes:
        raise ValueError(f"world size {world_size} does not split evenly over {nnodes} nodes of {per_node}")
    nproc = world_size // nnodes
    job = os.environ.get("SLURM_JOB_ID", "local")
    srun = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    tr = torchrun_command(nproc, nnodes=nnodes, rdzv_endpoint=f"{head_node()}:{rdzv_port}", rdzv_id=f"{job}-{tag}")
    return srun + tr + args


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The launched processes' environment: ours, ``extra``, and this checkout first on PYTHONPATH,
    so they import the same fmsring as this process."""
    env = dict(os.environ)
    env.update(extra)
    paths = [str(_SOURCE_ROOT), extra.get("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class Outcome:
    """How a launch ended."""

    returncode: int | None
    timed_out: bool
    seconds: float


def run_launch(
    cmd: list[str], env: dict[str, str], out_log: Path, err_log: Path, timeout_s: float, grace_s: float,
    poll: Callable[[], None] = lambda: None,
) -> Outcome:
    """Run ``cmd`` with its output in the logs, ``poll()`` about once a second; past
    ``timeout_s`` (or on any exception, e.g. Ctrl-C) its whole process tree is killed."""
    t0 = time.monotonic()
    returncode, timed_out = None, False
    with open(out_log, "w") as fo, open(err_log, "w") as fe:
        fo.write("# " + shlex.join(cmd) + "\n")
        fo.flush()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)  # fmt: skip
        try:
            deadline = t0 + timeout_s
            while True:
                try:
                    returncode = proc.wait(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                    break
                except subprocess.TimeoutExpired:
                    pass
                poll()
                if time.monotonic() >= deadline:
                    timed_out = True
                    kill_tree(proc, grace_s)
                    returncode = proc.returncode
                    break
        except BaseException:  # KeyboardInterrupt in a notebook or a shell: leave no rank behind
            kill_tree(proc, grace_s)
            raise
    return Outcome(returncode, timed_out, round(time.monotonic() - t0, 2))


def _die_with_parent() -> None:
    """In a launch's first process, before it runs: SIGTERM it when the process that started it dies.
    A notebook kernel killed outright (papermill's timeout, a kernel restart) runs no cleanup, and
    its launch would run on; torchrun stops its ranks on SIGTERM (Linux only; elsewhere nothing)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def kill_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop a launch: SIGTERM it and every descendant, then SIGKILL what is left.

    torchrun starts each worker in a session of its own, so signalling the
    launcher's process group alone would leave the workers running.
    """
    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += [c for c in p.children(recursive=True) if c not in procs]
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


_OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)


def failure_reason(error_file: Path, returncode: int | None, timed_out: bool, timeout_s: float) -> tuple[str, str]:
    """(status, one-line error) for a launch that left points unfinished.

    ``error_file``: where torchrun (``TORCHELASTIC_ERROR_FILE``) copied the first failed
    rank's error file; a rank killed by a signal writes none, so only the exit code is known.
    """
    try:
        message = json.loads(error_file.read_text())["message"]
        detail = message["message"] if isinstance(message, dict) else str(message)
    except (OSError, ValueError, KeyError, TypeError):
        detail = ""
    detail = " ".join(detail.split())
    if timed_out:
        status, head = "timeout", f"group killed after {timeout_s:g} s timeout"
    elif _OOM.search(detail):
        status, head = "oom", "out of memory"
    elif returncode == 0:
        status, head = "error", "bench exited 0 without writing this point"
    else:
        status, head = "error", f"exit code {returncode}" + ("" if detail else " (a rank killed by a signal?)")
    return status, (f"{head}: {detail}" if detail else head)[:500]
