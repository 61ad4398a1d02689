"""Steps whose queries every rank computes: fewer new tokens than ranks (too
few to shard), or several with a user mask (padding), on the sharded cache.

Every rank runs the model on all new tokens, stores the ones it owns (placed
on the least-filled ranks) and attends over its shard of the cache; one
all-gather of (out, lse) per layer merges the shards exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fmsring import ssm
from fmsring.cache import RingCache, RingCacheState
from fmsring.comm import RingComm
from fmsring.kernels import attention_with_lse, empty_partial
from fmsring.masks import additive, mask_at_slots
from fmsring.merge import merge_pair_auto
from fmsring.modes import Call, Ring
from fmsring.ring import merge_shards
from fmsring.windows import LayerAttention


@dataclass
class ReplicatedStep:
    """Each rank stores the new tokens it owns (``owned``, after its ``fill``
    valid slots) and attends over its slots in ``blocks``: (first slot, end
    slot, additive bias or None). Without a mask that is the old slots
    unmasked -- every cached token precedes every new one -- and the owned
    new slots with a causal bias of n x owned; with one, every slot under the
    user's mask. A model with windowed layers also gets ``seq_index``: the
    sequence indices of the new tokens and of this rank's slots, so each
    windowed layer masks the slots behind its window; rank 0 merges the
    layer's sink into its partial."""

    comm: RingComm
    fill: int
    owned: slice | list[int]
    blocks: list[tuple[int, int, torch.Tensor | None]]
    seq_index: tuple[torch.Tensor, torch.Tensor] | None = None
    windowed: dict[int, list[tuple[int, int, torch.Tensor | None]]] = field(default_factory=dict)  # per window

    def store(self, keys, values, key_cache, value_cache):
        k_new, v_new = keys[:, self.owned], values[:, self.owned]
        end = self.fill + k_new.shape[1]
        key_cache[:, self.fill : end].copy_(k_new)
        value_cache[:, self.fill : end].copy_(v_new)
        return key_cache, value_cache, key_cache, value_cache

    def attend(self, query, key_cache, value_cache, scale, layer):
        q = query.transpose(1, 2)
        parts = [
            attention_with_lse(
                q, key_cache[:, lo:hi].transpose(1, 2), value_cache[:, lo:hi].transpose(1, 2), scale, bias=bias
            )
            for lo, hi, bias in self._blocks(layer)
            if hi > lo
        ]
        if not parts:
            out, lse = empty_partial(q)
        elif len(parts) == 1:
            out, lse = parts[0]
        else:
            out, lse = merge_pair_auto(*parts[0], *parts[1])
        if self.comm.rank == 0:
            out, lse = layer.add_sink(out, lse)
        return merge_shards(out, lse, query, self.comm)

    def _blocks(self, layer: LayerAttention) -> list[tuple[int, int, torch.Tensor | None]]:
        """:attr:`blocks` with ``layer``'s window added to their biases, made once per window."""
        if not layer.window:
            return self.blocks
        if self.seq_index is None:
            raise RuntimeError("a layer passed a sliding window that the model's blocks did not declare")
        if layer.window not in self.windowed:
            queries, slots = self.seq_index
            out = []
            for lo, hi, bias in self.blocks:
                behind = layer.bias(queries, slots[lo:hi])
                out.append((lo, hi, behind if bias is None else bias + behind))
            self.windowed[layer.window] = out
        return self.windowed[layer.window]


def blocks(
    call: Call, state: RingCacheState, new_state: RingCacheState, rank: int
) -> list[tuple[int, int, torch.Tensor | None]]:
    """The slot blocks this rank attends (see :class:`ReplicatedStep`)."""
    x, n = call.ids, call.ids.shape[1]
    fill, end = state.fills[rank], new_state.fills[rank]
    if call.mask is not None:
        return [(0, end, mask_at_slots(call.mask, n, new_state))]
    # cached tokens all precede the new ones; among the owned new ones, causal by global index
    query_index = torch.arange(state.seq_len, state.seq_len + n, device=x.device)
    owned_index = new_state.slot_index_on(x.device, fill)
    causal = additive((owned_index.unsqueeze(0) <= query_index.unsqueeze(1)).unsqueeze(0))
    return [(0, fill, None), (fill, end, causal)]


def step(ring: Ring, call: Call, cache: RingCache) -> tuple[torch.Tensor, RingCache]:
    """The step's logits and the cache holding its tokens."""
    st, state = ring.strategy, cache.state
    owners = state.place(call.ids.shape[1])
    positions, top = ring.rope.positions(call.ids, call.position_ids, state.seq_len, state.max_position)
    new_cache = cache.advance(st.rank, owners, ring.cache_headroom, max(state.max_position, top))
    seq_index = None
    if ring.windows():
        queries = torch.arange(state.seq_len, state.seq_len + call.ids.shape[1], device=call.ids.device)
        seq_index = (queries, new_cache.state.slot_index_on(call.ids.device))
    ctx = ReplicatedStep(
        st.comm,
        state.fills[st.rank],
        RingCacheState.owned(owners, st.rank),
        blocks(call, state, new_cache.state, st.rank),
        seq_index,
    )
    with ssm.sharded(ssm.ShardedScan.whole(call.ids.shape[1])):  # Mamba2 layers: every token, on every rank
        logits, _ = ring.run(call.ids, positions, list(new_cache), True, call.last_n_tokens, ctx)
    return logits, new_cache
