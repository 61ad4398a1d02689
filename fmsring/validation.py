"""The checks LlamaRing makes before it runs: a model the ring cannot run
exactly is refused when it is wrapped, and bad inputs get a clear error
before any rank starts a collective."""

from __future__ import annotations

import torch
from fms.modules.attention import MultiHeadAttention, TPMultiHeadAttention
from torch import nn

from fmsring import families, ssm
from fmsring.modes.followup import FOLLOWUP_MODES
from fmsring.strategy import RingAttentionStrategy


def attention_layers(model: nn.Module, strategy: RingAttentionStrategy, followup: str, prefill_chunk: int):
    """``model``'s attention layers, if the ring runs the model exactly (:mod:`fmsring.families`)
    and can drive them with these options."""
    families.check(model)
    attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    name = type(model).__name__
    if not attns:
        raise ValueError(f"{name} has no MultiHeadAttention: ring attention cannot drive it")
    tp_sizes = {m.world_size if isinstance(m, TPMultiHeadAttention) else 1 for m in attns}
    if tp_sizes != {strategy.tp_size}:
        raise ValueError(
            f"{name}'s attention is sharded over {sorted(tp_sizes)} tensor-parallel "
            f"rank(s) but the strategy's TP group has {strategy.tp_size}: load it with "
            "fmsring.get_model(..., ring_tp=...) so both come from one mesh"
        )
    if ssm.has_ssm(model) and strategy.tp_size > 1:
        raise ValueError(f"{name} has Mamba2 layers, which the ring runs with ring_tp=1 (fmsring.ssm)")
    if followup not in FOLLOWUP_MODES:
        raise ValueError(f"unknown ring_followup {followup!r}; choose one of {FOLLOWUP_MODES}")
    if prefill_chunk and prefill_chunk < strategy.world_size:
        raise ValueError(
            f"ring_prefill_chunk={prefill_chunk}: a chunk needs at least one token per rank "
            f"({strategy.world_size}); 0 turns chunking off"
        )
    return attns


def check_inputs(
    x: torch.Tensor, position_ids: torch.Tensor | None, mask: torch.Tensor | None, device: torch.device
) -> None:
    """FMS's calling convention, checked: ids [b, n] of integers, positions like them, a mask
    [b, n or 1, keys] (or with a head dim of 1), all on the model's ``device``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            "input_ids must be an integer tensor [batch, seq]; "
            f"got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"input_ids has no tokens: {tuple(x.shape)}")
    for name, t in (("input_ids", x), ("position_ids", position_ids), ("mask", mask)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the model is on {device}")
    if position_ids is not None and position_ids.shape != x.shape:
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {tuple(x.shape)}")
    if mask is not None and (
        mask.dim() not in (3, 4) or mask.shape[0] != x.shape[0] or mask.shape[-2] not in (1, x.shape[1])
    ):
        raise ValueError(
            f"mask must be [batch, q_len, kv_len] (FMS's format); got {tuple(mask.shape)} for input {tuple(x.shape)}"
        )
