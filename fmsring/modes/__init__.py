"""Attention modes: each module owns one kind of forward from plan to attention.

A mode decides which tokens each rank runs and which blocks each attends,
how the cache's state changes, and the context object it hands every
layer's ``"ring"`` op (an :class:`AttentionMode`), whose ``store`` and
``attend`` are that mode's attention:

* :mod:`.prefill` -- a prompt, sharded by the layout (and chunked prefill);
* :mod:`.followup` -- new tokens on a cache, sharded: pass-KV or pass-Q;
* :mod:`.decode` -- one token, the static step a CUDA graph captures;
* :mod:`.replicated` -- steps too short to shard, or masked, computed by every rank.

A mode reaches the model only through :class:`Ring` (what
:class:`fmsring.LlamaRing` is to it), so the FMS call is written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from fms.modules.attention import MultiHeadAttention

from fmsring.comm import all_gather_padded
from fmsring.layout import ShardPlan
from fmsring.rope import RopeTables
from fmsring.strategy import RingAttentionStrategy
from fmsring.windows import LayerAttention


class AttentionMode(Protocol):
    """What one forward tells every layer's ring op: how to store and how to attend."""

    def store(
        self, keys: torch.Tensor, values: torch.Tensor, key_cache: torch.Tensor | None, value_cache: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """FMS's store op: (keys to compute on, values to compute on, key cache, value cache)."""
        ...

    def attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, layer: LayerAttention
    ) -> torch.Tensor:
        """Attention of query [b, L, h, d] given what :meth:`store` returned, with ``layer``'s sinks
        and window; [b, L, h, d] in query's dtype."""
        ...


@dataclass(slots=True)
class Call:
    """One forward's inputs, as the caller gave them (every rank the same full tensors)."""

    ids: torch.Tensor
    position_ids: torch.Tensor | None = None
    last_n_tokens: int = 0
    mask: torch.Tensor | None = None

    def part(self, start: int, stop: int, last_n_tokens: int) -> Call:
        """Tokens ``start:stop`` (an unmasked prompt's chunk)."""
        pos = None if self.position_ids is None else self.position_ids[:, start:stop]
        return Call(self.ids[:, start:stop], pos, last_n_tokens)


class Ring(Protocol):
    """What a mode needs of the model that runs it (:class:`fmsring.LlamaRing`)."""

    strategy: RingAttentionStrategy
    cache_headroom: int
    rope: RopeTables
    attn: MultiHeadAttention  # the first layer's: every layer has its shape
    n_layers: int
    recurrent: bool  # some layers are Mamba2's (fmsring.ssm)

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def windows(self) -> tuple[int, ...]:
        """The sliding windows the model's blocks hold now (:func:`fmsring.families.windows`): where
        there are any, steps that attend a cache need its slots' indices."""
        ...

    def zero_states(self, batch: int) -> list:
        """Per decoder layer, a zero Mamba2 state or None (attention); empty without Mamba2 layers."""
        ...

    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        layers: list | None,
        use_cache: bool,
        last_n_tokens: int,
        ctx: AttentionMode,
    ) -> tuple[torch.Tensor, list | None]:
        """The FMS model on these tokens with ``ctx`` as every layer's attention: (logits, the
        layers' K/V FMS returns with ``use_cache``, else None)."""
        ...


def run_sharded(
    ring: Ring,
    call: Call,
    positions: torch.Tensor,
    plan: ShardPlan,
    layers: list | None,
    use_cache: bool,
    ctx: AttentionMode,
) -> tuple[torch.Tensor, list | None]:
    """The model on this rank's tokens of ``plan``: (logits of the last ``call.last_n_tokens``
    tokens, in order, on every rank; the model's cache list)."""
    st, x, last_n = ring.strategy, call.ids, call.last_n_tokens
    local = plan.index_tensor(st.rank, x.device)
    n_out = plan.seq_len if last_n <= 0 else min(last_n, plan.seq_len)
    counts = [plan.tail_count(r, n_out) for r in range(st.world_size)]
    mine = max(counts[st.rank], 1) if last_n > 0 else 0
    logits, out_layers = ring.run(
        x.index_select(1, local), positions.index_select(1, local), layers, use_cache, mine, ctx
    )
    return gather_logits(st, logits[:, logits.shape[1] - counts[st.rank] :], plan, counts), out_layers


def gather_logits(st: RingAttentionStrategy, mine: torch.Tensor, plan: ShardPlan, counts: list[int]) -> torch.Tensor:
    """Every rank's selected logits, in global token order, on every rank."""
    if st.world_size == 1:
        return mine
    parts = all_gather_padded(mine, 1, st.group, max(counts))
    index = [i for r in range(st.world_size) for i in plan.indices(r)[plan.local_len(r) - counts[r] :]]
    rows = torch.cat([p[:, : counts[r]] for r, p in enumerate(parts)], dim=1)
    order = torch.tensor(sorted(range(len(index)), key=index.__getitem__), device=rows.device)
    return rows.index_select(1, order)
