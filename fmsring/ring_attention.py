"""The ``"ring"`` attention op, registered with FMS's attention-op registry,
and the K/V ring pass that prefill and follow-ups share.

FMS's ``MultiHeadAttention`` calls a registered op in two parts: *store* (put
this call's K/V into the cache) and *compute*. Every forward of
:class:`fmsring.LlamaRing` passes one context object (keyword ``ring``) whose
type is the attention of that call -- :class:`Prefill` here,
:class:`fmsring.followup.Followup`, :class:`fmsring.decode.DecodeStep` or
:class:`fmsring.decode.ReplicatedStep` -- and the op hands both parts to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from fms.modules.attention import register_attention_op

from fmsring.cache import allocate_layer
from fmsring.kernels import attention_with_lse, empty_partial, merge_into, merge_pair_auto
from fmsring.layout import ShardPlan
from fmsring.strategy import RingAttentionStrategy

ATTN_NAME = "ring"


class AttentionMode(Protocol):
    """What one forward tells every layer's ring op: how to store and how to attend."""

    def store(
        self, keys: torch.Tensor, values: torch.Tensor, key_cache: torch.Tensor | None, value_cache: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """FMS's store op: (keys to compute on, values to compute on, key cache, value cache)."""
        ...

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of query [b, L, h, d] given what :meth:`store` returned; [b, L, h, d] in query's dtype."""
        ...


class RingBuffers:
    """Flat scratch buffers for one forward's ring exchanges, allocated on the
    first layer (sized for the largest block any rank sends) and reused by
    every layer, so a 32-layer forward allocates them once."""

    def __init__(self) -> None:
        self._flat: dict[int, torch.Tensor] = {}

    def get(self, index: int, shape: tuple[int, ...], capacity: int, like: torch.Tensor) -> torch.Tensor:
        """Buffer ``index`` (of ``capacity`` elements, like ``like``) viewed as ``shape``."""
        if index not in self._flat:
            self._flat[index] = like.new_empty(capacity)
        return self._flat[index][: math.prod(shape)].view(shape)


class Partials:
    """The running (out, lse) of every local query row during one ring pass.

    A row's first partial is stored as is. When no row gets more than two
    partials (``pairwise``), the second is merged straight into the query
    dtype by :func:`fmsring.kernels.merge_pair` -- one fp32 computation, one
    rounding -- so no fp32 accumulator is held or streamed through; otherwise
    an fp32 accumulator takes any number of merges. Rows that no key reaches
    read as "no contribution" (out 0, lse -inf).
    """

    def __init__(self, q: torch.Tensor, pairwise: bool):
        self.shape, self.pairwise = q.shape, pairwise
        self.like = q
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self.written: list[tuple[int, int]] = []
        if not pairwise:
            self.out, self.lse = empty_partial(q)

    def add(self, lo: int, hi: int, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
        fresh = all(hi <= a or lo >= b for a, b in self.written)
        self.written.append((lo, hi))
        whole = lo == 0 and hi == self.shape[2]
        if self.out is None:
            if whole:
                self.out, self.lse = blk_out, blk_lse
                return
            out, self.lse = empty_partial(self.like)
            self.out = out.to(blk_out.dtype)
        assert self.lse is not None
        rows = slice(lo, hi)
        if fresh:
            self.out[:, :, rows].copy_(blk_out)
            self.lse[:, :, rows].copy_(blk_lse)
        elif self.pairwise:
            out, lse = merge_pair_auto(self.out[:, :, rows], self.lse[:, :, rows], blk_out, blk_lse)
            if whole:
                self.out, self.lse = out, lse
            else:
                self.out[:, :, rows].copy_(out)
                self.lse[:, :, rows].copy_(lse)
        else:
            merge_into(self.out[:, :, rows], self.lse[:, :, rows], blk_out, blk_lse)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [b, h, L, d], lse [b, h, L] fp32); empty rows as "no contribution"."""
        if self.out is None:
            return empty_partial(self.like)
        assert self.lse is not None
        return self.out, self.lse


def ring_pass_kv(
    q: torch.Tensor,
    kv: torch.Tensor,
    plan: ShardPlan,
    cached: tuple[int, ...],
    strategy: RingAttentionStrategy,
    buffers: RingBuffers,
    scale: float,
    bias_blocks: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Attention of this rank's queries q [b, h, Lq, d] over every rank's keys,
    the K/V blocks travelling around the ring while the block in hand is computed.

    kv [2, b, kvh, cached[rank] + Lq, d] is this rank's keys and values: its
    ``cached`` tokens (a follow-up's cache shard; 0 for a prefill) then its
    tokens of ``plan``. Only kv-heads travel (GQA is never expanded), heads
    before tokens, which is the layout cuDNN reads fastest. ``bias_blocks``
    (a prefill with a user mask) is the additive mask of the queries against
    each rank's keys, None where fully masked. Returns out [b, h, Lq, d].
    """
    world, rank = strategy.world_size, strategy.rank
    _, b, kvh, _, d = kv.shape
    capacity = 2 * b * kvh * d * max(c + n for c, n in zip(cached, plan.local_lens))
    acc = Partials(q, pairwise=world <= 2 and not any(cached) and bias_blocks is None)
    for step in range(world):
        src = (rank - step) % world
        if step + 1 < world:
            nxt = (src - 1) % world
            incoming = buffers.get(step % 2, (2, b, kvh, cached[nxt] + plan.local_len(nxt), d), capacity, kv)
            strategy.comm.send_recv(kv, incoming)
        if bias_blocks is not None:
            bias = bias_blocks[src]
            if bias is not None:
                acc.add(0, q.shape[2], *attention_with_lse(q, kv[0], kv[1], scale, bias=bias))
        else:
            for c in plan.block_calls(rank, src, cached[src]):
                blk = attention_with_lse(
                    q[:, :, c.q_lo : c.q_hi],
                    kv[0, :, :, c.k_lo : c.k_hi],
                    kv[1, :, :, c.k_lo : c.k_hi],
                    scale,
                    causal=c.causal,
                )
                acc.add(c.q_lo, c.q_hi, *blk)
        if step + 1 < world:
            strategy.comm.wait()
            kv = incoming
    return acc.result()[0]


def to_query_layout(out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """[b, h, L, d] (any float dtype) -> [b, L, h, d] contiguous in the query's dtype.

    cuDNN writes its output in the query's memory layout, which already is
    [b, L, h, d]: then this is a view, not a copy of the whole output.
    """
    view = out.transpose(1, 2)
    if view.dtype == query.dtype and view.is_contiguous():
        return view
    return torch.empty_like(query).copy_(view)


def heads_major(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """K/V [b, L, kvh, d] (FMS's and the cache's layout) packed as one [2, b, kvh, L, d] tensor, what the ring sends."""
    b, n, kvh, d = keys.shape
    kv = keys.new_empty(2, b, kvh, n, d)
    kv[0].copy_(keys.transpose(1, 2))
    kv[1].copy_(values.transpose(1, 2))
    return kv


@dataclass
class Prefill:
    """A ring prefill: every rank holds its tokens of ``plan``; with a cache,
    each layer's K/V go into new buffers of ``capacity`` slots."""

    strategy: RingAttentionStrategy
    plan: ShardPlan
    capacity: int
    bias_blocks: list[torch.Tensor | None] | None = None
    buffers: RingBuffers = field(default_factory=RingBuffers)

    def store(self, keys, values, key_cache, value_cache):
        return keys, values, allocate_layer(keys, self.capacity), allocate_layer(values, self.capacity)

    def attend(self, query, keys, values, scale):
        kv = heads_major(keys, values)
        zeros = (0,) * self.strategy.world_size
        out = ring_pass_kv(
            query.transpose(1, 2), kv, self.plan, zeros, self.strategy, self.buffers, scale, self.bias_blocks
        )
        return to_query_layout(out, query)


def _store_op(keys, values, key_cache, value_cache, ring: AttentionMode, **_):
    return ring.store(keys, values, key_cache, value_cache)


def _compute_op(query, keys, values, nheads, kvheads, p_dropout, scale_factor, ring: AttentionMode, **_):
    scale = scale_factor if scale_factor is not None else query.shape[-1] ** -0.5
    return ring.attend(query, keys, values, scale)


def _validate(input_ids, position_ids, past_key_value_states, ring: AttentionMode | None = None, **_) -> None:
    if ring is None or not hasattr(ring, "attend"):
        raise ValueError(
            f"attn_name={ATTN_NAME!r} is driven by fmsring.LlamaRing; build the model with "
            "fmsring.get_model(..., distributed_strategy='ring') instead of passing attn_name yourself"
        )


# Every call goes to ``compute_prefill`` (FMS's default is_prefill is always
# True): the context object, not FMS's prefill/decode split, says which
# attention runs.
register_attention_op(ATTN_NAME, _store_op, _compute_op, validate_attn_kwargs_op=_validate)
