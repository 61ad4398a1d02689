"""Steps whose queries every rank holds: one-token decode, and short or masked
steps on the sharded cache.

The new tokens' queries are replicated; every rank attends over its shard of
the cache, and one all-gather of (out, lse) per layer merges the shards
exactly. No host sync: what changes per step lives in device tensors or in
shapes every rank agrees on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from fmsring.kernels import (
    SplitKV,
    attention_with_lse,
    decode_attention_with_lse,
    empty_partial,
    merge_pair_auto,
    merge_stacked_auto,
    pack_partial_auto,
)
from fmsring.ring_attention import to_query_layout
from fmsring.strategy import RingAttentionStrategy

# torch >= 2.13 renamed all_gather_into_tensor; the GPU image still has 2.11.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def merge_shards(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, strategy: RingAttentionStrategy):
    """Every rank's partial (out [b, h, n, d], lse) merged on every rank, [b, n, h, d] in query's dtype.

    Every rank merges the same stack in the same order, so all ranks get
    bit-identical results.
    """
    if strategy.world_size > 1:
        packed = pack_partial_auto(out, lse)
        stacked = packed.new_empty((strategy.world_size * packed.shape[0], *packed.shape[1:]))
        _all_gather_single(stacked, packed, group=strategy.group)
        stacked = stacked.view(strategy.world_size, *packed.shape)
        out = merge_stacked_auto(stacked[..., :-1], stacked[..., -1], query.dtype)
    return to_query_layout(out, query)


@dataclass
class DecodeStep:
    """The static one-token step: every rank writes the token's K/V at
    ``write_slot`` (the owner's next slot; elsewhere a free slot that no
    length covers) and attends over its first ``kv_lens`` slots, plus
    ``slot_bias`` [b, capacity] where the step has a padding mask (the
    user's mask read at each slot's token). All are device tensors and every
    shape is fixed by the cache's capacity, so the step can be captured once
    as a CUDA graph and replayed. ``split_kv`` is the split-KV plan every
    layer's attention shares (None: fp32 math).

    With no Python branch on data and static shapes, a decoder layer running
    this step can also be compiled whole (``whole_layer``:
    :class:`fmsring.fusion.FusedDecoderBlock`)."""

    whole_layer: ClassVar[bool] = True
    strategy: RingAttentionStrategy
    write_slot: torch.Tensor
    kv_lens: torch.Tensor
    split_kv: SplitKV | None = None
    slot_bias: torch.Tensor | None = None

    def store(self, keys, values, key_cache, value_cache):
        # an indexed assignment (index_put_), which the compiler writes in place into the cache
        key_cache[:, self.write_slot] = keys
        value_cache[:, self.write_slot] = values
        return key_cache, value_cache, key_cache, value_cache

    def attend(self, query, key_cache, value_cache, scale):
        out, lse = decode_attention_with_lse(
            query.transpose(1, 2), key_cache, value_cache, self.kv_lens, scale, self.split_kv, self.slot_bias
        )
        return merge_shards(out, lse, query, self.strategy)


@dataclass
class ReplicatedStep:
    """A step of n new tokens that every rank computes: fewer tokens than ranks
    (too few to shard), or several with a user mask (padding). Each rank
    stores the new tokens it owns (``owned``, after its ``fill`` valid
    slots) and attends over its slots in ``blocks``: (first slot, end slot,
    additive bias or None). Without a mask that is the old slots unmasked --
    every cached token precedes every new one -- and the owned new slots
    with a causal bias of n x owned; with one, every slot under the user's
    mask."""

    strategy: RingAttentionStrategy
    fill: int
    owned: slice | list[int]
    blocks: list[tuple[int, int, torch.Tensor | None]]

    def store(self, keys, values, key_cache, value_cache):
        k_new, v_new = keys[:, self.owned], values[:, self.owned]
        end = self.fill + k_new.shape[1]
        key_cache[:, self.fill : end].copy_(k_new)
        value_cache[:, self.fill : end].copy_(v_new)
        return key_cache, value_cache, key_cache, value_cache

    def attend(self, query, key_cache, value_cache, scale):
        q = query.transpose(1, 2)
        parts = [
            attention_with_lse(
                q, key_cache[:, lo:hi].transpose(1, 2), value_cache[:, lo:hi].transpose(1, 2), scale, bias=bias
            )
            for lo, hi, bias in self.blocks
            if hi > lo
        ]
        if not parts:
            out, lse = empty_partial(q)
        elif len(parts) == 1:
            out, lse = parts[0]
        else:
            out, lse = merge_pair_auto(*parts[0], *parts[1])
        return merge_shards(out, lse, query, self.strategy)
