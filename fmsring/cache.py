"""The sharded KV cache: each rank keeps only the K/V of the tokens it owns.

FMS hands a model's cache back to it as a list of per-layer (K, V) pairs;
``RingCache`` is that list plus the bookkeeping every rank needs to agree on
(who holds which global token), kept as Python ints so no step syncs the host.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class RingCacheState:
    """Global view of the sharded cache, identical on every rank.

    seq_len: tokens cached in total; fills[r]: tokens rank r holds;
    slot_index: this rank's slots' global sequence indices (for masks), on
    the host so that a decode step copies nothing to the device;
    capacity: this rank's preallocated slots per layer (grows as needed).
    """

    seq_len: int
    fills: tuple[int, ...]
    slot_index: torch.Tensor
    capacity: int

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

    def advanced(self, rank: int, owners: list[int], headroom: int) -> "RingCacheState":
        """The state after appending tokens with the given ``owners``."""
        fills = list(self.fills)
        for r in owners:
            fills[r] += 1
        new_idx = [self.seq_len + i for i, r in enumerate(owners) if r == rank]
        slot_index = self.slot_index
        if new_idx:
            slot_index = torch.cat([slot_index, torch.tensor(new_idx, dtype=slot_index.dtype)])
        capacity = self.capacity if fills[rank] <= self.capacity else fills[rank] + headroom
        return replace(
            self, seq_len=self.seq_len + len(owners), fills=tuple(fills), slot_index=slot_index, capacity=capacity
        )


class RingCache(list):
    """FMS's list of per-layer (K, V) buffers, carrying the ring's ``state``.

    Buffers are [b, kvh, capacity, d]; the first ``state.fills[rank]`` slots
    are valid. They are written in place, so a cache is consumed by the step
    that extends it.
    """

    def __init__(self, layers, state: RingCacheState):
        super().__init__(layers)
        self.state = state
