"""LlamaRing: an FMS causal LM run with ring attention.

Every rank passes the same full ``input_ids``; LlamaRing feeds the model only
this rank's tokens (with their global positions), so embeddings, MLPs and
norms run on 1/W of the sequence, attention goes through the ``"ring"`` op,
and only the logits the caller asked for are computed and gathered.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from fms.modules.attention import MultiHeadAttention, TPMultiHeadAttention
from fms.modules.feedforward import FeedForwardBlock, GatedLinearUnit
from fms.modules.positions import RotaryEmbedding
from torch import nn

from fmsring import ring_attention  # importing it registers the "ring" attention op with FMS
from fmsring.allocator import warn_if_fragmented
from fmsring.cache import RingCache, RingCacheState, capacity_for, new_cache_id
from fmsring.comm import all_gather_padded, check_same_on_all_ranks, sync_rng
from fmsring.decode import DecodeStep, ReplicatedStep
from fmsring.decode_graph import DecodeGraphs, StepInputs
from fmsring.followup import FOLLOWUP_MODES, Followup, FollowupShape, choose_followup
from fmsring.fusion import fuse_decoder_blocks, fuse_elementwise, position_encoders
from fmsring.kernels import decode_split_kv
from fmsring.layout import ShardPlan
from fmsring.strategy import RingAttentionStrategy

# RoPE variants whose angle at a position does not depend on the table's size,
# so the table can be regrown exactly for longer prompts.
_GROWABLE_ROPE = ("regular", "llama3", "yarn")


class ChunkedFeedForward(nn.Module):
    """Mixin for FMS feed-forward modules: run the sequence in chunks of
    ``ffn_chunk`` tokens, so the MLP's wide intermediate activations do not
    grow with the prompt. Exact: the MLP is per token.

    Applied by swapping the module's class (as FSDP2's ``fully_shard`` does),
    so parameters and state-dict keys stay FMS's own.
    """

    ffn_chunk: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] <= self.ffn_chunk:
            return super().forward(x)
        out = torch.empty_like(x)
        for start in range(0, x.shape[1], self.ffn_chunk):
            stop = start + self.ffn_chunk
            out[:, start:stop] = super().forward(x[:, start:stop])
        return out


_CHUNKED: dict[type, type] = {}


def chunk_feedforward(model: nn.Module, chunk: int) -> None:
    """Make every FMS feed-forward module of ``model`` a :class:`ChunkedFeedForward`."""
    for m in model.modules():
        cls = type(m)
        if isinstance(m, (GatedLinearUnit, FeedForwardBlock)) and not isinstance(m, ChunkedFeedForward):
            if cls not in _CHUNKED:
                _CHUNKED[cls] = type(f"Chunked{cls.__name__}", (ChunkedFeedForward, cls), {})
            m.__class__ = _CHUNKED[cls]
        if isinstance(m, ChunkedFeedForward):
            m.ffn_chunk = chunk


class LlamaRing(nn.Module):
    """Ring-attention (context-parallel) inference for an FMS decoder.

    Works for any FMS decoder whose attention is ``MultiHeadAttention`` with
    rotary positions (LLaMA, Granite, Mistral, Qwen3 were tested), unsharded
    or sharded by FMS's tensor parallelism over the strategy's TP group: the
    ring then runs on each TP rank's heads and caches its kv-heads. Call it like
    the FMS model: ``model(ids, position_ids=..., mask=..., last_n_tokens=n,
    use_cache=..., past_key_value_states=...)``; every rank gets the logits the
    unsharded model would return. ``fms.utils.generation.generate`` works on
    it. It always runs without autograd (inference only), whatever the
    caller's grad mode.

    Each call is one attention mode (``fmsring.ring_attention``): a prompt is
    a ring prefill (in chunks of ``prefill_chunk`` tokens if set); new tokens
    on a cache are a sharded follow-up (``followup``: pass_kv, pass_q or
    auto), one token the static decode step (a CUDA graph on GPUs; a padding
    mask rides along as a bias per cache slot), and steps of several tokens
    shorter than the world size or carrying a mask run replicated.

    ``fuse`` compiles FMS's norms, gated MLPs and RoPE (on CUDA), and with
    ``fuse_layers`` every decoder layer of a decode step as one graph
    (:class:`fmsring.fusion.FusedDecoderBlock`; off, the first step of a new
    cache compiles faster and launches more kernels).

    ``check_inputs`` compares every rank's inputs once per prompt or
    follow-up; a one-token decode step makes no host sync at all, so the
    host can queue the next step while the device runs this one.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: RingAttentionStrategy,
        check_inputs: bool = True,
        cache_headroom: int = 256,
        ffn_chunk: int = 16384,
        cuda_graphs: bool = True,
        fuse: bool = True,
        fuse_layers: bool = True,
        followup: str = "auto",
        prefill_chunk: int = 0,
    ):
        super().__init__()
        attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        if not attns:
            raise ValueError(f"{type(model).__name__} has no MultiHeadAttention: ring attention cannot drive it")
        tp_sizes = {m.world_size if isinstance(m, TPMultiHeadAttention) else 1 for m in attns}
        if tp_sizes != {strategy.tp_size}:
            raise ValueError(
                f"{type(model).__name__}'s attention is sharded over {sorted(tp_sizes)} tensor-parallel "
                f"rank(s) but the strategy's TP group has {strategy.tp_size}: load it with "
                "fmsring.get_model(..., ring_tp=...) so both come from one mesh"
            )
        if any(not isinstance(m.position_encoder, RotaryEmbedding) for m in attns):
            raise ValueError(f"{type(model).__name__}: ring attention supports rotary-position decoders only")
        if followup not in FOLLOWUP_MODES:
            raise ValueError(f"unknown ring_followup {followup!r}; choose one of {FOLLOWUP_MODES}")
        if prefill_chunk and prefill_chunk < strategy.world_size:
            raise ValueError(
                f"ring_prefill_chunk={prefill_chunk}: a chunk needs at least one token per rank "
                f"({strategy.world_size}); 0 turns chunking off"
            )
        self.model = model
        self.strategy = strategy
        self.check_inputs = check_inputs
        self.cache_headroom = cache_headroom
        self.cuda_graphs = cuda_graphs
        self.followup = followup
        self.prefill_chunk = prefill_chunk
        self._attn = attns[0]
        self._n_layers = len(attns)
        self._graphs = DecodeGraphs()
        self._rotaries = position_encoders(model)
        if fuse:
            fuse_elementwise(model)
        if fuse and fuse_layers:
            fuse_decoder_blocks(model)
        if ffn_chunk > 0:
            chunk_feedforward(model, ffn_chunk)

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_value_states: list | None = None,
        use_cache: bool = False,
        last_n_tokens: int = 0,
        mask: torch.Tensor | None = None,
        **attn_kwargs: Any,
    ):
        self._validate(x, position_ids, mask, attn_kwargs)
        attn_kwargs.pop("attn_name", None)
        one_step = use_cache and bool(past_key_value_states) and x.shape[1] == 1
        if self.check_inputs and not one_step:  # once per prompt or follow-up; a decode step never syncs
            check_same_on_all_ranks([x, position_ids, mask], self.strategy.model_groups)
        if use_cache and past_key_value_states:
            return self._continue(x, position_ids, past_key_value_states, last_n_tokens, mask, attn_kwargs)
        if self.prefill_chunk and x.shape[1] > self.prefill_chunk and mask is None:
            return self._chunked_prefill(x, position_ids, use_cache, last_n_tokens, attn_kwargs)
        return self._prefill(x, position_ids, use_cache, last_n_tokens, mask, attn_kwargs)

    def _validate(self, x, position_ids, mask, attn_kwargs) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                "input_ids must be an integer tensor [batch, seq]; "
                f"got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
            )
        if x.shape[1] == 0:
            raise ValueError(f"input_ids has no tokens: {tuple(x.shape)}")
        device = next(self.model.parameters()).device
        for name, t in (("input_ids", x), ("position_ids", position_ids), ("mask", mask)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device} but the model is on {device}")
        if position_ids is not None and position_ids.shape != x.shape:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {tuple(x.shape)}")
        if mask is not None and (
            mask.dim() not in (3, 4) or mask.shape[0] != x.shape[0] or mask.shape[-2] not in (1, x.shape[1])
        ):
            raise ValueError(
                "mask must be [batch, q_len, kv_len] (FMS's format); "
                f"got {tuple(mask.shape)} for input {tuple(x.shape)}"
            )
        if attn_kwargs.get("attn_name", ring_attention.ATTN_NAME) != ring_attention.ATTN_NAME:
            raise ValueError(f"LlamaRing always uses ring attention; drop attn_name={attn_kwargs['attn_name']!r}")
        if attn_kwargs.get("only_last_token"):
            raise ValueError("only_last_token is deprecated in FMS; pass last_n_tokens=1")

    def _fit_rope(self, max_position: int, device: torch.device) -> None:
        """Grow the RoPE tables to cover ``max_position`` (FMS never regrows them).

        A table grows to at least twice its size: a generation past the table
        then regrows it (and recaptures the decode graph, which reads it) a
        logarithmic number of times, not at every token.
        """
        for rot in self._rotaries:
            cached = rot.max_seq_len_cached.get(device.index, 0)
            if max_position < cached:
                continue
            if rot.rope_type not in _GROWABLE_ROPE:
                raise ValueError(
                    f"position {max_position} is beyond the RoPE table ({cached}) and {rot.rope_type!r} "
                    "RoPE scaling depends on the table length; raise max_expected_seq_len when loading"
                )
            size = max(max_position + 1, 2 * cached)
            rot.cached_freqs.get(device.index, {}).pop(rot.rope_scaling.get_alpha(size), None)
            rot.compute_freqs_cis(device, size)

    def _positions(
        self, x: torch.Tensor, position_ids: torch.Tensor | None, start: int, last_max: int = -1
    ) -> tuple[torch.Tensor, int]:
        """The tokens' positions (``start`` onwards unless given) and the largest of them, with the
        RoPE tables grown to cover it.

        Given positions are read on the host (one sync) except for one token
        on a non-empty cache: a decode step advances the largest position by
        one (``last_max`` + 1), as FMS's ``generate`` does, so decoding never
        waits for the device.
        """
        n = x.shape[1]
        if position_ids is None:
            top = start + n - 1
        elif n == 1 and start > 0:
            top = last_max + 1
        else:
            top = int(position_ids.max())
        self._fit_rope(top, x.device)
        if position_ids is not None:
            return position_ids, top
        return torch.arange(start, start + n, device=x.device).expand(x.shape[0], -1), top

    def _positions_on(
        self, x: torch.Tensor, position_ids: torch.Tensor | None, state: RingCacheState, new_state: RingCacheState
    ) -> tuple[torch.Tensor, RingCacheState]:
        """New tokens' positions on a cache of ``state``, and ``new_state`` carrying the largest position."""
        positions, top = self._positions(x, position_ids, state.seq_len, state.max_position)
        return positions, replace(new_state, max_position=max(state.max_position, top))

    def _sharded(self, x, positions, plan, last_n_tokens, use_cache, past, ctx, attn_kwargs):
        """Run the FMS model on this rank's tokens of ``plan``; (logits of the last
        ``last_n_tokens`` tokens, in order, on every rank; the model's cache list)."""
        st = self.strategy
        local = plan.index_tensor(st.rank, x.device)
        n_out = plan.seq_len if last_n_tokens <= 0 else min(last_n_tokens, plan.seq_len)
        counts = [plan.tail_count(r, n_out) for r in range(st.world_size)]
        out = self.model(
            x.index_select(1, local),
            position_ids=positions.index_select(1, local),
            past_key_value_states=past,
            use_cache=use_cache,
            last_n_tokens=max(counts[st.rank], 1) if last_n_tokens > 0 else 0,
            attn_name=ring_attention.ATTN_NAME,
            ring=ctx,
            **attn_kwargs,
        )
        logits, layers = out if use_cache else (out, None)
        return self._gather_logits(logits[:, logits.shape[1] - counts[st.rank] :], plan, counts), layers

    def _prefill(self, x, position_ids, use_cache, last_n_tokens, mask, attn_kwargs, capacity: int = 0):
        """A ring prefill; with a cache of ``capacity`` slots per rank (default: the prompt plus headroom).

        A prompt shorter than the world size cannot be sharded: it runs as a
        replicated step on an empty cache.
        """
        st = self.strategy
        if x.shape[1] < st.world_size:
            sync_rng(st.model_groups, x.device)
            cache = self._empty_cache(x.shape[0], capacity or x.shape[1] + self.cache_headroom)
            logits, cache = self._replicated_step(x, position_ids, cache, last_n_tokens, mask, attn_kwargs)
            return (logits, cache) if use_cache else logits
        plan = st.plan(x.shape[1])
        positions, top = self._positions(x, position_ids, 0)
        sync_rng(st.model_groups, x.device)  # every generate() step after a prefill samples alike on all ranks
        zeros = (0,) * st.world_size
        capacity = capacity or capacity_for(zeros, plan.local_lens, 0, self.cache_headroom)
        bias_blocks = self._bias_blocks(mask, plan) if mask is not None else None
        ctx = ring_attention.Prefill(st, plan, capacity, bias_blocks)
        logits, layers = self._sharded(x, positions, plan, last_n_tokens, use_cache, None, ctx, attn_kwargs)
        warn_if_fragmented(x.device)  # once per prompt, on the host: the allocator's own counters
        if not use_cache:
            return logits
        state = RingCacheState(
            x.shape[1], tuple(plan.local_lens), plan.index_tensor(st.rank), capacity, new_cache_id(), top
        )
        return logits, RingCache(layers, state)

    def _empty_cache(self, batch: int, capacity: int) -> RingCache:
        """A cache holding no token yet, with ``capacity`` zeroed slots per layer."""
        attn, param = self._attn, next(self.model.parameters())
        dims = (attn.emb_kq_per_head, attn.emb_v_per_head)
        layers = [tuple(param.new_zeros(batch, capacity, attn.kvheads, d) for d in dims) for _ in range(self._n_layers)]
        zeros = (0,) * self.strategy.world_size
        return RingCache(layers, RingCacheState(0, zeros, torch.empty(0, dtype=torch.long), capacity, new_cache_id()))

    def _chunked_prefill(self, x, position_ids, use_cache, last_n_tokens, attn_kwargs):
        """The prompt prefilled as a ring prefill of its first ``prefill_chunk``
        tokens and follow-ups of the next ones, so activations scale with the
        chunk and only the cache with the prompt. The cache is sized for the
        whole prompt up front: it never grows on the way."""
        st, chunk, n = self.strategy, self.prefill_chunk, x.shape[1]
        bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        if bounds[-1][1] - bounds[-1][0] < st.world_size:  # too short to shard: joins the chunk before
            bounds[-2:] = [(bounds[-2][0], n)]
        fills = [sum(col) for col in zip(*(st.plan(e - s).local_lens for s, e in bounds))]
        capacity = capacity_for((0,) * st.world_size, fills, 0, self.cache_headroom)
        self._fit_rope(n - 1 if position_ids is None else int(position_ids.max()), x.device)  # once, not per chunk
        n_out = n if last_n_tokens <= 0 else min(last_n_tokens, n)
        pieces, cache = [], None
        for s, e in bounds:
            wanted = max(0, e - max(s, n - n_out))  # this chunk's tokens among the last n_out
            ids, pos = x[:, s:e], None if position_ids is None else position_ids[:, s:e]
            if cache is None:
                logits, cache = self._prefill(ids, pos, True, wanted or 1, None, attn_kwargs, capacity)
            else:
                logits, cache = self._followup(ids, pos, cache, wanted or 1, attn_kwargs)
            if wanted:
                pieces.append(logits)
        logits = torch.cat(pieces, dim=1)
        return (logits, cache) if use_cache else logits

    def _bias_blocks(self, mask: torch.Tensor, plan: ShardPlan) -> list[torch.Tensor | None]:
        """This rank's rows of the user's mask, cut into one additive block per source rank.

        Blocks that hide every key are None, so the ring skips their compute.
        """
        local = plan.index_tensor(self.strategy.rank, mask.device)
        rows = _query_rows(mask, plan.seq_len).index_select(1, local)
        blocks: list[torch.Tensor | None] = []
        for src in range(plan.world_size):
            blk = rows.index_select(2, plan.index_tensor(src, mask.device))
            blocks.append(blk if bool((blk > float("-inf")).any()) else None)
        return blocks

    def _continue(self, x, position_ids, cache, last_n_tokens, mask, attn_kwargs):
        """New tokens on a cache: the static decode step, a sharded follow-up or a replicated step."""
        if not isinstance(cache, RingCache):
            raise TypeError(
                "past_key_value_states must be the RingCache this model returned "
                "(generate(..., contiguous_cache=True) rebuilds it as a plain list: leave it off)"
            )
        n = x.shape[1]
        if n == 1:
            return self._decode_step(x, position_ids, cache, last_n_tokens, mask, attn_kwargs)
        if mask is not None or n < self.strategy.world_size:
            return self._replicated_step(x, position_ids, cache, last_n_tokens, mask, attn_kwargs)
        return self._followup(x, position_ids, cache, last_n_tokens, attn_kwargs)

    def _followup(self, x, position_ids, cache, last_n_tokens, attn_kwargs):
        """A sharded follow-up: the new tokens laid out like a prompt, pass-KV or pass-Q."""
        st, state = self.strategy, cache.state
        plan = st.plan(x.shape[1])
        new_indices = [[state.seq_len + i for i in plan.indices(r)] for r in range(st.world_size)]
        new_state = self._extend(cache, state.extended(st.rank, new_indices, self.cache_headroom))
        positions, new_state = self._positions_on(x, position_ids, state, new_state)
        mode = self.followup
        if mode == "auto":
            attn = self._attn
            shape = FollowupShape(
                new_tokens=x.shape[1],
                cached_tokens=state.seq_len,
                world_size=st.world_size,
                heads=attn.nheads,
                kv_heads=attn.kvheads,
                head_dim=attn.emb_kq_per_head,
                elem_bytes=cache[0][0].element_size(),
            )
            mode = choose_followup(shape)
        ctx = Followup(st, plan, state.fills, mode)
        logits, _ = self._sharded(x, positions, plan, last_n_tokens, True, list(cache), ctx, attn_kwargs)
        return logits, RingCache(cache, new_state)

    def _extend(self, cache: RingCache, new_state: RingCacheState) -> RingCacheState:
        """Grow the buffers if ``new_state`` needs more slots; return it."""
        if new_state.capacity != cache.state.capacity:
            cache.grow(cache.state.fills[self.strategy.rank], new_state.capacity)
        return new_state

    def _replicated_step(self, x, position_ids, cache, last_n_tokens, mask, attn_kwargs):
        """Every rank computes all new tokens; each stores the ones it owns and attends over its shard."""
        st, state = self.strategy, cache.state
        n = x.shape[1]
        owners = state.place(n)
        new_state = self._extend(cache, state.advanced(st.rank, owners, self.cache_headroom))
        positions, new_state = self._positions_on(x, position_ids, state, new_state)
        fill = state.fills[st.rank]
        end = new_state.fills[st.rank]
        if mask is not None:
            blocks = [(0, end, _mask_at_slots(mask, n, new_state))]
        else:  # cached tokens all precede the new ones; among the owned new ones, causal by global index
            query_index = torch.arange(state.seq_len, state.seq_len + n, device=x.device)
            owned_index = new_state.slot_index_on(x.device, fill)
            causal = _additive((owned_index.unsqueeze(0) <= query_index.unsqueeze(1)).unsqueeze(0))
            blocks = [(0, fill, None), (fill, end, causal)]
        ctx = ReplicatedStep(st, fill, RingCacheState.owned(owners, st.rank), blocks)
        logits, _ = self.model(
            x,
            position_ids=positions,
            past_key_value_states=list(cache),
            use_cache=True,
            last_n_tokens=last_n_tokens,
            attn_name=ring_attention.ATTN_NAME,
            ring=ctx,
            **attn_kwargs,
        )
        return logits, RingCache(cache, new_state)

    def _decode_step(self, x, position_ids, cache, last_n_tokens, mask, attn_kwargs):
        """One token: the static step, captured as a CUDA graph where possible. A padding mask
        becomes a bias per cache slot, an input of the step like the lengths."""
        st, state = self.strategy, cache.state
        new_state = self._extend(cache, state.advanced(st.rank, state.place(1), self.cache_headroom))
        positions, new_state = self._positions_on(x, position_ids, state, new_state)
        slot_bias = None
        if mask is not None:
            at_slots = _mask_at_slots(mask, 1, new_state)[:, 0]
            slot_bias = at_slots.new_zeros(x.shape[0], new_state.capacity)
            slot_bias[:, : at_slots.shape[1]] = at_slots
        inputs = StepInputs(
            ids=x,
            positions=positions,
            write_slot=torch.full((1,), state.fills[st.rank], device=x.device),
            kv_lens=torch.full((x.shape[0],), new_state.fills[st.rank], dtype=torch.int32, device=x.device),
            slot_bias=slot_bias,
        )
        layers = list(cache)

        def step(inp: StepInputs) -> torch.Tensor:
            split = decode_split_kv(inp.kv_lens, layers[0][0])  # once per step, not per layer
            return self.model(
                inp.ids,
                position_ids=inp.positions,
                past_key_value_states=layers,
                use_cache=True,
                last_n_tokens=last_n_tokens,
                attn_name=ring_attention.ATTN_NAME,
                ring=DecodeStep(st, inp.write_slot, inp.kv_lens, split, inp.slot_bias),
                **attn_kwargs,
            )[0]

        if self.cuda_graphs and x.is_cuda and not attn_kwargs:
            rope = self._rope_table_sizes(x.device)
            key = (x.shape[0], last_n_tokens, new_state.cache_id, new_state.capacity, rope, mask is not None)
            logits = self._graphs.run(key, inputs, step)
        else:
            logits = step(inputs)
        return logits, RingCache(cache, new_state)

    def _rope_table_sizes(self, device: torch.device) -> tuple[int, ...]:
        """The RoPE table sizes: a captured step reads the tables, which move when regrown."""
        return tuple(rot.max_seq_len_cached.get(device.index, 0) for rot in self._rotaries)

    def _gather_logits(self, mine: torch.Tensor, plan: ShardPlan, counts: list[int]) -> torch.Tensor:
        """Every rank's selected logits, in global token order, on every rank."""
        st = self.strategy
        if st.world_size == 1:
            return mine
        parts = all_gather_padded(mine, 1, st.group, max(counts))
        index = [i for r in range(st.world_size) for i in plan.indices(r)[plan.local_len(r) - counts[r] :]]
        rows = torch.cat([p[:, : counts[r]] for r, p in enumerate(parts)], dim=1)
        order = torch.tensor(sorted(range(len(index)), key=index.__getitem__), device=rows.device)
        return rows.index_select(1, order)


def _mask_at_slots(mask: torch.Tensor, n_queries: int, state: RingCacheState) -> torch.Tensor:
    """The user's mask for ``n_queries`` new tokens read at this rank's cache slots: additive fp32
    [b, n_queries, slots filled], a decode step's mask covering every cached token and the new ones."""
    if mask.shape[-1] != state.seq_len:
        raise ValueError(f"decode mask covers {mask.shape[-1]} keys; the cache plus new tokens hold {state.seq_len}")
    return _query_rows(mask, n_queries).index_select(2, state.slot_index_on(mask.device))


def _query_rows(mask: torch.Tensor, n_queries: int) -> torch.Tensor:
    """The user's mask as additive fp32 [b, n_queries, keys]; the queries are the last keys.

    A single row for several queries is what FMS's ``generate(...,
    use_cache=False)`` passes after its first step: it is read as a key
    padding mask and kept causal (FMS's SDPA would broadcast it to every query
    and let early tokens see later ones).
    """
    rows = _additive(mask)
    if rows.shape[1] == 1 and n_queries > 1:
        keys = rows.shape[2]
        query_index = torch.arange(keys - n_queries, keys, device=mask.device)
        future = torch.arange(keys, device=mask.device).unsqueeze(0) > query_index.unsqueeze(1)
        rows = rows.expand(-1, n_queries, -1).masked_fill(future, float("-inf"))
    return rows


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """FMS masks are bool (True = attend) or additive float; make them additive fp32 [b, q, k]."""
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError("per-head masks are not supported by ring attention")
        mask = mask.squeeze(1)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float()
