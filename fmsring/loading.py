"""``fmsring.get_model``: ``fms.models.get_model`` with ``distributed_strategy="ring"``."""

from __future__ import annotations

from typing import Any

import fms.models
import torch
import torch.distributed as dist
from torch import nn

from fmsring.comm import broadcast_weights
from fmsring.followup import FOLLOWUP_MODES
from fmsring.layout import LAYOUTS
from fmsring.model import LlamaRing
from fmsring.strategy import RingAttentionStrategy

STRATEGIES = ("ring", "replicated", None, "", "tp", "mp", "fsdp", "hsdp", "ddp")
RING_OPTIONS = (
    "ring_layout", "ring_check_inputs", "ring_cache_headroom", "ring_ffn_chunk",
    "ring_cuda_graphs", "ring_fuse", "ring_followup", "ring_prefill_chunk",
)  # fmt: skip

def get_model(
    architecture: str,
    variant: str | None = None,
    model_path: str | None = None,
    source: str | None = None,
    device_type: str = "cpu",
    data_type: str | torch.dtype | None = None,
    distributed_strategy: str | None = None,
    checkpoint_sharding: str | None = None,
    group: dist.ProcessGroup | None = None,
    ring_layout: str = "zigzag",
    ring_check_inputs: bool = True,
    ring_cache_headroom: int = 256,
    ring_ffn_chunk: int = 16384,
    ring_cuda_graphs: bool = True,
    ring_fuse: bool = True,
    ring_followup: str = "auto",
    ring_prefill_chunk: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """``fms.models.get_model`` that also accepts ``distributed_strategy="ring"``.

    With ``"ring"`` the weights are loaded whole on every rank and wrapped in
    :class:`LlamaRing`. ``"replicated"`` loads the plain, unsharded FMS model
    on every rank (FMS itself turns ``None`` into tensor parallel under
    torchrun). Any other strategy is passed to FMS unchanged. Random-init
    models (no ``model_path``) get rank 0's weights on every rank. The
    ``ring_*`` options are :class:`LlamaRing`'s; an unknown one is an error
    (FMS would pass it on to the model config, where it is silently ignored).
    """
    if distributed_strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed_strategy {distributed_strategy!r}; choose one of {STRATEGIES}")
    unknown = sorted(k for k in kwargs if k.startswith("ring_"))
    if unknown:
        raise ValueError(f"unknown ring option(s) {unknown}; fmsring.get_model takes {RING_OPTIONS}")
    ours = distributed_strategy in ("ring", "replicated")
    if ours and ring_layout not in LAYOUTS:
        raise ValueError(f"unknown ring_layout {ring_layout!r}; choose one of {LAYOUTS}")
    if ring_followup not in FOLLOWUP_MODES:
        raise ValueError(f"unknown ring_followup {ring_followup!r}; choose one of {FOLLOWUP_MODES}")
    strategy = RingAttentionStrategy(group=group, layout=ring_layout) if distributed_strategy == "ring" else None
    # FMS treats a strategy name it does not know as replicated: every rank loads every weight.
    model = fms.models.get_model(
        architecture,
        variant,
        model_path,
        source,
        device_type,
        data_type,
        "replicated" if ours else distributed_strategy,
        checkpoint_sharding,
        group,
        **kwargs,
    )
    if not ours:
        return model
    if dist.is_initialized() and model_path is None and architecture != "hf_pretrained":
        broadcast_weights(model, group)
    if strategy is None:
        return model
    return LlamaRing(
        model,
        strategy,
        check_inputs=ring_check_inputs,
        cache_headroom=ring_cache_headroom,
        ffn_chunk=ring_ffn_chunk,
        cuda_graphs=ring_cuda_graphs,
        fuse=ring_fuse,
        followup=ring_followup,
        prefill_chunk=ring_prefill_chunk,
    )
