"""The user's attention mask (FMS's format) turned into what ring attention reads:
additive fp32 rows for the new queries, read at the keys a rank holds."""

from __future__ import annotations

import torch

from fmsring.cache import RingCacheState


def mask_at_slots(mask: torch.Tensor, n_queries: int, state: RingCacheState) -> torch.Tensor:
    """The user's mask for ``n_queries`` new tokens read at this rank's cache slots: additive fp32
    [b, n_queries, slots filled], a decode step's mask covering every cached token and the new ones."""
    if mask.shape[-1] != state.seq_len:
        raise ValueError(f"decode mask covers {mask.shape[-1]} keys; the cache plus new tokens hold {state.seq_len}")
    return query_rows(mask, n_queries).index_select(2, state.slot_index_on(mask.device))


def query_rows(mask: torch.Tensor, n_queries: int) -> torch.Tensor:
    """The user's mask as additive fp32 [b, n_queries, keys]; the queries are the last keys.

    A single row for several queries is what FMS's ``generate(...,
    use_cache=False)`` passes after its first step: it is read as a key
    padding mask and kept causal (FMS's SDPA would broadcast it to every query
    and let early tokens see later ones).
    """
    rows = additive(mask)
    if rows.shape[1] == 1 and n_queries > 1:
        keys = rows.shape[2]
        query_index = torch.arange(keys - n_queries, keys, device=mask.device)
        future = torch.arange(keys, device=mask.device).unsqueeze(0) > query_index.unsqueeze(1)
        rows = rows.expand(-1, n_queries, -1).masked_fill(future, float("-inf"))
    return rows


def additive(mask: torch.Tensor) -> torch.Tensor:
    """FMS masks are bool (True = attend) or additive float; make them additive fp32 [b, q, k]."""
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError("per-head masks are not supported by ring attention")
        mask = mask.squeeze(1)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float()
