"""The CUDA caching allocator's configuration where fmsring owns the process.

Near the memory limit PyTorch's default allocator fragments: a long prefill
frees and allocates blocks of many sizes, a request finds no free segment
big enough though enough memory is free in total, and the allocator
flushes its cache and retries over and over: the run stalls, with no
message. Expandable
segments grow one mapping per stream instead, so memory freed anywhere can
be reused. The allocator reads its configuration once, when CUDA first
allocates, so the CLI and the bench set it first thing; a user's own
setting always wins.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
STALL_FREE = "expandable_segments:True"


def configure_allocator() -> str:
    """Use expandable segments unless ``PYTORCH_CUDA_ALLOC_CONF`` is set; return the configuration in force.

    Call it before the first CUDA allocation. Once CUDA is initialised the
    allocator has read its configuration: then nothing changes and a line on
    stderr says so, rather than claiming a setting that is not in effect.
    """
    if ALLOC_CONF in os.environ:
        return os.environ[ALLOC_CONF]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        print(f"[fmsring] CUDA is already initialised: {ALLOC_CONF} cannot be set any more", file=sys.stderr)
        return ""
    os.environ[ALLOC_CONF] = STALL_FREE
    return STALL_FREE


# Reserved-but-unallocated memory above this share of the card, with less than
# it free, is the state in which the default allocator starts flushing and retrying.
FRAGMENTED_SHARE = 0.05
_warned: set[int] = set()


def fragmentation_warning(reserved: int, allocated: int, free: int, total: int, conf: str) -> str:
    """Why a CUDA device looks fragmented near its limit ("" if it does not).

    Near the limit means less free than the allocator holds reserved but
    unallocated; fragmented means that idle reserve is over
    :data:`FRAGMENTED_SHARE` of the card. Expandable segments do not
    fragment this way.
    """
    idle = reserved - allocated
    if "expandable_segments:true" in conf.replace(" ", "").lower() or idle < FRAGMENTED_SHARE * total or free > idle:
        return ""
    return (
        f"the CUDA allocator holds {idle / 2**30:.1f} GiB reserved but unused while {free / 2**30:.1f} GiB are "
        f"free: near the memory limit the default allocator can stall for minutes. Set "
        f"{ALLOC_CONF}={STALL_FREE} before the first CUDA allocation (fmsring's CLI and bench do)."
    )


def warn_if_fragmented(device: torch.device) -> None:
    """Warn once per device when it looks fragmented near its limit (:func:`fragmentation_warning`)."""
    if device.type != "cuda" or device.index in _warned:
        return
    import torch

    free, total = torch.cuda.mem_get_info(device)
    message = fragmentation_warning(
        torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device), free, total,
        os.environ.get(ALLOC_CONF, ""),
    )  # fmt: skip
    if message:
        _warned.add(device.index)
        warnings.warn(message, stacklevel=3)
