"""The ``"ring"`` attention op, registered with FMS's attention-op registry.

Prefill: each rank holds its queries and its own K/V; K/V (kv-heads only)
travel around the ring while the block in hand is computed, and the partial
results are merged with their log-sum-exp. Decode: the new token's query is
replicated, every rank attends over its shard of the cache, and one
all-gather of (out, lse) per layer merges the shards exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from fms.modules.attention import register_attention_op

from fmsring.cache import allocate_layer
from fmsring.kernels import (
    attention_with_lse,
    decode_attention_with_lse,
    empty_partial,
    merge_into,
    merge_pair_auto,
    merge_stacked_auto,
    pack_partial_auto,
)
from fmsring.layout import ShardPlan
from fmsring.strategy import RingAttentionStrategy

ATTN_NAME = "ring"
# torch >= 2.13 renamed all_gather_into_tensor; the GPU image still has 2.11.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


@dataclass
class RingContext:
    """What one forward pass tells every layer's ring attention op.

    ``bias_blocks[src]`` (prefill with a user mask) is the additive mask of this
    rank's queries against src's keys, or None where that block is fully masked.
    Prefill with a cache allocates buffers of ``capacity`` slots. A decode step
    either has device-side ``write_slot`` and ``kv_lens`` (one token, no mask:
    the static-shape step, which a CUDA graph can replay), or stores the step's
    tokens it owns (``new_slots``) after the ``fill`` valid slots and masks the
    shard with ``decode_bias``.
    """

    strategy: RingAttentionStrategy
    plan: ShardPlan | None = None
    decoding: bool = False
    bias_blocks: list[torch.Tensor | None] | None = None
    fill: int = 0
    capacity: int = 0
    new_slots: slice | list[int] = field(default_factory=lambda: slice(0, 0))
    decode_bias: torch.Tensor | None = None
    write_slot: torch.Tensor | None = None
    kv_lens: torch.Tensor | None = None
    _buffers: list[torch.Tensor] = field(default_factory=list)

    def recv_buffer(self, step: int, like: torch.Tensor, src: int) -> torch.Tensor:
        """One of two receive buffers, allocated on the first layer and reused by all,
        viewed at the shape of src's K/V."""
        assert self.plan is not None
        if not self._buffers:
            numel = like[..., :1, :].numel() * max(self.plan.local_lens)
            self._buffers = [like.new_empty(numel) for _ in range(2)]
        shape = (*like.shape[:3], self.plan.local_len(src), like.shape[-1])
        return self._buffers[step % 2][: torch.Size(shape).numel()].view(shape)


def _scale(query: torch.Tensor, scale_factor: float | None) -> float:
    return scale_factor if scale_factor is not None else query.shape[-1] ** -0.5


def ring_store_op(keys, values, key_cache, value_cache, ring: RingContext, **_):
    """Keep this rank's K/V in preallocated [b, capacity, kvh, d] buffers.

    Prefill allocates them and stores all local tokens, computing on the
    fresh keys. The static decode step writes its one token at ``write_slot``
    on every rank (the owner's next slot; elsewhere a free slot no length
    covers) and computes on the whole buffers; the masked decode step stores
    only the tokens this rank owns and computes on the filled slots.
    """
    if not ring.decoding:
        key_cache, value_cache = allocate_layer(keys, ring.capacity), allocate_layer(values, ring.capacity)
        return keys, values, key_cache, value_cache
    if ring.write_slot is not None:
        key_cache.index_copy_(1, ring.write_slot, keys)
        value_cache.index_copy_(1, ring.write_slot, values)
        return key_cache, value_cache, key_cache, value_cache
    k_new, v_new = keys[:, ring.new_slots], values[:, ring.new_slots]
    end = ring.fill + k_new.shape[1]
    key_cache[:, ring.fill : end].copy_(k_new)
    value_cache[:, ring.fill : end].copy_(v_new)
    return key_cache[:, :end], value_cache[:, :end], key_cache, value_cache


class _Partials:
    """The running (out, lse) of every local query row during one ring prefill.

    A row's first partial is stored as is. When no row gets more than two
    partials (W <= 2), the second is merged straight into the query dtype by
    :func:`merge_pair` -- one fp32 computation, one rounding -- so no fp32
    accumulator is held or streamed through; otherwise an fp32 accumulator
    takes any number of merges.
    """

    def __init__(self, q: torch.Tensor, pairwise: bool):
        self.shape, self.pairwise = q.shape, pairwise
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self.written: list[tuple[int, int]] = []
        if not pairwise:  # rows nothing reaches (masked) must read as "no contribution"
            self.out, self.lse = empty_partial(q)

    def add(self, lo: int, hi: int, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
        fresh = all(hi <= a or lo >= b for a, b in self.written)
        self.written.append((lo, hi))
        whole = lo == 0 and hi == self.shape[2]
        if self.out is None:
            if whole:
                self.out, self.lse = blk_out, blk_lse
                return
            self.out = blk_out.new_empty(self.shape)
            self.lse = blk_lse.new_empty(self.shape[:-1])
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


def ring_prefill_op(query, keys, values, nheads, kvheads, p_dropout, scale_factor, ring: RingContext, **_):
    """Ring attention over the whole sequence; query [b, Lq, h, d], K/V [b, Lk, kvh, d]."""
    plan, strategy = ring.plan, ring.strategy
    assert plan is not None
    scale = _scale(query, scale_factor)
    q = query.transpose(1, 2)
    b, lk, kvh, d = keys.shape
    kv = keys.new_empty(2, b, kvh, lk, d)  # what travels: kv-heads only
    kv[0].copy_(keys.transpose(1, 2))
    kv[1].copy_(values.transpose(1, 2))
    world, rank = strategy.world_size, strategy.rank
    acc = _Partials(q, pairwise=world <= 2 and ring.bias_blocks is None)
    for step in range(world):
        src = (rank - step) % world
        if step + 1 < world:
            incoming = ring.recv_buffer(step, kv, (src - 1) % world)
            strategy.comm.send_recv(kv, incoming)
        if ring.bias_blocks is not None:
            bias = ring.bias_blocks[src]
            if bias is not None:
                acc.add(0, q.shape[2], *attention_with_lse(q, kv[0], kv[1], scale, bias=bias))
        else:
            for c in plan.block_calls(rank, src):
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
    assert acc.out is not None
    return _to_query_layout(acc.out, query)


def _to_query_layout(out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """[b, h, L, d] (any float dtype) -> [b, L, h, d] contiguous in the query's dtype.

    cuDNN writes its output in the query's memory layout, which already is
    [b, L, h, d]: then this is a view, not a copy of the whole output.
    """
    view = out.transpose(1, 2)
    if view.dtype == query.dtype and view.is_contiguous():
        return view
    return torch.empty_like(query).copy_(view)


def ring_decode_op(query, keys, values, nheads, kvheads, p_dropout, scale_factor, ring: RingContext, **_):
    """Attend over this rank's cache shard and merge all shards; query [b, n, h, d],
    K/V [b, slots, kvh, d]. One all-gather per layer, no host sync."""
    strategy = ring.strategy
    q = query.transpose(1, 2)
    scale = _scale(query, scale_factor)
    if ring.kv_lens is not None:
        out, lse = decode_attention_with_lse(q, keys, values, ring.kv_lens, scale)
    elif keys.shape[1]:
        out, lse = attention_with_lse(q, keys.transpose(1, 2), values.transpose(1, 2), scale, bias=ring.decode_bias)
    else:
        out, lse = empty_partial(q)
    if strategy.world_size > 1:
        packed = pack_partial_auto(out, lse)
        stacked = packed.new_empty((strategy.world_size * packed.shape[0], *packed.shape[1:]))
        _all_gather_single(stacked, packed, group=strategy.group)
        stacked = stacked.view(strategy.world_size, *packed.shape)
        out = merge_stacked_auto(stacked[..., :-1], stacked[..., -1], query.dtype)
    return _to_query_layout(out, query)


def _is_prefill(ring: RingContext | None = None, **_) -> bool:
    return ring is None or not ring.decoding


def _validate(input_ids, position_ids, past_key_value_states, ring: RingContext | None = None, **_) -> None:
    if not isinstance(ring, RingContext):
        raise ValueError(
            f"attn_name={ATTN_NAME!r} is driven by fmsring.LlamaRing; build the model with "
            "fmsring.get_model(..., distributed_strategy='ring') instead of passing attn_name yourself"
        )


register_attention_op(
    ATTN_NAME,
    ring_store_op,
    ring_prefill_op,
    is_prefill_op=_is_prefill,
    compute_decode_op=ring_decode_op,
    validate_attn_kwargs_op=_validate,
)
