"""Follow-ups on the sharded cache: T new tokens after P cached ones.

A follow-up (the next turn of a conversation, the next chunk of a chunked
prefill) is sharded like a prefill: its T tokens are laid out over the ranks
by the model's layout, every rank runs embeddings, norms and linears on its
share only, and their K/V join the rank's cache shard. Every cached token
precedes every new one, so new queries see the whole cache unmasked and the
new tokens causally among themselves: no dense mask anywhere, only the
kernels' causal flag and block offsets.

Two exact ring variants (Yang et al., "Context Parallelism for Scalable
Million-Token Inference", arXiv 2411.01783):

* **pass-KV**: each rank's K/V (cache shard and new tokens) travels the
  ring, as in a prefill. It moves (P+T)/W tokens of K and V per step.
* **pass-Q**: the new queries travel instead; each rank attends them over
  its own K/V, and the partial (out, lse) go back to the queries' owners in
  one all-to-all and merge there. It moves T/W queries per step, plus the
  partials once.

Which is faster depends on whether pass-KV's larger messages hide under the
attention compute of a step, at the rates measured on the device
(:func:`choose_followup`).

A short follow-up on one rank runs each decoder layer as one compiled graph
(:func:`compiles_whole`), as the decode step does: its kernels are few and
short, so run module by module its time is the host's launching them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from fmsring import ssm
from fmsring.cache import RingCache
from fmsring.comm import RingComm, all_to_all
from fmsring.layout import BlockCall, ShardPlan
from fmsring.merge import merge_stacked_auto, pack_partial_auto
from fmsring.modes import Call, Ring, run_sharded
from fmsring.rates import Rates
from fmsring.ring import Partials, RingBuffers, heads_major, pass_kv, ring_blocks, to_query_layout
from fmsring.windows import LayerAttention, windowed_blocks

FOLLOWUP_MODES = ("auto", "pass_kv", "pass_q")
WHOLE_LAYER_TOKENS = 2048  # the longest follow-up whose decoder layers each compile whole


@dataclass(frozen=True)
class FollowupShape:
    """What the choice depends on: the step and the attention's shape."""

    new_tokens: int
    cached_tokens: int
    world_size: int
    heads: int
    kv_heads: int
    head_dim: int
    elem_bytes: int


def exposed_link_bytes(s: FollowupShape, mode: str, rates: Rates) -> float:
    """Bytes of ring traffic per layer that a mode cannot hide under its attention compute.

    Per ring step a rank attends T/W queries over (P+T)/W keys, about
    4 h d (T/W)((P+T)/W) FLOPs, while it sends pass-KV's 2 kvh d (P+T)/W K/V
    elements or pass-Q's h d T/W query elements; whatever takes longer than
    the compute is exposed, W-1 times. pass-KV also packs its shard for
    sending (one read and one write of it in device memory); pass-Q returns
    the fp32 partials of every query but its own rank's in an all-to-all
    that nothing hides. ``rates`` turn FLOPs and device-memory bytes into
    link bytes of the same time.
    """
    w, t, p = s.world_size, s.new_tokens, s.cached_tokens
    if w == 1:  # nothing travels; pass-KV would still pack its shard
        return 2.0 * s.kv_heads * s.head_dim * s.elem_bytes * (p + t) if mode == "pass_kv" else 0.0
    assert rates.link_gbps is not None, "the rule needs the ring's link rate"
    flops_per_link_byte = rates.attention_tflops * 1e12 / (rates.link_gbps * 1e9)
    compute = 4 * s.heads * s.head_dim * (t / w) * ((p + t) / w) / flops_per_link_byte
    if mode == "pass_kv":
        shard = 2 * s.kv_heads * s.head_dim * s.elem_bytes * (p + t) / w
        return (w - 1) * max(0.0, shard - compute) + 2 * shard * rates.link_gbps / rates.memory_gbps
    queries = s.heads * s.head_dim * s.elem_bytes * t / w
    partials = (w - 1) / w * t * s.heads * (s.head_dim + 1) * 4
    return (w - 1) * max(0.0, queries - compute) + partials


def choose_followup(s: FollowupShape, rates: Rates | None) -> str:
    """pass-KV or pass-Q: the one with less exposed communication (pass-Q on a tie, as it copies
    nothing). ``rates`` may be None on one rank, where nothing travels.

    With many new tokens pass-KV's transfers hide under compute and pass-Q
    still pays its all-to-all; with few new tokens on a long cache pass-KV
    ships the whole cache for little compute and pass-Q wins.
    """
    if s.world_size == 1:
        return "pass_q"
    assert rates is not None
    kv, q = exposed_link_bytes(s, "pass_kv", rates), exposed_link_bytes(s, "pass_q", rates)
    return "pass_kv" if kv < q else "pass_q"


def pass_q(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: ShardPlan,
    cached: tuple[int, ...],
    comm: RingComm,
    buffers: RingBuffers,
    scale: float,
    layer: LayerAttention,
    calls: tuple[tuple[BlockCall, ...], ...],
    seq_index: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """pass-Q: attention of this rank's queries [b, Lq, h, d] over every rank's
    keys; returns out [b, h, Lq, d] in query's dtype.

    The queries travel the ring token-major (FMS's layout, contiguous); each
    rank attends every rank's queries over its own keys -- the first
    cached[rank] + Lq slots of its [b, capacity, kvh, d] cache, read in place
    -- and keeps one packed fp32 partial per source rank; one all-to-all
    returns them to their owners, which merge them. ``layer``'s sink joins a
    query's own rank's partial; its window needs ``seq_index``: the cache's
    sequence length before this follow-up and this rank's slots' sequence
    indices (host), which only this rank knows -- why a windowed layer's
    follow-up runs pass-Q. ``calls[src]``: the kernel calls of src's queries
    over this rank's keys (:meth:`fmsring.layout.ShardPlan.block_calls`).
    """
    rank = comm.rank
    b, _, h, d = query.shape
    n_keys = cached[rank] + plan.local_len(rank)
    keys, values = key_cache[:, :n_keys].transpose(1, 2), value_cache[:, :n_keys].transpose(1, 2)
    t_max = max(plan.local_lens)
    parts = None  # one rank: its own partial is the result, with nothing to pack, exchange or merge
    if comm.world_size > 1:
        parts = query.new_empty((comm.world_size, b, h, t_max, d + 1), dtype=torch.float32)
        parts[..., :-1].zero_()
        parts[..., -1].fill_(float("-inf"))  # rows past a rank's share contribute nothing
    shape_from = lambda src: (b, plan.local_len(src), h, d)  # noqa: E731
    start, k_index = seq_index if layer.window else (0, None)
    for src, q_in in ring_blocks(comm, query.contiguous(), buffers, shape_from, b * t_max * h * d):
        q = q_in.transpose(1, 2)
        acc = Partials(q, pairwise=not layer.window)  # the cache and the own causal block, or a window's pieces
        q_index = start + plan.index_tensor(src) if layer.window else None
        for c, blk in windowed_blocks(q, keys, values, scale, calls[src], layer, q_index, k_index):
            acc.add(c.q_lo, c.q_hi, *blk)
        out, lse = layer.add_sink(*acc.result()) if src == rank else acc.result()
        if parts is None:
            return out.to(query.dtype)
        parts[src, :, :, : q.shape[2]] = pack_partial_auto(out, lse)
    assert parts is not None
    parts = all_to_all(parts, comm.group)
    mine = parts[:, :, :, : query.shape[1]]
    return merge_stacked_auto(mine[..., :-1], mine[..., -1], query.dtype)


@dataclass
class Followup:
    """A follow-up of ``plan.seq_len`` new tokens laid out by ``plan``, after
    ``cached[r]`` tokens in rank r's cache shard; ``mode`` is pass_kv or pass_q
    (always pass_q for a layer with a window: ``seq_index`` is the cache's length
    before the follow-up and this rank's slots' sequence indices after it)."""

    comm: RingComm
    plan: ShardPlan
    cached: tuple[int, ...]
    mode: str
    seq_index: tuple[int, torch.Tensor]
    whole_layer: bool = False  # each decoder layer one compiled graph (compiles_whole)
    buffers: RingBuffers = field(default_factory=RingBuffers)
    # pass-Q's kernel calls per source rank, worked out once for every layer: a plan's own
    # memo of them is a dict that a compiled layer would guard on, key by key
    calls: tuple[tuple[BlockCall, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        rank = self.comm.rank
        self.calls = tuple(self.plan.block_calls(src, rank, self.cached[rank]) for src in range(self.comm.world_size))

    def store(self, keys, values, key_cache, value_cache):
        lo = self.cached[self.comm.rank]
        key_cache[:, lo : lo + keys.shape[1]].copy_(keys)
        value_cache[:, lo : lo + values.shape[1]].copy_(values)
        return key_cache, value_cache, key_cache, value_cache

    def attend(self, query, key_cache, value_cache, scale, layer):
        plan, cached, comm, buffers = self.plan, self.cached, self.comm, self.buffers
        if self.mode == "pass_q" or layer.window:
            out = pass_q(query, key_cache, value_cache, plan, cached, comm, buffers, scale, layer, self.calls,
                         self.seq_index)  # fmt: skip
        else:
            n = cached[comm.rank] + plan.local_len(comm.rank)
            kv = heads_major(key_cache[:, :n], value_cache[:, :n])
            out = pass_kv(query.transpose(1, 2), kv, plan, cached, comm, buffers, scale, layer)
        return to_query_layout(out, query)


class FollowupRing(Ring, Protocol):
    """What a follow-up needs of the model beyond :class:`fmsring.modes.Ring`."""

    followup: str  # one of FOLLOWUP_MODES

    def rates(self, dtype: torch.dtype) -> Rates:
        """The device's rates, the same on every rank (measured once)."""
        ...


def mode_for(ring: FollowupRing, n_new: int, cache: RingCache) -> str:
    """The configured mode, or the rule's choice for ``auto``."""
    if ring.followup != "auto":
        return ring.followup
    st, attn, kv = ring.strategy, ring.attn, cache.first_keys
    shape = FollowupShape(
        new_tokens=n_new,
        cached_tokens=cache.state.seq_len,
        world_size=st.world_size,
        heads=attn.nheads,
        kv_heads=attn.kvheads,
        head_dim=attn.emb_kq_per_head,
        elem_bytes=kv.element_size(),
    )
    return choose_followup(shape, ring.rates(kv.dtype) if st.world_size > 1 else None)


def compiles_whole(ring: Ring, n_new: int, mode: str) -> bool:
    """Whether a follow-up of ``n_new`` tokens in ``mode`` runs each decoder layer as one compiled
    graph (:class:`fmsring.fusion.FusedDecoderBlock`, where the model has it): a short pass-Q one
    on one rank of a model of full attention layers only.

    Module by module, a layer costs the host about the same at any length, and a few hundred
    tokens' kernels finish sooner: compiled whole, a layer is a few launches. Longer follow-ups'
    kernels outlast the host anyway. One rank in pass-Q (what the rule picks there): its
    attention is its own partial, with no exchange to break the graph. Full attention only: a
    window reads its slots' indices on the host, and a Mamba2 layer goes on from a state the
    sharded scan hands it. The first follow-up compiles its shapes; after that, a shape that
    changes for the first time compiles once more with it dynamic (dynamo's automatic dynamic
    shapes): the cached length (at the next follow-up), the new tokens' count, the capacity of a
    cache that grows; and a cache a follow-up fills to its last slot once more (the compiler tells
    a full cache from one with room). So five graphs at most, however long the conversation.
    """
    return (
        n_new <= WHOLE_LAYER_TOKENS
        and mode == "pass_q"
        and ring.strategy.world_size == 1
        and not ring.windows()
        and not ring.recurrent
    )


def step(ring: FollowupRing, call: Call, cache: RingCache) -> tuple[torch.Tensor, RingCache]:
    """The follow-up's logits and the cache holding its tokens."""
    st, state, x = ring.strategy, cache.state, call.ids
    plan = st.plan(x.shape[1])
    new_indices = [[state.seq_len + i for i in plan.indices(r)] for r in range(st.world_size)]
    mode = mode_for(ring, x.shape[1], cache)
    positions, top = ring.rope.positions(x, call.position_ids, state.seq_len, state.max_position)
    new_cache = cache.extend(st.rank, new_indices, ring.cache_headroom, max(state.max_position, top))
    seq_index = (state.seq_len, new_cache.state.slot_index)
    ctx = Followup(st.comm, plan, state.fills, mode, seq_index, compiles_whole(ring, x.shape[1], mode))
    with ssm.sharded(ssm.ShardedScan(plan, st.rank, st.group)):  # Mamba2 layers go on from the cache's state
        logits, _ = run_sharded(ring, call, positions, plan, list(new_cache), True, ctx)
    return logits, new_cache
