"""The CUDA caching allocator's configuration where fmsring owns the process.

Near the memory limit PyTorch's default allocator fragments: a long prefill
frees and allocates blocks of many sizes, a request finds no free segment
big enough though enough memory is free in total, and the allocator
flushes its cache and retries over and over -- a run that should take two
minutes stalls past nine with no message (docs/performance.md). Expandable
segments grow one mapping per stream instead, so memory freed anywhere can
be reused. The allocator reads its configuration once, when CUDA first
allocates, so the CLI and the bench set it first thing; a user's own
setting always wins.
"""

from __future__ import annotations

import os
import sys

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
STALL_FREE = "expandable_segments:True"


def configure_allocator() -> str:
    """Use expandable segments unless ``PYTORCH_CUDA_ALLOC_CONF`` is set; return the configuration in force.

    Call it before the first CUDA allocation. Once CUDA is initialised the
    allocator has read its configuration: then nothing changes and a warning
    says so, rather than claiming a setting that is not in effect.
    """
    if ALLOC_CONF in os.environ:
        return os.environ[ALLOC_CONF]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        print(f"[fmsring] CUDA is already initialised: {ALLOC_CONF} cannot be set any more", file=sys.stderr)
        return ""
    os.environ[ALLOC_CONF] = STALL_FREE
    return STALL_FREE
