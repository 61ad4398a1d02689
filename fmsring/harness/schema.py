"""``results.csv``: its columns, the values its identity columns take, the :class:`Point`
a row measures, and the one way rows are written and read. bench, sweep and analysis all
import this module, so a column, status, strategy or phase exists in one place. It
imports no torch: the sweep and the analysis read it without loading a model.
"""

from __future__ import annotations

import csv
import enum
import fcntl
import io
import os
from pathlib import Path
from typing import Any, NamedTuple

from fmsring.harness.exactness import TOLERANCES, judge

COLUMNS = (
    "strategy", "variant", "world_size", "cp_size", "tp_size", "seq_len", "cached_len", "batch", "padding", "dtype",
    "layout", "phase", "latency_ms", "latency_ms_min", "latency_ms_max", "ttft_ms", "first_step_ms", "stream_ms",
    "floor_ms", "peak_mem_gib", "tflops_per_gpu", "max_abs_err", "rel_err", "ref_norm", "same_next_token", "status",
    "error", "model", "device", "repeats", "gpu_name", "gpu_count", "interconnect", "link_gbps", "git_sha",
    "torch_version", "cuda_version", "nccl_version", "env", "timestamp", "gpu_memory_gib",
)  # fmt: skip


class Strategy(enum.StrEnum):
    """Who runs the model, and the facts about each that need no torch: its mesh and whether it caches."""

    SINGLE = "single"
    RING = "ring"
    TP = "tp"
    TORCH_CP = "torch_cp"

    @property
    def cached(self) -> bool:
        """Keeps a KV cache, so it has decode and follow-up rows (torch's context_parallel has none)."""
        return self is not Strategy.TORCH_CP

    def mesh(self, world: int, ring_tp: int = 1) -> tuple[int, int]:
        """(cp_size, tp_size) at ``world`` ranks: the tokens' and the weights' split."""
        return {"single": (1, 1), "ring": (world // ring_tp, ring_tp), "tp": (1, world), "torch_cp": (world, 1)}[self]


class Phase(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    FOLLOWUP = "followup"  # T new tokens (seq_len) on a cache of P (cached_len)


class Status(enum.StrEnum):
    """In order of severity: when ranks disagree the worst wins."""

    OK = "ok"
    SKIPPED = "skipped"
    MISMATCH = "mismatch"
    OOM = "oom"
    TIMEOUT = "timeout"
    ERROR = "error"


STRATEGIES = tuple(s.value for s in Strategy)
PHASES = tuple(p.value for p in Phase)
STATUSES = tuple(s.value for s in Status)
# Outcomes that running the same code again would repeat, so a resumed run skips them.
DONE_STATUSES = ("ok", "skipped", "mismatch")
DTYPES = ("float32", "bfloat16", "float16")
AS_SHIPPED = "as-shipped"  # the peers' variant as FMS and PyTorch ship them: unfused, default SDPA backend
COMPILED = "compiled"  # the peers' variant compiled whole, as FMS's inference script compiles them (--compile-peers)


def mesh_sizes(strategy: str, world: int, ring_tp: int = 1) -> tuple[int, int]:
    """(cp_size, tp_size) of a strategy at ``world`` ranks (see :meth:`Strategy.mesh`)."""
    return Strategy(strategy).mesh(world, ring_tp)


class Point(NamedTuple):
    """Which measurement a row holds; a run folder has at most one finished row per point."""

    strategy: str
    variant: str
    world_size: int
    seq_len: int
    cached_len: int
    phase: str


def row_key(row: dict[str, Any]) -> Point | None:
    """A row's :class:`Point`; None for a row that does not name one."""
    try:
        return Point(str(row["strategy"]), str(row.get("variant") or ""), int(float(row["world_size"])),
                     int(float(row["seq_len"])), int(float(row.get("cached_len") or 0)), str(row["phase"]))  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return None


def check_header(path: str | os.PathLike | None, columns: tuple[str, ...] = COLUMNS) -> None:
    """Refuse a CSV whose header is not ``columns``: rows would land under the wrong names."""
    if not path or not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, newline="") as fh:
        header = next(csv.reader([fh.readline()]), [])
    if tuple(header) != columns:
        raise ValueError(f"{path} has other columns than this writer's (an older schema?); write to a new file")


def append_rows(path: str | os.PathLike, rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> None:
    """Append ``rows`` in one write under an exclusive lock, the header first into an empty
    file, never glued onto a torn last line. Bench ranks, the sweep and the needle runs all
    write this way, so a row is either wholly in the file or not at all.

    Args:
        path: the CSV file.
        rows: dicts by column name; a missing or None value is written empty.
        columns: the file's header (default: the bench's :data:`COLUMNS`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_header(path, columns)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        buf = io.StringIO()
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    buf.write("\n")
        writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
        if size == 0:
            writer.writeheader()
        for r in rows:
            writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
        if buf.getvalue():
            os.write(fd, buf.getvalue().encode())
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_rows(path: str | os.PathLike, offset: int = 0) -> list[dict[str, str]]:
    """Rows of ``path`` (from byte ``offset`` on); torn or malformed lines are dropped."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        header = next(csv.reader([f.readline()]), [])
        if offset:
            f.seek(max(offset, f.tell()))
        records = [dict(zip(header, rec)) for rec in csv.reader(f) if len(rec) == len(header) and rec != header]
    return [r for r in records if r.get("status") in STATUSES]


def done_points(path: str | os.PathLike) -> set[Point]:
    """The points of ``path``'s rows that a resumed run does not measure again."""
    return {k for r in read_rows(path) if r.get("status") in DONE_STATUSES and (k := row_key(r)) is not None}


__all__ = ["AS_SHIPPED", "COLUMNS", "COMPILED", "PHASES", "STATUSES", "STRATEGIES", "TOLERANCES", "Phase", "Point",
           "Status", "Strategy", "append_rows", "check_header", "done_points", "judge", "mesh_sizes", "read_rows",
           "row_key"]  # fmt: skip
