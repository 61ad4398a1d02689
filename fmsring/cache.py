"""The sharded KV cache: each rank keeps only the K/V of the tokens it owns.

FMS hands a model's cache back to it as a list of per-layer (K, V) pairs;
``RingCache`` is that list plus the bookkeeping every rank needs to agree on
(who holds which global token, how many slots are allocated), kept as Python
ints so that no step syncs the host. This module alone decides how many slots
a cache has.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

_CACHE_IDS = itertools.count()


def new_cache_id() -> int:
    """A fresh id for a cache made by a prefill. Every rank prefills in the same
    calls, so the ids agree across ranks: a captured decode step is keyed on
    (cache_id, capacity), and all ranks must recapture together."""
    return next(_CACHE_IDS)


def capacity_for(old_fills: Sequence[int], new_fills: Sequence[int], capacity: int, headroom: int) -> int:
    """Slots per layer, the same on every rank, once ranks' fills go from
    ``old_fills`` to ``new_fills``: ``capacity`` while it suffices, else the
    need plus ``headroom``, so that all ranks grow (and recapture a decode
    graph) in the same step.

    The need covers every new fill and one free slot past every old fill: a
    one-token step writes its token on every rank, at the rank's first free
    slot, so the write needs no branch.
    """
    need = max(max(new_fills), max(old_fills) + 1)
    return capacity if need <= capacity else need + headroom


@dataclass(frozen=True)
class RingCacheState:
    """Global view of the sharded cache, identical on every rank (but slot_index).

    seq_len: tokens cached in total; fills[r]: tokens rank r holds;
    slot_index: this rank's slots' global sequence indices (for masks), on
    the host so that an unmasked decode step copies nothing to the device
    (a masked one copies it without a host sync: :meth:`slot_index_on`);
    capacity: slots per layer preallocated on every rank;
    cache_id: which prefill made the cache (with capacity, it names the
    buffers' allocation); max_position: the largest position id cached (the
    RoPE tables cover it), known without reading the device.
    """

    seq_len: int
    fills: tuple[int, ...]
    slot_index: torch.Tensor
    capacity: int
    cache_id: int
    max_position: int = -1

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

    def slot_index_on(self, device: torch.device, start: int = 0) -> torch.Tensor:
        """``slot_index[start:]`` on ``device``. To a GPU through pinned memory and asynchronously:
        a copy from pageable memory would make the host wait for every kernel queued before it,
        and a masked decode step reads this every step."""
        index = self.slot_index[start:]
        if torch.device(device).type == "cuda":
            return index.pin_memory().to(device, non_blocking=True)
        return index.to(device)

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

    def extended(self, rank: int, new_indices: Sequence[Sequence[int]], headroom: int) -> RingCacheState:
        """The state after appending tokens: ``new_indices[r]`` are the global
        indices (counted from 0 = first cached token) that rank r appends, in order."""
        fills = tuple(f + len(new) for f, new in zip(self.fills, new_indices))
        slot_index = self.slot_index
        if new_indices[rank]:
            slot_index = torch.cat([slot_index, torch.as_tensor(list(new_indices[rank]), dtype=slot_index.dtype)])
        return replace(
            self,
            seq_len=self.seq_len + sum(len(new) for new in new_indices),
            fills=fills,
            slot_index=slot_index,
            capacity=capacity_for(self.fills, fills, self.capacity, headroom),
        )

    def advanced(self, rank: int, owners: list[int], headroom: int) -> RingCacheState:
        """The state after appending tokens placed one by one (``owners[i]`` stores token i)."""
        per_rank = [[self.seq_len + i for i, r in enumerate(owners) if r == dst] for dst in range(len(self.fills))]
        return self.extended(rank, per_rank, headroom)


def allocate_layer(tokens: torch.Tensor, capacity: int) -> torch.Tensor:
    """A [b, capacity, kvh, d] cache buffer holding ``tokens`` [b, L, kvh, d] in
    its first L slots and zeros after them.

    Tokens along dim 1 with kv-heads inside is the layout fmsring's decode
    kernel and the fused attention kernels read directly, and prefill's K/V
    are stored without a transpose. The unused slots are zeroed, not left as
    they were: a masked read of them must give 0 x weight 0, which NaN
    garbage would not.
    """
    b, n, kvh, d = tokens.shape
    buf = tokens.new_empty(b, capacity, kvh, d)
    buf[:, :n].copy_(tokens)
    buf[:, n:].zero_()
    return buf


class RingCache(list):
    """FMS's list of per-layer (K, V) buffers, carrying the ring's ``state``.

    Buffers are [b, capacity, kvh, d]; the first ``state.fills[rank]`` slots
    are valid. They are written in place past the valid slots, so a step
    leaves the cache it extended usable again from its own state (the next
    call overwrites the same slots) -- unless it had to grow the buffers.
    """

    def __init__(self, layers, state: RingCacheState):
        super().__init__(layers)
        self.state = state

    def grow(self, fill: int, capacity: int) -> None:
        """Reallocate every layer's buffers at ``capacity`` slots, keeping the first
        ``fill``; in place, one layer at a time, so at most one extra layer is held."""
        for i, layer in enumerate(self):
            self[i] = tuple(allocate_layer(t[:, :fill], capacity) for t in layer)
