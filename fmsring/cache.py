"""The sharded KV cache: each rank keeps only the K/V of the tokens it owns.

FMS hands a model's cache back to it as a list of per-layer (K, V) pairs;
``RingCache`` is that list plus the bookkeeping every rank needs to agree on
(who holds which global token), kept as Python ints so no step syncs the host.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

_CACHE_IDS = itertools.count()


def new_cache_id() -> int:
    """A fresh id for a cache made by a prefill. Every rank prefills in the same
    calls, so the ids agree across ranks: a captured decode step is keyed on
    (cache_id, capacity), and all ranks must recapture together."""
    return next(_CACHE_IDS)


@dataclass(frozen=True)
class RingCacheState:
    """Global view of the sharded cache, identical on every rank (but slot_index).

    seq_len: tokens cached in total; fills[r]: tokens rank r holds;
    slot_index: this rank's slots' global sequence indices (for masks), on
    the host so that a decode step copies nothing to the device;
    capacity: slots per layer preallocated on every rank (the same on all, so
    all ranks grow their buffers in the same step); cache_id: which prefill
    made the cache (with capacity, it names the buffers' allocation).
    """

    seq_len: int
    fills: tuple[int, ...]
    slot_index: torch.Tensor
    capacity: int
    cache_id: int

    @staticmethod
    def owned(owners: list[int], rank: int) -> slice | list[int]:
        """The step's new tokens that ``rank`` stores: a slice when evenly spaced
        (always for one token, and once shards are balanced), so indexing is a
        view and nothing is copied to the device."""
        mine = [i for i, r in enumerate(owners) if r == rank]
        if not mine:
            return slice(0, 0)
        step = mine[1] - mine[0] if len(mine) > 1 else 1
        if mine == list(range(mine[0], mine[-1] + 1, step)):
            return slice(mine[0], mine[-1] + 1, step)
        return mine

    def place(self, n_new: int) -> list[int]:
        """Owner rank of each of ``n_new`` appended tokens: the least-filled rank,
        lowest rank on ties, so shards stay within one token of each other."""
        fills = list(self.fills)
        owners = []
        for _ in range(n_new):
            r = min(range(len(fills)), key=lambda i: (fills[i], i))
            owners.append(r)
            fills[r] += 1
        return owners

    def advanced(self, rank: int, owners: list[int], headroom: int) -> RingCacheState:
        """The state after appending tokens with the given ``owners``.

        Capacity must cover every rank's new fill and one free slot past every
        old fill (a one-token step writes the token on every rank, at the
        rank's first free slot, so the write needs no branch); when it does
        not, every rank grows to the largest need plus ``headroom``.
        """
        fills = list(self.fills)
        for r in owners:
            fills[r] += 1
        new_idx = [self.seq_len + i for i, r in enumerate(owners) if r == rank]
        slot_index = self.slot_index
        if new_idx:
            slot_index = torch.cat([slot_index, torch.tensor(new_idx, dtype=slot_index.dtype)])
        need = max(max(fills), max(self.fills) + 1)
        return replace(
            self,
            seq_len=self.seq_len + len(owners),
            fills=tuple(fills),
            slot_index=slot_index,
            capacity=need + headroom if need > self.capacity else self.capacity,
        )


def allocate_layer(tokens: torch.Tensor, capacity: int) -> torch.Tensor:
    """A [b, capacity, kvh, d] cache buffer holding ``tokens`` [b, L, kvh, d] in
    its first L slots and zeros after them.

    Tokens along dim 1 with kv-heads inside is the layout flash attention
    reads directly, and prefill's K/V are stored without a transpose. The
    unused slots are zeroed, not left as they were: a masked read of them
    must give 0 x weight 0, which NaN garbage would not.
    """
    b, n, kvh, d = tokens.shape
    buf = tokens.new_empty(b, capacity, kvh, d)
    buf[:, :n].copy_(tokens)
    buf[:, n:].zero_()
    return buf


class RingCache(list):
    """FMS's list of per-layer (K, V) buffers, carrying the ring's ``state``.

    Buffers are [b, capacity, kvh, d]; the first ``state.fills[rank]`` slots
    are valid. They are written in place, so a cache is consumed by the step
    that extends it.
    """

    def __init__(self, layers, state: RingCacheState):
        super().__init__(layers)
        self.state = state

    def grow(self, fill: int, capacity: int) -> None:
        """Reallocate every layer's buffers at ``capacity`` slots, keeping the first
        ``fill``; in place, one layer at a time, so at most one extra layer is held."""
        for i, layer in enumerate(self):
            self[i] = tuple(allocate_layer(t[:, :fill], capacity) for t in layer)
