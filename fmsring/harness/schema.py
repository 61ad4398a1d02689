"""The one results schema: the columns of ``results.csv``, the values its identity
columns take, which points a benchmark plans, when logits count as matching the
one-GPU model, and the one way rows are written and read.

bench, sweep and analysis all import this module, so a column, status,
strategy or tolerance exists in exactly one place, and the sweep knows which
rows a bench launch will write without starting one. It imports no torch at
module level: the sweep and the analysis read it without loading a model.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

COLUMNS = (
    "strategy",
    "variant",
    "world_size",
    "cp_size",
    "tp_size",
    "seq_len",
    "cached_len",
    "batch",
    "padding",
    "dtype",
    "layout",
    "phase",
    "latency_ms",
    "latency_ms_min",
    "latency_ms_max",
    "ttft_ms",
    "floor_ms",
    "peak_mem_gib",
    "tflops_per_gpu",
    "max_abs_err",
    "rel_err",
    "ref_norm",
    "same_next_token",
    "status",
    "error",
    "model",
    "device",
    "repeats",
    "gpu_name",
    "gpu_count",
    "interconnect",
    "link_gbps",
    "git_sha",
    "torch_version",
    "cuda_version",
    "nccl_version",
    "env",
    "timestamp",
)
STRATEGIES = ("single", "ring", "tp", "torch_cp")
PHASES = ("prefill", "decode", "followup")
DTYPES = ("float32", "bfloat16", "float16")
# In order of severity: when ranks disagree the worst wins, and a point's row
# that is retried keeps the least severe outcome.
STATUSES = ("ok", "skipped", "mismatch", "oom", "timeout", "error")
# Outcomes that running the same code again would repeat, so a resumed sweep
# does not measure them again; oom, timeout and error may be transient.
DONE_STATUSES = ("ok", "skipped", "mismatch")
AS_SHIPPED = "as-shipped"  # the peers' variant as FMS and PyTorch ship them: unfused, default SDPA backend
# Strategies that keep a KV cache, so they have decode and followup rows.
CACHED = ("single", "ring", "tp")


class Point(NamedTuple):
    """Which measurement a row holds; a run folder has at most one finished row per point."""

    strategy: str
    variant: str
    world_size: int
    seq_len: int
    cached_len: int
    phase: str


# ----------------------------------------------------------------------------- parsing


def parse_seq_len(value: Any) -> int:
    """128, "4096", "8K", "128k", "1M" -> tokens (K = 1024), so sweeps read like papers."""
    text = str(value).strip()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"a length is a positive integer with an optional K or M suffix, got {value!r}")
    return int(digits) * scale


def parse_seq_lens(value: Any) -> list[int]:
    """A list of lengths given as a list, a single value or a "8K,128K" string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v.strip("'\"")]
        value = [v.strip("'\"") for v in value]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [parse_seq_len(v) for v in value]


def ring_kwarg_names() -> set[str]:
    """The ``ring_*`` options of :func:`fmsring.get_model` (a variant may set any of them)."""
    import inspect

    from fmsring.loading import get_model

    return {n for n in inspect.signature(get_model).parameters if n.startswith("ring_")}


def parse_ring_variants(value: Any) -> dict[str, dict[str, Any]]:
    """``{name: {ring_* kwargs}}`` from a dict or its JSON text; names and options checked."""
    variants = json.loads(value) if isinstance(value, str) else value
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError(f'ring variants must be a JSON object of objects, e.g. {{"": {{}}}}, got {value!r}')
    known = ring_kwarg_names()
    for name, kwargs in variants.items():
        if name == AS_SHIPPED or name.strip() != name or "," in name:
            raise ValueError(f"ring variant name {name!r}: no leading/trailing space or comma, not {AS_SHIPPED!r}")
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"ring variant {name!r}: unknown option(s) {unknown}; fmsring.get_model takes {sorted(known)}"
            )
    return {str(k): dict(v) for k, v in variants.items()}


# ----------------------------------------------------------------------------- model and variants


@dataclass
class ModelSpec:
    """Which model to build and where: an FMS architecture/variant with seeded random
    weights, or a checkpoint (model_path + source). Shared by the bench and the sweep."""

    architecture: str = "llama"
    variant: str | None = "micro"
    model_path: str | None = None
    source: str | None = None  # checkpoint format for model_path, e.g. "hf"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra get_model kwargs, e.g. {"nlayers": 2}
    device: str = "cpu"  # cpu (gloo) or cuda (nccl)
    dtype: str = "float32"


def model_label(spec: ModelSpec) -> str:
    """The ``model`` column: the network measured, the same for every strategy and variant."""
    label = f"{spec.architecture}/{spec.variant}"
    if spec.model_kwargs:
        label += f" {json.dumps(spec.model_kwargs, sort_keys=True)}"
    if spec.model_path:
        label += f" @{spec.model_path}"
    return label


def ring_variant_label(name: str, ring_kwargs: dict[str, Any]) -> str:
    """The ``variant`` column of a ring variant: its name, plus the options every ring
    variant shares (``--ring-kwargs``), so its rows are never mistaken for the default's."""
    if not ring_kwargs:
        return name
    shared = json.dumps(ring_kwargs, sort_keys=True)
    return f"{name} {shared}" if name else shared


def variant_labels(strategy: str, ring_variants: dict[str, dict], ring_kwargs: dict, as_shipped: bool) -> list[str]:
    """The variants a launch measures for ``strategy``: ring's named variants; the peers'
    strongest configuration ("") and, with ``as_shipped``, FMS/PyTorch as shipped."""
    if strategy == "ring":
        return [ring_variant_label(name, ring_kwargs) for name in ring_variants]
    return ["", AS_SHIPPED] if as_shipped else [""]


def with_ring_tp(variants: dict[str, dict[str, Any]], tps: list[int]) -> dict[str, dict[str, Any]]:
    """Every ring variant once per TP size in ``tps`` (``--ring-tp 1,2,4``): one launch covers
    every factorisation cp x tp of its world. tp 1 keeps a variant's name, tp T appends "tpT"."""
    if not tps or list(tps) == [1]:
        return variants
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in tps):
        raise ValueError(f"ring TP sizes are positive integers, got {tps}")
    out: dict[str, dict[str, Any]] = {}
    for name, kwargs in variants.items():
        if "ring_tp" in kwargs:
            raise ValueError(f"ring variant {name!r} sets ring_tp and --ring-tp expands it too: use one")
        for t in dict.fromkeys(tps):
            out[name if t == 1 else f"{name} tp{t}".strip()] = kwargs if t == 1 else {**kwargs, "ring_tp": t}
    return out


def ring_tp_of(ring_kwargs: dict[str, Any]) -> int:
    """The TP size a ring variant's options ask for (1: weights replicated)."""
    return int(ring_kwargs.get("ring_tp", 1))


def fitting_ring_variants(variants: dict[str, dict[str, Any]], world: int) -> dict[str, dict[str, Any]]:
    """The ring variants that exist at ``world`` ranks: those whose ring_tp divides it."""
    return {name: kw for name, kw in variants.items() if world % ring_tp_of(kw) == 0}


def mesh_sizes(strategy: str, world: int, ring_tp: int = 1) -> tuple[int, int]:
    """(cp_size, tp_size) of a strategy at ``world`` ranks: the tokens' and the weights' split."""
    if strategy == "ring":
        return world // ring_tp, ring_tp
    return {"single": (1, 1), "tp": (1, world), "torch_cp": (world, 1)}[strategy]


def recomputed(seq_lens: list[int], phases: list[str], cached_lens: list[int]) -> dict[int, tuple[int, int]]:
    """Ring's fresh prefills beside the follow-ups: length P+T -> the first (P, T) that sums to it.
    A length the prefill phase measures anyway is left out (its prompt is that phase's)."""
    if "followup" not in phases:
        return {}
    measured = set(seq_lens) if "prefill" in phases else set()
    out: dict[int, tuple[int, int]] = {}
    for c in cached_lens:
        for t in seq_lens:
            if c + t not in measured:
                out.setdefault(c + t, (c, t))
    return out


def planned_points(
    strategy: str,
    world: int,
    variants: list[str],
    seq_lens: list[int],
    phases: list[str],
    cached_lens: list[int],
    followup_recompute: bool,
) -> list[Point]:
    """Every row a bench launch writes for ``strategy`` at ``world``, in the order it measures them.

    ``followup`` points have seq_len = the new tokens T and cached_len = the cached P.
    With ``followup_recompute`` ring also gets a fresh prefill of P+T tokens (:func:`recomputed`).
    """
    fresh = recomputed(seq_lens, phases, cached_lens) if strategy == "ring" and followup_recompute else {}
    points: list[Point] = []
    for v in variants:
        points += [Point(strategy, v, world, n, 0, p) for n in seq_lens for p in phases if p != "followup"]
        if "followup" in phases:
            points += [Point(strategy, v, world, t, c, "followup") for c in cached_lens for t in seq_lens]
        points += [Point(strategy, v, world, n, 0, "prefill") for n in fresh]
    return list(dict.fromkeys(points))


def point(
    strategy: str,
    world: int,
    seq_len: int,
    phase: str,
    *,
    batch: int,
    dtype: str,
    layout: str,
    variant: str = "",
    cached_len: int = 0,
    ring_tp: int = 1,
    padding: float = 0.0,
) -> dict[str, Any]:
    """The columns that say which point a row measures (the sweep's failure rows use them too)."""
    cp, tp = mesh_sizes(strategy, world, ring_tp)
    return {
        "strategy": strategy,
        "variant": variant,
        "world_size": world,
        "cp_size": cp,
        "tp_size": tp,
        "seq_len": seq_len,
        "cached_len": cached_len,
        "batch": batch,
        "padding": padding,
        "dtype": dtype,
        "layout": layout if strategy == "ring" else "",
        "phase": phase,
    }


def padding_problem(padding: float, batch: int, phases: Any) -> str:
    """Why a padding fraction cannot be measured as asked ("" if it can): it pads a batch's
    prompts to unequal lengths, so it needs two of them, and only decode rows take it."""
    if not 0 <= padding < 1:
        return f"padding is a fraction of the prompt in [0, 1), got {padding}"
    if padding and (batch < 2 or set(phases) != {"decode"}):
        return "padding needs a batch of >= 2 and the decode phase alone (a padded batch's generation)"
    return ""


def row_key(row: dict[str, Any]) -> Point | None:
    """A row's :class:`Point`; None for a row that does not name one."""
    try:
        return Point(
            str(row["strategy"]),
            str(row.get("variant") or ""),
            int(float(row["world_size"])),
            int(float(row["seq_len"])),
            int(float(row.get("cached_len") or 0)),
            str(row["phase"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- exactness


@dataclass(frozen=True)
class Tolerance:
    """The largest relative error of the compared logits, ||a - b|| / ||b||, that still
    counts as the same computation as the one-GPU model in this dtype."""

    rel_err: float
    reason: str


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(
        1e-4,
        "ranks only reorder fp32 sums (block-wise softmax merged through the log-sum-exp, "
        "sharded matmuls): measured ~1e-6; 1e-4 leaves room for long prompts, not for a wrong block",
    ),
    "bfloat16": Tolerance(
        2e-2,
        "ring and the one-GPU model round activations at the same places; each bf16 rounding is "
        "2^-9 relative and measured errors were 2.5e-3 to 4.7e-3 on H200 at 8K-128K",
    ),
    "float16": Tolerance(2e-2, "as bfloat16: the same rounding places, with a finer (2^-11) rounding"),
}
"""Per-dtype tolerances, and why. A greedy-token disagreement counts as a mismatch
only when the reference's top-2 logit gap exceeds twice the max abs error: below
that it is a near-tie that either answer rounds to, not a wrong computation."""


def judge(dtype: str, errors: dict[str, Any]) -> str:
    """Why a compared row does not match the one-GPU model ("" when it does).

    ``errors`` holds ``max_abs_err``, ``rel_err``, ``ref_norm`` and, when the
    greedy tokens differ, ``top2_gap`` (the reference's top-1 minus top-2 logit
    where they first differ). A zero or infinite reference, or non-finite
    errors, never pass: there is nothing a relative error could be judged by.
    A NaN ``ref_norm`` means unknown (rows written before the column existed).
    """
    tol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    abs_err, rel, norm = (float(errors.get(k, math.nan)) for k in ("max_abs_err", "rel_err", "ref_norm"))
    if norm <= 0 or math.isinf(norm):
        return f"reference logits degenerate (norm {norm:.3g}): exactness cannot be judged"
    if not (math.isfinite(abs_err) and math.isfinite(rel)):
        return "non-finite logits"
    problems = []
    if rel > tol.rel_err:
        problems.append(f"rel_err {rel:.3g} > {tol.rel_err:g} ({dtype}; max abs {abs_err:.3g}, ref norm {norm:.3g})")
    gap = errors.get("top2_gap")
    if gap is not None and math.isfinite(gap) and gap > 2 * abs_err:
        problems.append(f"greedy token differs where the reference's top-2 gap {gap:.3g} > 2 x max abs err")
    return "; ".join(problems)


# ----------------------------------------------------------------------------- provenance


def git_sha() -> str:
    """HEAD of this checkout, "-dirty" if tracked files changed; FMSRING_GIT_SHA where
    the code travelled without .git; "unknown" otherwise."""
    import subprocess

    if os.environ.get("FMSRING_GIT_SHA"):
        return os.environ["FMSRING_GIT_SHA"]
    root = str(Path(__file__).resolve().parents[2])
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _nccl_version() -> str:
    import torch

    try:
        return ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:  # noqa: BLE001 - a torch without NCCL
        return ""


# Environment variables that change what a launch measures without changing its code: which
# GPUs, how NCCL moves data and at what priority, the allocator. A row records those set.
PERFORMANCE_ENV = (
    "CUDA_VISIBLE_DEVICES", "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE", "NCCL_NVLS_ENABLE",
    "NCCL_ALGO", "NCCL_PROTO", "NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "TORCH_NCCL_HIGH_PRIORITY",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "PYTORCH_CUDA_ALLOC_CONF",
)  # fmt: skip


def launch_env() -> str:
    """The :data:`PERFORMANCE_ENV` variables set in this process, as ``NAME=value`` joined by spaces."""
    return " ".join(f"{k}={os.environ[k]}" for k in PERFORMANCE_ENV if k in os.environ)


def row_provenance(spec: ModelSpec, repeats: int, device_index: int = 0) -> dict[str, Any]:
    """Columns that describe the model, machine and code, identical on every row of a launch."""
    import torch

    from fmsring.harness.ceilings import interconnect

    cuda = spec.device == "cuda" and torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    return {
        "model": model_label(spec),
        "device": spec.device,
        "repeats": repeats,
        "gpu_name": torch.cuda.get_device_name(device_index) if cuda else ("cpu" if spec.device == "cpu" else ""),
        "gpu_count": gpus,
        "interconnect": interconnect(spec.device if cuda else "cpu", gpus),
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "nccl_version": _nccl_version() if cuda else "",
        "env": launch_env(),
    }


def environment() -> dict[str, Any]:
    """Versions, host and GPUs of this machine, for a run folder's params.json."""
    import platform
    import socket
    import sys
    from importlib import metadata

    import torch

    def version(dist_name: str) -> str | None:
        try:
            return metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            return None

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": (_nccl_version() or None) if gpus else None,
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


# ----------------------------------------------------------------------------- results.csv


def check_header(path: str | os.PathLike | None) -> None:
    """Refuse a CSV whose header is not COLUMNS: rows would land under the wrong names."""
    if not path or not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, newline="") as fh:
        header = next(csv.reader([fh.readline()]), [])
    if tuple(header) != COLUMNS:
        raise ValueError(
            f"{path} has other columns than fmsring.harness.schema.COLUMNS (an older schema?); write to a new file"
        )


def append_rows(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` in one write under an exclusive lock, the header first into an empty
    file, never glued onto a torn last line. Bench ranks and the sweep both write this way,
    so a row is either wholly in the file or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_header(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        buf = io.StringIO()
        if size and not _ends_with_newline(path, size):
            buf.write("\n")
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
        if size == 0:
            writer.writeheader()
        for r in rows:
            writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in COLUMNS})
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


def read_rows(path: str | os.PathLike, offset: int = 0) -> list[dict[str, str]]:
    """Rows of ``path`` (from byte ``offset`` on); torn or malformed lines are dropped."""
    path = Path(path)
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
            if row.get("status") in STATUSES:
                rows.append(row)
    return rows


def done_points(path: str | os.PathLike, statuses: tuple[str, ...] = DONE_STATUSES) -> set[Point]:
    """The points of ``path``'s rows whose status is in ``statuses``."""
    return {k for r in read_rows(path) if r.get("status") in statuses and (k := row_key(r)) is not None}
