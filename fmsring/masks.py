"""The user's attention mask (FMS's format) turned into what ring attention reads:
additive fp32 rows for the new queries, read at the keys a rank holds."""

from __future__ import annotations

import torch

from fmsring.cache import RingCacheState


def mask_at_slots(mask: torch.Tensor, n_queries: int, state: RingCacheState) -> torch.Tensor:
    """The user's mask for ``n_queries`` new tokens read at this rank's cache slots: additive fp32
    [b, n_queries, slots filled], a decode step's mask covering every cached token and the new ones."""
    covers_the_cache(mask, state)
    return query_rows(mask, n_queries).index_select(2, state.slot_index_on(mask.device))


def covers_the_cache(mask: torch.Tensor, state: RingCacheState) -> None:
    if mask.shape[-1] != state.seq_len:
        raise ValueError(f"decode mask covers {mask.shape[-1]} keys; the cache plus new tokens hold {state.seq_len}")


def decode_bias(mask: torch.Tensor, state: RingCacheState) -> torch.Tensor:
    """The user's mask for a decode step's new token (its last query row) read at this rank's
    filled slots: additive fp32 [b, capacity] whose columns past the fill are left unwritten.

    A step reads no slot past its fill (:func:`fmsring.kernels.decode_attention_with_lse`), and a
    padded step pays for each launch its bias costs the host (docs/performance.md, Padded
    batches): here two -- the slots picked from the mask row, then the row made additive in place
    -- where making the whole mask additive, zeroing the bias and copying the row in took six."""
    covers_the_cache(mask, state)
    row = by_query(mask)[:, -1]
    at_slots = row.index_select(1, state.slot_index_on(mask.device))
    bias = torch.empty(row.shape[0], state.capacity, device=mask.device, dtype=torch.float32)
    if at_slots.dtype == torch.bool:  # log maps True (attend) to 0 and False to -inf, in one launch
        torch.log(at_slots, out=bias[:, : at_slots.shape[1]])
    else:
        bias[:, : at_slots.shape[1]] = at_slots
    return bias


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
    mask = by_query(mask)
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, float("-inf")).float()
    return mask.float()


def by_query(mask: torch.Tensor) -> torch.Tensor:
    """An FMS mask [b, 1, q, k] or [b, q, k] as [b, q, k], its dtype kept."""
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError("per-head masks are not supported by ring attention")
        mask = mask.squeeze(1)
    return mask
