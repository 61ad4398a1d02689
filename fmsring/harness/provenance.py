"""Where and when a row was measured: the model, the machine, the code and the environment that
change a measurement, identical on every row of a launch (and a run folder's params.json)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def now() -> str:
    """The ``timestamp`` of a row (and of a run folder's sessions, a ceilings entry): UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` whole or not at all (a temporary file, then renamed): a killed run never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def model_label(spec: Any) -> str:
    """The ``model`` column: the network measured, the same for every strategy and variant."""
    label = f"{spec.architecture}/{spec.variant}"
    if spec.model_kwargs:
        label += f" {json.dumps(spec.model_kwargs, sort_keys=True)}"
    if spec.model_path:
        label += f" @{spec.model_path}"
    return label


def git_sha() -> str:
    """HEAD of this checkout, "-dirty" if tracked files changed; FMSRING_GIT_SHA where
    the code travelled without .git; "unknown" otherwise."""
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
# GPUs, how NCCL moves data and at what priority, the allocator, which BLAS library a matmul
# takes, inductor options set by scripts/inductor_options.py. A row records those set, and every
# inductor setting (below).
PERFORMANCE_ENV = (
    "CUDA_VISIBLE_DEVICES", "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE", "NCCL_NVLS_ENABLE",
    "NCCL_ALGO", "NCCL_PROTO", "NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "TORCH_NCCL_HIGH_PRIORITY",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "PYTORCH_CUDA_ALLOC_CONF",
    "TORCH_BLAS_PREFER_CUBLASLT", "FMSRING_INDUCTOR_OPTIONS",
)  # fmt: skip
# Inductor reads dozens of TORCHINDUCTOR_* variables (tuning, launchers, PDL), more each release:
# all are recorded but the cache's folder, a path that changes where compiled code lives, not what runs.
INDUCTOR_ENV_PREFIX, INDUCTOR_ENV_UNRECORDED = "TORCHINDUCTOR_", ("TORCHINDUCTOR_CACHE_DIR",)


def launch_env() -> str:
    """The :data:`PERFORMANCE_ENV` variables and inductor's settings set in this process, as ``NAME=value``
    joined by spaces."""
    inductor = sorted(k for k in os.environ if k.startswith(INDUCTOR_ENV_PREFIX) and k not in INDUCTOR_ENV_UNRECORDED)
    return " ".join(f"{k}={os.environ[k]}" for k in (*PERFORMANCE_ENV, *inductor) if k in os.environ)


def row_provenance(spec: Any, repeats: int, device_index: int = 0) -> dict[str, Any]:
    """Columns that describe the model, machine and code, identical on every row of a launch."""
    import torch

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
        "gpu_memory_gib": torch.cuda.get_device_properties(device_index).total_memory / 2**30 if cuda else "",
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


def interconnect(device_type: str, gpu_count: int) -> str:
    """How the GPUs of this run talk: "pcie-like" when ``NCCL_P2P_DISABLE`` sends NCCL through
    host memory, else "nvlink" or "pcie" as ``nvidia-smi topo -m`` links GPU 0 and GPU 1; ""
    for CPUs, one GPU, or when nvidia-smi cannot tell."""
    if device_type != "cuda" or gpu_count < 2:
        return ""
    if os.environ.get("NCCL_P2P_DISABLE", "0").strip().lower() in ("1", "true", "yes"):
        return "pcie-like"
    try:
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return topo_link(out)


def topo_link(topo: str) -> str:
    """GPU 0's link to GPU 1 in ``nvidia-smi topo -m``'s matrix: "nvlink" (NV#), "pcie" (PIX, PXB,
    PHB, NODE, SYS), "" when the matrix has no such cell."""
    for line in topo.splitlines():
        cells = line.split()
        if line.startswith("GPU0") and len(cells) > 2:  # GPU0's row, not the header that names it
            link = cells[2]
            if link.startswith("NV"):
                return "nvlink"
            return "pcie" if link in ("PIX", "PXB", "PHB", "NODE", "SYS") else ""
    return ""
