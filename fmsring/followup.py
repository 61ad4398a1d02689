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
attention compute of a step (:func:`choose_followup`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fmsring.comm import all_to_all
from fmsring.kernels import attention_with_lse, merge_stacked_auto, pack_partial_auto
from fmsring.layout import ShardPlan
from fmsring.ring_attention import Partials, RingBuffers, heads_major, ring_pass_kv, to_query_layout
from fmsring.strategy import RingAttentionStrategy

FOLLOWUP_MODES = ("auto", "pass_kv", "pass_q")
# Attention FLOPs per byte of ring transfer and per byte of memory traffic:
# the rule below only needs these ratios. Defaults from 2x H100 (NVLink):
# cuDNN attention ~620 TFLOP/s, ring shift ~260 GB/s, HBM copy ~3 TB/s
# (docs/performance.md, "Ceilings").
FLOPS_PER_LINK_BYTE = 620e12 / 260e9
LINK_BYTES_PER_HBM_BYTE = 260e9 / 3.0e12


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


def exposed_link_bytes(s: FollowupShape, mode: str) -> float:
    """Bytes of ring traffic per layer that a mode cannot hide under its attention compute.

    Per ring step a rank attends T/W queries over (P+T)/W keys, about
    4 h d (T/W)((P+T)/W) FLOPs, while it sends pass-KV's 2 kvh d (P+T)/W K/V
    elements or pass-Q's h d T/W query elements; whatever takes longer than
    the compute is exposed, W-1 times. pass-KV also packs its shard for
    sending (one read and one write of it in device memory); pass-Q returns
    the fp32 partials of every query but its own rank's in an all-to-all
    that nothing hides.
    """
    w, t, p = s.world_size, s.new_tokens, s.cached_tokens
    compute = 4 * s.heads * s.head_dim * (t / w) * ((p + t) / w) / FLOPS_PER_LINK_BYTE
    if mode == "pass_kv":
        shard = 2 * s.kv_heads * s.head_dim * s.elem_bytes * (p + t) / w
        return (w - 1) * max(0.0, shard - compute) + 2 * shard * LINK_BYTES_PER_HBM_BYTE
    queries = s.heads * s.head_dim * s.elem_bytes * t / w
    partials = (w - 1) / w * t * s.heads * (s.head_dim + 1) * 4
    return (w - 1) * max(0.0, queries - compute) + partials


def choose_followup(s: FollowupShape) -> str:
    """pass-KV or pass-Q: the one with less exposed communication (pass-Q on a tie, as it copies nothing).

    With many new tokens pass-KV's transfers hide under compute and pass-Q
    still pays its all-to-all; with few new tokens on a long cache pass-KV
    ships the whole cache for little compute and pass-Q wins.
    """
    return "pass_kv" if exposed_link_bytes(s, "pass_kv") < exposed_link_bytes(s, "pass_q") else "pass_q"


def ring_pass_q(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: ShardPlan,
    cached: tuple[int, ...],
    strategy: RingAttentionStrategy,
    buffers: RingBuffers,
    scale: float,
) -> torch.Tensor:
    """pass-Q: attention of this rank's queries [b, Lq, h, d] over every rank's
    keys; returns out [b, h, Lq, d] in query's dtype.

    The queries travel the ring token-major (FMS's layout, contiguous); each
    rank attends every rank's queries over its own keys -- the first
    cached[rank] + Lq slots of its [b, capacity, kvh, d] cache, read in place
    -- and keeps one packed fp32 partial per source rank; one all-to-all
    returns them to their owners, which merge them.
    """
    world, rank = strategy.world_size, strategy.rank
    b, _, h, d = query.shape
    n_keys = cached[rank] + plan.local_len(rank)
    keys, values = key_cache[:, :n_keys].transpose(1, 2), value_cache[:, :n_keys].transpose(1, 2)
    t_max = max(plan.local_lens)
    parts = query.new_empty((world, b, h, t_max, d + 1), dtype=torch.float32)
    parts[..., :-1].zero_()
    parts[..., -1].fill_(float("-inf"))  # rows past a rank's share contribute nothing
    q_in = query.contiguous()
    for step in range(world):
        src = (rank - step) % world
        if step + 1 < world:
            nxt = (src - 1) % world
            incoming = buffers.get(step % 2, (b, plan.local_len(nxt), h, d), b * t_max * h * d, q_in)
            strategy.comm.send_recv(q_in, incoming)
        q = q_in.transpose(1, 2)
        acc = Partials(q, pairwise=True)  # per source: the cache and the own causal block at most
        for c in plan.block_calls(src, rank, cached[rank]):
            blk = attention_with_lse(
                q[:, :, c.q_lo : c.q_hi], keys[:, :, c.k_lo : c.k_hi], values[:, :, c.k_lo : c.k_hi], scale, c.causal
            )
            acc.add(c.q_lo, c.q_hi, *blk)
        parts[src, :, :, : q.shape[2]] = pack_partial_auto(*acc.result())
        if step + 1 < world:
            strategy.comm.wait()
            q_in = incoming
    if world > 1:
        parts = all_to_all(parts, strategy.group)
    mine = parts[:, :, :, : query.shape[1]]
    return merge_stacked_auto(mine[..., :-1], mine[..., -1], query.dtype)


@dataclass
class Followup:
    """A follow-up of ``plan.seq_len`` new tokens laid out by ``plan``, after
    ``cached[r]`` tokens in rank r's cache shard; ``mode`` is pass_kv or pass_q."""

    strategy: RingAttentionStrategy
    plan: ShardPlan
    cached: tuple[int, ...]
    mode: str
    buffers: RingBuffers = field(default_factory=RingBuffers)

    def store(self, keys, values, key_cache, value_cache):
        lo = self.cached[self.strategy.rank]
        key_cache[:, lo : lo + keys.shape[1]].copy_(keys)
        value_cache[:, lo : lo + values.shape[1]].copy_(values)
        return key_cache, value_cache, key_cache, value_cache

    def attend(self, query, key_cache, value_cache, scale):
        st = self.strategy
        if self.mode == "pass_q":
            out = ring_pass_q(query, key_cache, value_cache, self.plan, self.cached, st, self.buffers, scale)
        else:
            n = self.cached[st.rank] + self.plan.local_len(st.rank)
            kv = heads_major(key_cache[:, :n], value_cache[:, :n])
            out = ring_pass_kv(query.transpose(1, 2), kv, self.plan, self.cached, st, self.buffers, scale)
        return to_query_layout(out, query)
