"""LlamaRing and ``fmsring.get_model``: an FMS causal LM run with ring attention.

Every rank passes the same full ``input_ids``; LlamaRing feeds the model only
this rank's tokens (with their global positions), so embeddings, MLPs and
norms run on 1/W of the sequence, attention goes through the ``"ring"`` op,
and only the logits the caller asked for are computed and gathered.
"""

from __future__ import annotations

from typing import Any

import fms.models
import torch
import torch.distributed as dist
from fms.modules.attention import MultiHeadAttention, TPMultiHeadAttention
from fms.modules.feedforward import FeedForwardBlock, GatedLinearUnit
from fms.modules.positions import RotaryEmbedding
from torch import nn

from fmsring import ring_attention
from fmsring.cache import RingCache, RingCacheState, new_cache_id
from fmsring.comm import all_gather_padded, broadcast_weights, check_same_on_all_ranks, sync_rng
from fmsring.decode_graph import DecodeGraphs, StepInputs
from fmsring.fusion import fuse_elementwise, position_encoders
from fmsring.layout import LAYOUTS, ShardPlan
from fmsring.ring_attention import RingContext
from fmsring.strategy import RingAttentionStrategy

STRATEGIES = ("ring", "replicated", None, "", "tp", "mp", "fsdp", "hsdp", "ddp")
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
    rotary positions (LLaMA, Granite, Mistral, Qwen3 were tested). Call it like
    the FMS model: ``model(ids, position_ids=..., mask=..., last_n_tokens=n,
    use_cache=..., past_key_value_states=...)``; every rank gets the logits the
    unsharded model would return. ``fms.utils.generation.generate`` works on it.
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
    ):
        super().__init__()
        attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        if not attns or any(isinstance(m, TPMultiHeadAttention) for m in attns):
            raise ValueError(
                f"{type(model).__name__} has no (unsharded) MultiHeadAttention: ring attention cannot drive it"
            )
        if any(not isinstance(m.position_encoder, RotaryEmbedding) for m in attns):
            raise ValueError(f"{type(model).__name__}: ring attention supports rotary-position decoders only")
        self.model = model
        self.strategy = strategy
        self.check_inputs = check_inputs
        self.cache_headroom = cache_headroom
        self.cuda_graphs = cuda_graphs
        self._graphs = DecodeGraphs()
        self._rotaries = position_encoders(model)
        if fuse:
            fuse_elementwise(model)
        if ffn_chunk > 0:
            chunk_feedforward(model, ffn_chunk)

    @property
    def config(self):
        return self.model.config

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
        if self.check_inputs:
            check_same_on_all_ranks([x, position_ids, mask], self.strategy.group)
        if use_cache and past_key_value_states:
            return self._decode(x, position_ids, past_key_value_states, last_n_tokens, mask, attn_kwargs)
        return self._prefill(x, position_ids, use_cache, last_n_tokens, mask, attn_kwargs)

    def _validate(self, x, position_ids, mask, attn_kwargs) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                "input_ids must be an integer tensor [batch, seq]; "
                f"got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
            )
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
        """Grow the RoPE tables to cover ``max_position`` (FMS never regrows them)."""
        for rot in self._rotaries:
            cached = rot.max_seq_len_cached.get(device.index, 0)
            if max_position < cached:
                continue
            if rot.rope_type not in _GROWABLE_ROPE:
                raise ValueError(
                    f"position {max_position} is beyond the RoPE table ({cached}) and {rot.rope_type!r} "
                    "RoPE scaling depends on the table length; raise max_expected_seq_len when loading"
                )
            alpha = rot.rope_scaling.get_alpha(max_position + 1)
            rot.cached_freqs.get(device.index, {}).pop(alpha, None)
            rot.compute_freqs_cis(device, max_position + 1)

    def _prefill(self, x, position_ids, use_cache, last_n_tokens, mask, attn_kwargs):
        st = self.strategy
        batch, seq_len = x.shape
        plan = st.plan(seq_len)
        local = plan.index_tensor(st.rank, x.device)
        positions = (
            position_ids if position_ids is not None else torch.arange(seq_len, device=x.device).expand(batch, -1)
        )
        max_pos = seq_len - 1 if position_ids is None else int(position_ids.max())
        self._fit_rope(max_pos, x.device)
        sync_rng(st.group, x.device)  # every generate() step after a prefill samples alike on all ranks
        n_out = seq_len if last_n_tokens <= 0 else min(last_n_tokens, seq_len)
        counts = [plan.tail_count(r, n_out) for r in range(st.world_size)]
        ctx = RingContext(
            strategy=st,
            plan=plan,
            bias_blocks=self._bias_blocks(mask, plan, local) if mask is not None else None,
            capacity=max(plan.local_lens) + self.cache_headroom,
        )
        out = self.model(
            x.index_select(1, local),
            position_ids=positions.index_select(1, local),
            use_cache=use_cache,
            last_n_tokens=max(counts[st.rank], 1) if last_n_tokens > 0 else 0,
            attn_name=ring_attention.ATTN_NAME,
            ring=ctx,
            **attn_kwargs,
        )
        logits, layers = out if use_cache else (out, None)
        logits = self._gather_logits(logits[:, logits.shape[1] - counts[st.rank] :], plan, counts)
        if not use_cache:
            return logits
        state = RingCacheState(
            seq_len=seq_len,
            fills=tuple(plan.local_lens),
            slot_index=plan.index_tensor(st.rank),
            capacity=ctx.capacity,
            cache_id=new_cache_id(),
        )
        return logits, RingCache(layers, state)

    def _bias_blocks(self, mask: torch.Tensor, plan: ShardPlan, local: torch.Tensor) -> list[torch.Tensor | None]:
        """This rank's rows of the user's mask, cut into one additive block per source rank.

        Blocks that hide every key are None, so the ring skips their compute.
        """
        rows = _query_rows(mask, plan.seq_len).index_select(1, local)
        blocks: list[torch.Tensor | None] = []
        for src in range(plan.world_size):
            blk = rows.index_select(2, plan.index_tensor(src, mask.device))
            blocks.append(blk if bool((blk > float("-inf")).any()) else None)
        return blocks

    def _decode(self, x, position_ids, cache, last_n_tokens, mask, attn_kwargs):
        st = self.strategy
        if not isinstance(cache, RingCache):
            raise TypeError(
                "past_key_value_states must be the RingCache this model returned "
                "(generate(..., contiguous_cache=True) rebuilds it as a plain list: leave it off)"
            )
        state = cache.state
        n = x.shape[1]
        owners = state.place(n)
        new_state = state.advanced(st.rank, owners, self.cache_headroom)
        if new_state.capacity != state.capacity:
            cache.grow(state.fills[st.rank], new_state.capacity)
        query_index = torch.arange(state.seq_len, state.seq_len + n, device=x.device)
        positions = position_ids if position_ids is not None else query_index.expand(x.shape[0], -1)
        max_pos = state.seq_len + n - 1 if position_ids is None else int(position_ids.max())
        self._fit_rope(max_pos, x.device)
        if n == 1 and mask is None:
            fill = state.fills[st.rank]
            inputs = StepInputs(
                ids=x,
                positions=positions,
                write_slot=torch.full((1,), fill, device=x.device),
                kv_lens=torch.full((x.shape[0],), new_state.fills[st.rank], dtype=torch.int32, device=x.device),
            )
            layers = list(cache)

            def step(inp: StepInputs) -> torch.Tensor:
                ctx = RingContext(strategy=st, decoding=True, write_slot=inp.write_slot, kv_lens=inp.kv_lens)
                return self.model(
                    inp.ids,
                    position_ids=inp.positions,
                    past_key_value_states=layers,
                    use_cache=True,
                    last_n_tokens=last_n_tokens,
                    attn_name=ring_attention.ATTN_NAME,
                    ring=ctx,
                    **attn_kwargs,
                )[0]

            if self.cuda_graphs and x.is_cuda and not attn_kwargs:
                key = (
                    x.shape[0],
                    last_n_tokens,
                    new_state.cache_id,
                    new_state.capacity,
                    self._rope_table_sizes(x.device),
                )
                logits = self._graphs.run(key, inputs, step)
            else:
                logits = step(inputs)
            return logits, RingCache(cache, new_state)
        if mask is not None:
            if mask.shape[-1] != new_state.seq_len:
                raise ValueError(
                    f"decode mask covers {mask.shape[-1]} keys; the cache plus new tokens hold {new_state.seq_len}"
                )
            bias = _query_rows(mask, n).index_select(2, new_state.slot_index.to(mask.device))
        else:
            visible = new_state.slot_index.to(x.device).unsqueeze(0) <= query_index.unsqueeze(1)
            bias = _additive(visible.unsqueeze(0))
        ctx = RingContext(
            strategy=st,
            decoding=True,
            fill=state.fills[st.rank],
            new_slots=RingCacheState.owned(owners, st.rank),
            decode_bias=bias,
        )
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


def get_model(
    architecture: str,
    variant: str | None = None,
    model_path: str | None = None,
    source: str | None = None,
    device_type: str = "cpu",
    data_type: str | torch.dtype | None = None,
    distributed_strategy: str | None = None,
    checkpoint_sharding: str | None = None,
    group: dist.ProcessGroup | None = None,
    ring_layout: str = "zigzag",
    ring_check_inputs: bool = True,
    ring_cache_headroom: int = 256,
    ring_ffn_chunk: int = 16384,
    ring_cuda_graphs: bool = True,
    ring_fuse: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """``fms.models.get_model`` that also accepts ``distributed_strategy="ring"``.

    With ``"ring"`` the weights are loaded whole on every rank and wrapped in
    :class:`LlamaRing`. ``"replicated"`` loads the plain, unsharded FMS model
    on every rank (FMS itself turns ``None`` into tensor parallel under
    torchrun). Any other strategy is passed to FMS unchanged. Random-init
    models (no ``model_path``) get rank 0's weights on every rank.
    """
    if distributed_strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed_strategy {distributed_strategy!r}; choose one of {STRATEGIES}")
    ours = distributed_strategy in ("ring", "replicated")
    if ours and ring_layout not in LAYOUTS:
        raise ValueError(f"unknown ring_layout {ring_layout!r}; choose one of {LAYOUTS}")
    strategy = RingAttentionStrategy(group=group, layout=ring_layout) if distributed_strategy == "ring" else None
    # FMS treats a strategy name it does not know as replicated: every rank loads every weight.
    model = fms.models.get_model(
        architecture,
        variant,
        model_path,
        source,
        device_type,
        data_type,
        "replicated" if ours else distributed_strategy,
        checkpoint_sharding,
        group,
        **kwargs,
    )
    if not ours:
        return model
    if dist.is_initialized() and model_path is None and architecture != "hf_pretrained":
        broadcast_weights(model, group)
    if strategy is None:
        return model
    return LlamaRing(
        model,
        strategy,
        check_inputs=ring_check_inputs,
        cache_headroom=ring_cache_headroom,
        ffn_chunk=ring_ffn_chunk,
        cuda_graphs=ring_cuda_graphs,
        fuse=ring_fuse,
    )
