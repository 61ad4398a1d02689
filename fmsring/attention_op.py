"""The ``"ring"`` attention op, registered with FMS's attention-op registry.

FMS's ``MultiHeadAttention`` calls a registered op in two parts: *store* (put
this call's K/V into the cache) and *compute*. Every forward of
:class:`fmsring.LlamaRing` passes one context object (keyword ``ring``) whose
type is the attention of that call -- a mode of :mod:`fmsring.modes` -- and
the op hands both parts to it, with the layer's sinks and window where FMS
passes them (:mod:`fmsring.windows`). Every call goes to ``compute_prefill`` (FMS's
default ``is_prefill`` is always True): the context object, not FMS's
prefill/decode split, says which attention runs.
"""

from __future__ import annotations

from typing import NotRequired, Unpack

import torch
from fms.modules.attention import AttentionKwargs, register_attention_op

from fmsring.modes import AttentionMode
from fmsring.windows import LayerAttention

ATTN_NAME = "ring"


class RingAttentionKwargs(AttentionKwargs):
    """The kwargs LlamaRing passes the FMS model for the ``"ring"`` op (FMS types each op's kwargs so)."""

    ring: AttentionMode
    sinks: NotRequired[torch.Tensor]  # FMS passes these to layers with attention sinks (SinkAttentionKwargs)
    sliding_window: NotRequired[int | None]


KNOWN_KWARGS = RingAttentionKwargs.__required_keys__ | RingAttentionKwargs.__optional_keys__


def _store_op(keys, values, key_cache, value_cache, **kwargs: Unpack[RingAttentionKwargs]):
    return kwargs["ring"].store(keys, values, key_cache, value_cache)


def _compute_op(query, keys, values, nheads, kvheads, p_dropout, scale_factor, **kwargs: Unpack[RingAttentionKwargs]):
    unknown = sorted(set(kwargs) - KNOWN_KWARGS)
    if unknown:  # an FMS family passing its attention something the ring would silently ignore
        raise TypeError(f"the {ATTN_NAME!r} attention op does not know the keyword argument(s) {unknown}")
    scale = scale_factor if scale_factor is not None else query.shape[-1] ** -0.5
    return kwargs["ring"].attend(query, keys, values, scale, LayerAttention.of(kwargs))


def _validate(input_ids, position_ids, past_key_value_states, **kwargs: Unpack[RingAttentionKwargs]) -> None:
    if not hasattr(kwargs.get("ring"), "attend"):
        raise ValueError(
            f"attn_name={ATTN_NAME!r} is driven by fmsring.LlamaRing; build the model with "
            "fmsring.get_model(..., distributed_strategy='ring') instead of passing attn_name yourself"
        )


def register() -> None:
    """Register the op with FMS (fmsring's ``__init__`` does, once)."""
    register_attention_op(ATTN_NAME, _store_op, _compute_op, validate_attn_kwargs_op=_validate)
