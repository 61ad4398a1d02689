"""The static one-token decode step: every rank holds the token's query,
attends over its shard of the cache, and one all-gather of (out, lse) per
layer merges the shards exactly.

What changes per step lives in device tensors (:class:`StepInputs`) and
every shape is fixed by the cache's capacity, so the step is captured once
as a CUDA graph (:mod:`fmsring.decode_graph`) and replayed, with no host
sync; a padding mask rides along as a bias per cache slot.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from fmsring.cache import RingCache
from fmsring.comm import RingComm
from fmsring.decode_graph import DecodeGraphs, StepInputs
from fmsring.kernels import decode_attention_with_lse, decode_split_kv
from fmsring.masks import decode_bias
from fmsring.modes import Call, Ring
from fmsring.ring import merge_shards
from fmsring.split_kv import SplitKV
from fmsring.windows import LayerAttention


@dataclass
class DecodeStep:
    """Every rank writes the token's K/V at ``write_slot`` (the owner's next
    slot; elsewhere a free slot that no length covers) and attends over its
    first ``kv_lens`` slots, plus ``slot_bias`` [b, capacity] where the step
    has a padding mask (the user's mask read at each slot's token; the columns
    past ``kv_lens``, which nothing reads, unwritten: :func:`fmsring.masks.decode_bias`).
    ``split_kv`` is the split-KV plan every layer's attention shares (None:
    the masked cache through :func:`fmsring.kernels.attention_with_lse`). A
    model with windowed layers also gets ``slot_index`` [capacity] and
    ``query_index`` [1], the sequence indices of this rank's slots and of the
    new token, from which ``windows`` holds each window's bias and plan
    (:meth:`through`), so a windowed layer reads only the slots its window
    shows; rank 0 merges the layer's sink into its partial.

    With no Python branch on data and static shapes, a decoder layer running
    this step can also be compiled whole (``whole_layer``:
    :class:`fmsring.fusion.FusedDecoderBlock`)."""

    whole_layer: ClassVar[bool] = True
    comm: RingComm
    write_slot: torch.Tensor
    kv_lens: torch.Tensor
    split_kv: SplitKV | None = None
    slot_bias: torch.Tensor | None = None
    slot_index: torch.Tensor | None = None
    query_index: torch.Tensor | None = None
    windows: dict[int, tuple[torch.Tensor, SplitKV | None]] = field(default_factory=dict)

    def through(self, window: int) -> tuple[torch.Tensor, SplitKV | None]:
        """A window's slot bias [b, capacity] (the padding's, plus -inf behind the window) and its
        split-KV plan. A shard keeps its slots in sequence order, so the window shows the fill's
        last slots: the plan starts after the hidden ones instead of masking the whole shard."""
        if self.slot_index is None or self.query_index is None:
            raise RuntimeError("a layer passed a sliding window that the model's blocks did not declare")
        behind = LayerAttention(window=window).bias(self.query_index, self.slot_index)[0]
        behind = behind.expand(self.kv_lens.shape[0], -1)
        bias = behind if self.slot_bias is None else self.slot_bias + behind
        if self.split_kv is None:
            return bias, None
        filled = torch.arange(behind.shape[1], device=behind.device) < self.kv_lens.unsqueeze(1)
        return bias, self.split_kv.from_slot(self.kv_lens, (behind.isinf() & filled).sum(1))

    def store(self, keys, values, key_cache, value_cache):
        # an indexed assignment (index_put_), which the compiler writes in place into the cache
        key_cache[:, self.write_slot] = keys
        value_cache[:, self.write_slot] = values
        return key_cache, value_cache, key_cache, value_cache

    def attend(self, query, key_cache, value_cache, scale, layer):
        bias, plan = self.slot_bias, self.split_kv
        if layer.window:  # made once per step for the model's windows (step); here for any other
            bias, plan = self.windows.get(layer.window) or self.through(layer.window)
        # where nothing merges after this rank's partial, it comes out in the query's dtype at once
        alone = self.comm.world_size == 1 and layer.sinks is None
        out, lse = decode_attention_with_lse(
            query.transpose(1, 2), key_cache, value_cache, self.kv_lens, scale, plan, bias,
            query.dtype if alone else torch.float32,
        )  # fmt: skip
        if self.comm.rank == 0:
            out, lse = layer.add_sink(out, lse)
        return merge_shards(out, lse, query, self.comm)


class DecodeRing(Ring, Protocol):
    """What the decode step needs of the model beyond :class:`fmsring.modes.Ring`."""

    cuda_graphs: bool
    graphs: DecodeGraphs


def step(ring: DecodeRing, call: Call, cache: RingCache) -> tuple[torch.Tensor, RingCache]:
    """One token on ``cache``: its logits and the cache holding it; captured as a CUDA graph where possible."""
    st, state, x = ring.strategy, cache.state, call.ids
    if call.position_ids is None:  # the new token of every sequence sits at the cache's length
        positions = top = state.seq_len
        ring.rope.fit(top, x.device)
    else:
        positions, top = ring.rope.positions(x, call.position_ids, state.seq_len, state.max_position)
    new_cache = cache.advance(st.rank, state.place(1), ring.cache_headroom, max(state.max_position, top))
    new_state = new_cache.state
    slot_bias = None if call.mask is None else decode_bias(call.mask, new_state)
    slot_index = query_index = None
    windows = ring.windows()
    if windows:
        slot_index = torch.zeros(new_state.capacity, dtype=torch.long, device=x.device)
        slot_index[: new_state.fills[st.rank]] = new_state.slot_index_on(x.device)
        query_index = state.seq_len
    inputs = StepInputs(
        ids=x,
        positions=positions,
        write_slot=state.fills[st.rank],
        kv_lens=new_state.fills[st.rank],
        slot_bias=slot_bias,
        slot_index=slot_index,
        query_index=query_index,
    )
    layers = list(new_cache)

    def run(inp: StepInputs) -> torch.Tensor:
        split = decode_split_kv(inp.kv_lens, new_cache.first_keys)  # once per step, not per layer
        ctx = DecodeStep(st.comm, inp.write_slot, inp.kv_lens, split, inp.slot_bias, inp.slot_index, inp.query_index)
        ctx.windows = {w: ctx.through(w) for w in windows}  # once per step and window, not per layer
        return ring.run(inp.ids, inp.positions, layers, True, call.last_n_tokens, ctx)[0]

    if ring.cuda_graphs and x.is_cuda:
        return ring.graphs.run(graph_key(ring, call, new_cache), inputs, run), new_cache
    return run(inputs.materialized()), new_cache


def graph_key(ring: Ring, call: Call, cache: RingCache) -> Hashable:
    """What a captured step is valid for: the addresses and shapes baked into the graph (the batch,
    the logits kept, the cache buffers, the RoPE tables) and whether a slot bias is read."""
    state = cache.state
    rope = ring.rope.sizes(call.ids.device)
    return (call.ids.shape[0], call.last_n_tokens, state.cache_id, state.capacity, rope, call.mask is not None)
