"""Starting, watching and stopping one benchmark launch: the torchrun (one node) or
srun + torchrun (a Slurm allocation, c10d rendezvous) command line, a process
tree that is killed whole on timeout or interrupt, and a one-line reason for a
launch that left points unfinished, read from its own stderr.
"""

from __future__ import annotations

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

LAUNCHERS = ("torchrun", "srun")
_SOURCE_ROOT = Path(os.path.abspath(__file__)).parents[2]


def torchrun_command(
    nproc_per_node: int,
    *,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    node_rank: int | None = None,
    python: str | None = None,
) -> list[str]:
    """``python -m torch.distributed.run`` with a standalone or a c10d rendezvous."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
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


def node_split(world_size: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, processes per node) for ``world_size`` ranks with at most ``gpus_per_node`` per node."""
    nnodes = math.ceil(world_size / gpus_per_node)
    if world_size % nnodes:
        raise ValueError(f"world size {world_size} does not split evenly over {nnodes} nodes of {gpus_per_node}")
    return nnodes, world_size // nnodes


def launch_command(
    launcher: str,
    world_size: int,
    args: list[str],
    tag: str = "0",
    gpus_per_node: int | None = None,
    rdzv_port: int = 29500,
) -> list[str]:
    """The full command line of one launch of ``python args...`` on ``world_size`` ranks."""
    if launcher == "torchrun":
        return torchrun_command(world_size) + args
    per_node = gpus_per_node or int(os.environ.get("SLURM_GPUS_ON_NODE") or 8)
    nnodes, nproc = node_split(world_size, per_node)
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
    cmd: list[str],
    env: dict[str, str],
    out_log: Path,
    err_log: Path,
    timeout_s: float,
    grace_s: float,
    poll: Callable[[], None] = lambda: None,
) -> Outcome:
    """Run ``cmd`` with its output in the logs, ``poll()`` about once a second; past
    ``timeout_s`` (or on any exception, e.g. Ctrl-C) its whole process tree is killed."""
    t0 = time.monotonic()
    returncode, timed_out = None, False
    with open(out_log, "w") as fo, open(err_log, "w") as fe:
        fo.write("# " + shlex.join(cmd) + "\n")
        fo.flush()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
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


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (Linux /proc; [] elsewhere)."""
    parents: dict[int, list[int]] = {}
    if not os.path.isdir("/proc"):
        return []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop a launch: SIGTERM its process group, then SIGKILL it and every descendant.

    torchrun starts each worker in a session of its own, so killing the
    launcher's group alone would leave the workers running.
    """
    if proc.poll() is not None and not _children(proc.pid):
        return
    own = os.getpgrp()
    seen = set(_children(proc.pid))

    def signal_all(sig: int) -> None:
        targets = [proc.pid, *seen]
        for pid in targets:
            try:
                pgid = os.getpgid(pid)
                if pgid != own:
                    os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        seen.update(_children(proc.pid))
        if proc.poll() is not None and not any(_alive(p) for p in seen):
            break
        time.sleep(0.1)
    seen.update(_children(proc.pid))
    signal_all(signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


_OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)
_EXC = re.compile(r"^([\w.]*(?:Error|Exception|Interrupt|Exit)\b.*)$")
_RANK_PREFIX = re.compile(r"^\[(?:default)?(?:rank)?\d+\]:\s*")
_NOISE = re.compile(r"^(?:[EWI]\d{4} |\*+$|Setting OMP_NUM_THREADS|warnings\.warn|\^+$)")


def failure_reason(stderr: Path, returncode: int | None, timed_out: bool, timeout_s: float) -> tuple[str, str]:
    """(status, one-line error) for a launch that left points unfinished."""
    try:
        text = stderr.read_text(errors="replace")[-200_000:]
    except OSError:
        text = ""
    # the ranks' own messages come before torchrun's ChildFailedError report
    worker_text = text
    agent = text.rfind("ChildFailedError")
    if agent != -1:
        tb = text.rfind("Traceback (most recent call last)", 0, agent)
        worker_text = text[: tb if tb != -1 else agent]
    lines = [_RANK_PREFIX.sub("", ln.strip()) for ln in worker_text.splitlines()]
    lines = [ln for ln in lines if re.search(r"[A-Za-z]", ln) and not _NOISE.match(ln)]
    exc = [m.group(1) for ln in lines if (m := _EXC.match(ln))]
    detail = exc[-1] if exc else (lines[-1] if lines else "")
    if timed_out:
        status, head = "timeout", f"group killed after {num(timeout_s)} s timeout"
    elif _OOM.search(text):
        status, head = "oom", "out of memory"
    elif returncode == 0:
        status, head = "error", "bench exited 0 without writing this point"
    else:
        # torchrun reports the first rank that failed under "Root Cause"
        root = text.rfind("Root Cause")
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", text[root:] if root != -1 else text)
        code = int(codes[0]) if codes else returncode
        if code is not None and code < 0:
            sig = -code
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
            head = f"rank killed by {name}" + (" (from outside: host OOM killer?)" if sig == signal.SIGKILL else "")
        else:
            head = f"exit code {code}"
        status = "error"
    msg = head if not detail or detail == head else f"{head}: {detail}"
    return status, msg.replace("\n", " ")[:500]


def num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
