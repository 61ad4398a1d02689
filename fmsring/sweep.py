"""Benchmark sweeps: one ``torchrun -m fmsring.bench`` per (world size, strategy).

A sweep writes one run folder, ``<out_dir>/<name>/``::

    results.csv    one row per (strategy, world_size, seq_len, phase) point
    params.json    the config, the environment, and what each group did
    logs/          stdout/stderr of every launch (nothing goes to the notebook)

Faults stay inside their group: a group that fails, is killed or hangs past
``timeout_s`` gets one ``error``/``oom``/``timeout`` row for each point it did
not finish, and the sweep goes on. Re-running the same sweep (same folder)
skips every point that already has an ``ok`` (or ``skipped``) row and asks the bench only for
the missing ones, so rows are never duplicated.

From Python::

    from fmsring.sweep import SweepConfig, run_sweep
    run_dir = run_sweep(SweepConfig(world_sizes=[1, 2], strategies=["single", "ring"], seq_lens=[128, 256]))

From a shell: ``python -m fmsring.sweep --params params.yaml`` or flags
(``python -m fmsring.sweep --help``); flags override the file.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import fcntl
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmsring.bench import COLUMNS, ModelSpec, git_sha, point

BENCH_MODULE = "fmsring.bench"
STATUSES = ("ok", "oom", "error", "timeout", "skipped")
PHASES = ("prefill", "decode")
LAUNCHERS = ("torchrun", "srun")
# Fields that change what a point measures: a run folder holds one value of each.
IDENTITY_FIELDS = (
    "architecture", "variant", "model_path", "source", "model_kwargs",
    "device", "dtype", "batch", "layout", "decode_tokens",
)  # fmt: skip
_SOURCE_ROOT = Path(os.path.abspath(__file__)).parent.parent


def repo_root() -> Path:
    """The checkout the caller runs in (Jupyter starts notebooks in notebooks/, make at the root)."""
    for p in (Path.cwd(), *Path.cwd().parents):
        if (p / "pyproject.toml").exists() and (p / "fmsring").is_dir():
            return p
    return Path.cwd()


def parse_seq_len(value: Any) -> int:
    """128, "4096", "8K", "128k", "1M" -> tokens (K = 1024), as fmsring.bench reads them."""
    if isinstance(value, str):
        text = value.strip()
        scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:].lower(), 1)
        return int(text[:-1] if scale > 1 else text) * scale
    return int(value)


def _split_list(value: Any, kind: Any) -> list:
    """Lists given as lists, tuples, a single value or a "1,2,4" string."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for v in value:
        v = v.strip().strip("'\"") if isinstance(v, str) else v
        out.append(kind(v))
    return out


@dataclass
class SweepConfig(ModelSpec):
    """What to measure (the model fields come from ModelSpec) and how to launch it.
    Lists also accept "a,b,c" strings."""

    # grid
    world_sizes: list[int] = field(default_factory=lambda: [1, 2])
    strategies: list[str] = field(default_factory=lambda: ["single", "ring"])  # single runs once, at world size 1
    seq_lens: list[int] = field(default_factory=lambda: [128, 256])
    phases: list[str] = field(default_factory=lambda: ["prefill", "decode"])
    decode_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    batch: int = 1
    layout: str = "zigzag"
    # where and how
    out_dir: str = "runs"
    name: str = ""  # run folder under out_dir; "" = derived from device/model/dtype (see run_name)
    launcher: str = "torchrun"  # torchrun (one node) or srun (inside a Slurm allocation, c10d rendezvous)
    timeout_s: float = 3600.0  # wall-clock limit of one group; past it the group is killed and marked timeout
    bench_timeout_s: float | None = None  # bench's --timeout-s (collective timeout); default: timeout_s
    gpus_per_node: int | None = None  # srun: processes per node; default SLURM_GPUS_ON_NODE, else 8
    rdzv_port: int = 29500  # srun: c10d rendezvous port on the head node
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the launched processes
    check: bool = True  # bench compares every strategy's logits with `single` (max_abs_err, rel_err, same_next_token)
    # extra flags passed to fmsring.bench as they are, e.g. ["--seed", "1"]
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.world_sizes = _split_list(self.world_sizes, int)
        self.strategies = _split_list(self.strategies, str)
        self.seq_lens = _split_list(self.seq_lens, parse_seq_len)
        self.phases = _split_list(self.phases, str)
        self.extra_args = [
            str(a) for a in (shlex.split(self.extra_args) if isinstance(self.extra_args, str) else self.extra_args)
        ]
        if isinstance(self.model_kwargs, str):
            self.model_kwargs = json.loads(self.model_kwargs) if self.model_kwargs.strip() else {}
        self.model_kwargs = dict(self.model_kwargs or {})
        self.env = {str(k): str(v) for k, v in (self.env or {}).items()}
        for attr in ("variant", "model_path", "source"):
            if getattr(self, attr) in ("", "None", "none"):
                setattr(self, attr, None)
        for attr in ("decode_tokens", "repeats", "warmup", "batch", "rdzv_port"):
            setattr(self, attr, int(getattr(self, attr)))
        self.timeout_s = float(self.timeout_s)
        if isinstance(self.check, str):
            self.check = self.check.strip().lower() not in ("0", "false", "no", "off")
        self.check = bool(self.check)
        if self.bench_timeout_s in ("", None):
            self.bench_timeout_s = None
        else:
            self.bench_timeout_s = float(self.bench_timeout_s)
        if self.gpus_per_node in ("", None):
            self.gpus_per_node = None
        else:
            self.gpus_per_node = int(self.gpus_per_node)
        self.name = self.name or ""
        self.out_dir = str(self.out_dir)

        problems = []
        if not self.world_sizes or any(w < 1 for w in self.world_sizes):
            problems.append(f"world_sizes must be positive integers, got {self.world_sizes}")
        if not self.strategies:
            problems.append("strategies is empty")
        if not self.seq_lens or any(n < 1 for n in self.seq_lens):
            problems.append(f"seq_lens must be positive integers, got {self.seq_lens}")
        if not self.phases or any(p not in PHASES for p in self.phases):
            problems.append(f"phases must be among {PHASES}, got {self.phases}")
        if self.launcher not in LAUNCHERS:
            problems.append(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.timeout_s <= 0:
            problems.append("timeout_s must be > 0")
        if not self.variant and not self.model_path:
            problems.append("give a variant or a model_path")
        if problems:
            raise ValueError("bad sweep config: " + "; ".join(problems))

    # -- construction ----------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sweep parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> SweepConfig:
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of sweep parameters")
        d.update(overrides)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived -----------------------------------------------------------

    @property
    def run_name(self) -> str:
        """``name``, or ``<device>-<model>-<dtype>`` (CPU runs get a leading "_": scratch, git-ignored)."""
        if self.name:
            return self.name
        model = Path(self.model_path).name if self.model_path else f"{self.architecture}-{self.variant}"
        derived = f"{self.device}-{model}-{self.dtype}"
        return f"_{derived}" if self.device == "cpu" else derived

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name

    @property
    def model_label(self) -> str:
        """The ``model`` column, as fmsring.bench writes it."""
        label = f"{self.architecture}/{self.variant}"
        if self.model_kwargs:
            label += f" {json.dumps(self.model_kwargs, sort_keys=True)}"
        if self.model_path:
            label += f" @{self.model_path}"
        return label

    def groups(self) -> list[tuple[int, str]]:
        """(world size, strategy) launches, in order: ``single`` once at world size 1, then the rest.

        ``tp`` at world size 1 would be ``single`` again (the bench skips it), so it is left out.
        """
        out: list[tuple[int, str]] = []
        if "single" in self.strategies:
            out.append((1, "single"))
        for w in dict.fromkeys(self.world_sizes):
            for s in dict.fromkeys(self.strategies):
                if s != "single" and not (s == "tp" and w == 1):
                    out.append((w, s))
        return out

    def points(self) -> list[tuple[int, str]]:
        """(seq_len, phase) points each group measures."""
        return [(n, p) for n in dict.fromkeys(self.seq_lens) for p in dict.fromkeys(self.phases)]

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}


# ---------------------------------------------------------------------------
# commands


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


def bench_args(
    cfg: SweepConfig,
    strategy: str,
    seq_lens: list[int],
    phases: list[str],
    out: str | os.PathLike,
) -> list[str]:
    """``-m fmsring.bench ...`` for one launch."""
    args = ["-m", BENCH_MODULE, "--architecture", cfg.architecture]
    if cfg.variant:
        args += ["--variant", cfg.variant]
    if cfg.model_path:
        args += ["--model-path", cfg.model_path]
    if cfg.source:
        args += ["--source", cfg.source]
    if cfg.model_kwargs:
        args += ["--model-kwargs", json.dumps(cfg.model_kwargs)]
    args += [
        "--device", cfg.device,
        "--dtype", cfg.dtype,
        "--strategies", strategy,
        "--phases", ",".join(phases),
        "--seq-lens", ",".join(str(n) for n in seq_lens),
        "--batch", str(cfg.batch),
        "--layout", cfg.layout,
        "--repeats", str(cfg.repeats),
        "--warmup", str(cfg.warmup),
        "--decode-tokens", str(cfg.decode_tokens),
        "--out", str(out),
        "--timeout-s", _num(cfg.bench_timeout_s if cfg.bench_timeout_s is not None else cfg.timeout_s),
    ]  # fmt: skip
    if not cfg.check:
        args.append("--no-check")
    return args + list(cfg.extra_args)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


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


def launch_command(cfg: SweepConfig, world_size: int, args: list[str], tag: str = "0") -> list[str]:
    """The full command line of one launch, for ``cfg.launcher``."""
    if cfg.launcher == "torchrun":
        return torchrun_command(world_size) + args
    per_node = cfg.gpus_per_node or int(os.environ.get("SLURM_GPUS_ON_NODE") or 8)
    nnodes, nproc = node_split(world_size, per_node)
    job = os.environ.get("SLURM_JOB_ID", "local")
    srun = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    tr = torchrun_command(nproc, nnodes=nnodes, rdzv_endpoint=f"{head_node()}:{cfg.rdzv_port}", rdzv_id=f"{job}-{tag}")
    return srun + tr + args


# ---------------------------------------------------------------------------
# results.csv


def _read_rows(path: Path, offset: int = 0) -> list[dict[str, str]]:
    """Rows of ``path`` (from byte ``offset`` on); torn or malformed lines are dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        header = next(csv.reader([f.readline()]), [])
        if offset:
            f.seek(max(offset, f.tell()))
        rows = []
        for rec in csv.reader(f):
            if len(rec) != len(header) or rec == header:
                continue
            row = dict(zip(header, rec))
            if row.get("status") not in STATUSES:
                continue
            rows.append(row)
    return rows


def _key(row: dict[str, Any]) -> tuple[str, int, int, str] | None:
    try:
        return (str(row["strategy"]), int(float(row["world_size"])), int(float(row["seq_len"])), str(row["phase"]))
    except (KeyError, TypeError, ValueError):
        return None


def done_points(path: str | os.PathLike, statuses: tuple[str, ...] = ("ok",)) -> set[tuple[str, int, int, str]]:
    """(strategy, world_size, seq_len, phase) of the rows of ``path`` whose status is in ``statuses``."""
    return {k for r in _read_rows(Path(path)) if r.get("status") in statuses and (k := _key(r)) is not None}


def append_rows(path: str | os.PathLike, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Append ``rows`` in one write, under an exclusive lock; the header goes first into an empty file."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        buf = io.StringIO()
        if size and not _ends_with_newline(path, size):
            buf.write("\n")  # never glue a row onto a torn line
        w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")  # "\r\n", like bench's rows
        if size == 0:
            w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
        data = buf.getvalue().encode()
        if data:
            os.write(fd, data)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


# ---------------------------------------------------------------------------
# environment and params.json


def environment() -> dict[str, Any]:
    """Versions, host and GPUs of the machine that launches the sweep."""
    from importlib import metadata

    import torch

    def version(dist_name: str) -> str | None:
        try:
            return metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            return None

    gpus: list[str] = []
    nccl = None
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - informational only
            nccl = None
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "ibm_fms": version("ibm-fms"),
        "transformers": version("transformers"),
        "fmsring": version("fmsring"),
        "git_sha": git_sha(),
        "gpu_count": len(gpus),
        "gpus": gpus,
        "cpu_count": os.cpu_count(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nnodes": os.environ.get("SLURM_NNODES"),
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# processes


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


def _child_env(cfg: SweepConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(cfg.env)
    # the launched processes import the same fmsring as this one
    paths = [str(_SOURCE_ROOT), cfg.env.get("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


_OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)
_EXC = re.compile(r"^([\w.]*(?:Error|Exception|Interrupt|Exit)\b.*)$")
_RANK_PREFIX = re.compile(r"^\[(?:default)?(?:rank)?\d+\]:\s*")
_NOISE = re.compile(r"^(?:[EWI]\d{4} |\*+$|Setting OMP_NUM_THREADS|warnings\.warn|\^+$)")


def _failure_reason(stderr: Path, returncode: int | None, timed_out: bool, timeout_s: float) -> tuple[str, str]:
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
        status, head = "timeout", f"group killed after {_num(timeout_s)} s timeout"
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


# ---------------------------------------------------------------------------
# the sweep


def _check_identity(run_dir: Path, cfg: SweepConfig) -> dict[str, Any] | None:
    params = run_dir / "params.json"
    if not params.exists():
        return None
    old = json.loads(params.read_text())
    before = old.get("config", {})
    diff = {k: (before.get(k), v) for k, v in cfg.identity().items() if k in before and before.get(k) != v}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{run_dir} holds a sweep of another setup ({changes}); pick another name (or out_dir) for this one"
        )
    return old


# Points with one of these statuses are not measured again on resume (skipped: the
# bench decided the config cannot run, e.g. torch_cp on CPU; it would decide so again).
DONE_STATUSES = ("ok", "skipped")


def run_sweep(cfg: SweepConfig, progress: bool = True) -> Path:
    """Run (or resume) the sweep ``cfg`` describes; return its run folder."""
    try:  # a widget in Jupyter when ipywidgets is there, else a text bar (papermill, shells)
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm

    columns = COLUMNS
    run_dir = cfg.run_dir.resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = run_dir / "results.csv"

    old = _check_identity(run_dir, cfg)
    env = environment()
    session = {
        "started": _now(),
        "finished": None,
        "interrupted": False,
        "config": cfg.to_dict(),
        "environment": env,
        "groups": [],
    }
    params = old or {
        "name": run_dir.name,
        "created": session["started"],
        "config": cfg.to_dict(),
        "environment": env,
        "sessions": [],
    }
    params["config"] = cfg.to_dict()
    params["sessions"].append(session)
    _write_json(run_dir / "params.json", params)
    append_rows(results, [], columns)  # header, or a newline after a torn last line

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    groups = cfg.groups()
    bar = tqdm(groups, desc=f"sweep {run_dir.name}", unit="group", disable=not progress, dynamic_ncols=True)
    try:
        for gi, (world, strategy) in enumerate(bar):
            bar.set_postfix_str(f"{strategy} x{world}")
            record = _run_group(cfg, world, strategy, results, logs, f"{stamp}-{gi}", columns, bar)
            session["groups"].append(record)
            _write_json(run_dir / "params.json", params)
    except BaseException:
        session["interrupted"] = True
        raise
    finally:
        bar.close()
        session["finished"] = _now()
        _write_json(run_dir / "params.json", params)
    return run_dir


def _run_group(cfg, world, strategy, results, logs, tag, columns, bar) -> dict[str, Any]:
    done = done_points(results, DONE_STATUSES)
    missing = [(n, p) for n, p in cfg.points() if (strategy, world, n, p) not in done]
    record: dict[str, Any] = {
        "world_size": world,
        "strategy": strategy,
        "points": len(cfg.points()),
        "todo": len(missing),
        "launches": [],
    }
    if not missing:
        record["status"] = "done before"
        return record
    # one launch per set of missing phases, so no point already in results.csv is measured again
    by_phases: dict[tuple[str, ...], list[int]] = {}
    for n in dict.fromkeys(n for n, _ in missing):
        phases = tuple(p for m, p in missing if m == n)
        by_phases.setdefault(phases, []).append(n)

    start = time.monotonic()
    statuses: dict[str, int] = {}
    for li, (phases, seq_lens) in enumerate(by_phases.items()):
        name = f"{tag}-w{world}-{strategy}" + (f"-{li}" if len(by_phases) > 1 else "")
        remaining = cfg.timeout_s - (time.monotonic() - start)
        launch = _launch(
            cfg, world, strategy, seq_lens, list(phases), results, logs / name, remaining, columns, bar, name
        )
        record["launches"].append(launch)
        for s, c in launch["statuses"].items():
            statuses[s] = statuses.get(s, 0) + c
    record["statuses"] = statuses
    record["status"] = "ok" if set(statuses) <= {"ok", "skipped"} else "failed"
    record["seconds"] = round(time.monotonic() - start, 2)
    return record


def _launch(cfg, world, strategy, seq_lens, phases, results, log_base, timeout_s, columns, bar, tag) -> dict[str, Any]:
    wanted = [(n, p) for n in seq_lens for p in phases]
    cmd = launch_command(cfg, world, bench_args(cfg, strategy, seq_lens, phases, results), tag=tag)
    out_log, err_log = log_base.with_suffix(".stdout.log"), log_base.with_suffix(".stderr.log")
    offset = results.stat().st_size
    t0 = time.monotonic()
    grace = 30.0 if cfg.launcher == "srun" else 5.0  # srun needs time to pass SIGTERM on to its remote tasks
    timed_out = False
    returncode: int | None = None
    if timeout_s <= 0:
        timed_out = True
        err_log.write_text("not started: the group's time was used up by its earlier launches\n")
    else:
        with open(out_log, "w") as fo, open(err_log, "w") as fe:
            fo.write("# " + shlex.join(cmd) + "\n")
            fo.flush()
            proc = subprocess.Popen(
                cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=_child_env(cfg), start_new_session=True
            )
            try:
                deadline = t0 + timeout_s
                seen = 0
                while True:
                    try:
                        returncode = proc.wait(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    now_rows = len(_read_rows(results, offset))
                    if now_rows != seen:
                        seen = now_rows
                        bar.set_postfix_str(f"{strategy} x{world}: {seen}/{len(wanted)} points")
                    if time.monotonic() >= deadline:
                        timed_out = True
                        kill_tree(proc, grace)
                        returncode = proc.returncode
                        break
            except BaseException:  # KeyboardInterrupt in a notebook or a shell: leave no rank behind
                kill_tree(proc, grace)
                raise

    new = _read_rows(results, offset)
    got = {(int(float(r["seq_len"])), r["phase"]) for r in new if r.get("strategy") == strategy and _key(r) is not None}
    unfinished = [pt for pt in wanted if pt not in got]
    statuses: dict[str, int] = {}
    for r in new:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    if unfinished:
        status, error = _failure_reason(err_log, returncode, timed_out, cfg.timeout_s)
        append_rows(results, [_failure_row(cfg, strategy, world, n, p, status, error) for n, p in unfinished], columns)
        statuses[status] = statuses.get(status, 0) + len(unfinished)
    return {
        "command": shlex.join(cmd),
        "seq_lens": seq_lens,
        "phases": phases,
        "returncode": returncode,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - t0, 2),
        "statuses": statuses,
        "stdout": str(out_log.relative_to(results.parent)),
        "stderr": str(err_log.relative_to(results.parent)),
    }


def _failure_row(
    cfg: SweepConfig, strategy: str, world: int, seq_len: int, phase: str, status: str, error: str
) -> dict[str, Any]:
    import torch

    return {
        **point(strategy, world, seq_len, phase, batch=cfg.batch, dtype=cfg.dtype, layout=cfg.layout),
        "status": status,
        "error": error,
        "model": cfg.model_label,
        "device": cfg.device,
        "repeats": cfg.repeats,
        "gpu_name": "cpu" if cfg.device == "cpu" else "",
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "timestamp": _now(),
    }


# ---------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmsring.sweep",
        description="Run (or resume) a benchmark sweep of fmsring.bench; flags override --params.",
    )
    p.add_argument("--params", help="YAML file of SweepConfig fields")
    p.add_argument("--print-run-dir", action="store_true", help="print the run folder this config resolves to and exit")
    p.add_argument("--print-name", action="store_true", help="print the run name this config resolves to and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(SweepConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "env":
            p.add_argument(
                flag,
                action="append",
                metavar="KEY=VALUE",
                help="extra environment for the launched processes (repeatable)",
            )
        elif f.name == "extra_args":
            p.add_argument(flag, help="extra flags for fmsring.bench, as one quoted string")
        elif f.name == "model_kwargs":
            p.add_argument(flag, help="JSON, e.g. '{\"nlayers\": 2}'")
        else:
            p.add_argument(flag, help=f"default: {_default_of(f)}")
    return p


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def config_from_args(argv: list[str] | None = None) -> tuple[SweepConfig, argparse.Namespace]:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    for f in dataclasses.fields(SweepConfig):
        v = getattr(args, f.name)
        if v is None:
            continue
        if f.name == "env":
            v = dict(kv.split("=", 1) for kv in v)
        overrides[f.name] = v
    cfg = SweepConfig.from_yaml(args.params, **overrides) if args.params else SweepConfig.from_dict(overrides)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = config_from_args(argv)
    if args.print_name:
        print(cfg.run_name)
        return 0
    if args.print_run_dir:
        print(cfg.run_dir)
        return 0
    try:
        run_dir = run_sweep(cfg, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
