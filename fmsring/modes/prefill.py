"""Ring prefill: a prompt sharded over the ranks by the layout.

Each rank runs embeddings, MLPs and norms on its 1/W of the tokens; attention
passes every rank's K/V around the ring (:func:`fmsring.ring.pass_kv`),
causal by the layout's block calls: within each sequence's segments where the
user's mask is a padded batch's (:mod:`fmsring.segments`), or under any other
mask cut into one block per source rank. With a cache, each layer's K/V go into new buffers
sized for the prompt plus headroom. A long prompt can be prefilled in chunks
(:func:`chunked`): a prefill of the first chunk, follow-ups of the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from fmsring import ssm
from fmsring.allocator import warn_if_fragmented
from fmsring.cache import RingCache, allocate_layer, empty_capacity, prefill_capacity
from fmsring.comm import RingComm, sync_rng
from fmsring.layout import ShardPlan
from fmsring.masks import query_rows
from fmsring.modes import Call, Ring, followup, replicated, run_sharded
from fmsring.ring import RingBuffers, heads_major, pass_kv, to_query_layout
from fmsring.segments import Segments


@dataclass
class Prefill:
    """Every rank holds its tokens of ``plan``; with a cache, each layer's K/V
    go into new buffers of ``capacity`` slots."""

    comm: RingComm
    plan: ShardPlan
    capacity: int
    bias_blocks: list[torch.Tensor | None] | None = None
    segments: Segments | None = None
    buffers: RingBuffers = field(default_factory=RingBuffers)
    bands: dict = field(default_factory=dict)  # window layers' tiles, cut once per forward (windows.band)

    def store(self, keys, values, key_cache, value_cache):
        return keys, values, allocate_layer(keys, self.capacity), allocate_layer(values, self.capacity)

    @cached_property
    def seq_index(self) -> list[torch.Tensor]:
        """Each rank's tokens' sequence indices (host), for windowed layers and segments; made once per forward."""
        return [self.plan.index_tensor(r) for r in range(self.plan.world_size)]

    def attend(self, query, keys, values, scale, layer):
        kv = heads_major(keys, values)
        zeros = (0,) * self.comm.world_size
        index = self.seq_index if layer.window or self.segments else None
        q = query.transpose(1, 2)
        out = pass_kv(
            q, kv, self.plan, zeros, self.comm, self.buffers, scale, layer, self.bias_blocks, index, self.segments,
            self.bands,
        )  # fmt: skip
        return to_query_layout(out, query)


def bias_blocks(mask: torch.Tensor, plan: ShardPlan, rank: int) -> list[torch.Tensor | None]:
    """This rank's rows of the user's mask, cut into one additive block per source rank.

    Blocks that hide every key are None, so the ring skips their compute.
    """
    local = plan.index_tensor(rank, mask.device)
    rows = query_rows(mask, plan.seq_len).index_select(1, local)
    blocks: list[torch.Tensor | None] = []
    for src in range(plan.world_size):
        blk = rows.index_select(2, plan.index_tensor(src, mask.device))
        blocks.append(blk if bool((blk > float("-inf")).any()) else None)
    return blocks


def prefill(ring: Ring, call: Call, use_cache: bool, capacity: int = 0):
    """A ring prefill: its logits, and with ``use_cache`` the cache of ``capacity`` slots per rank
    (default: the prompt plus headroom).

    A prompt shorter than the world size cannot be sharded: it runs as a
    replicated step on an empty cache.
    """
    st, x = ring.strategy, call.ids
    if x.shape[1] < st.world_size:
        sync_rng(st.model_groups, x.device)
        attn = ring.attn
        like = next(ring.parameters())
        capacity = capacity or empty_capacity(x.shape[1], ring.cache_headroom)
        shape = (x.shape[0], capacity, attn.kvheads, attn.emb_kq_per_head)
        states = ring.zero_states(x.shape[0])
        cache = RingCache.empty(ring.n_layers, like, shape, attn.emb_v_per_head, st.world_size, states)
        logits, cache = replicated.step(ring, call, cache)
        return (logits, cache) if use_cache else logits
    plan = st.plan(x.shape[1])
    positions, top = ring.rope.positions(x, call.position_ids, 0)
    sync_rng(st.model_groups, x.device)  # every generate() step after a prefill samples alike on all ranks
    capacity = capacity or prefill_capacity(plan.local_lens, ring.cache_headroom)
    # a padded batch's mask runs as segments on the fast kernels; any other mask (or one beside a
    # window, which the segments do not cut) as additive blocks
    segments = Segments.of(call.mask) if call.mask is not None and not ring.windows() else None
    blocks = bias_blocks(call.mask, plan, st.rank) if call.mask is not None and segments is None else None
    ctx = Prefill(st.comm, plan, capacity, blocks, segments)
    with ssm.sharded(ssm.ShardedScan(plan, st.rank, st.group)):  # Mamba2 layers, where the model has them
        logits, layers = run_sharded(ring, call, positions, plan, None, use_cache, ctx)
    warn_if_fragmented(x.device)  # once per prompt, on the host: the allocator's own counters
    if not use_cache:
        return logits
    return logits, RingCache.prefilled(layers, plan, st.rank, capacity, top)


def chunked(ring: followup.FollowupRing, call: Call, chunk: int, use_cache: bool):
    """The prompt prefilled as a ring prefill of its first ``chunk`` tokens and
    follow-ups of the next ones, so activations scale with the chunk and only
    the cache with the prompt. The cache is sized for the whole prompt up
    front: it never grows on the way."""
    st, x, n = ring.strategy, call.ids, call.ids.shape[1]
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if bounds[-1][1] - bounds[-1][0] < st.world_size:  # too short to shard: joins the chunk before
        bounds[-2:] = [(bounds[-2][0], n)]
    fills = [sum(col) for col in zip(*(st.plan(e - s).local_lens for s, e in bounds))]
    capacity = prefill_capacity(fills, ring.cache_headroom)
    top = n - 1 if call.position_ids is None else int(call.position_ids.max())
    ring.rope.fit(top, x.device)  # once, not per chunk
    n_out = n if call.last_n_tokens <= 0 else min(call.last_n_tokens, n)
    pieces, cache = [], None
    for s, e in bounds:
        wanted = max(0, e - max(s, n - n_out))  # this chunk's tokens among the last n_out
        part = call.part(s, e, wanted or 1)
        if cache is None:
            logits, cache = prefill(ring, part, True, capacity)
        else:
            logits, cache = followup.step(ring, part, cache)
        if wanted:
            pieces.append(logits)
    logits = torch.cat(pieces, dim=1)
    return (logits, cache) if use_cache else logits
