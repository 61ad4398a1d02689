"""Cache placement bookkeeping (pure Python, identical on every rank)."""

import random

import torch

from fmsring.cache import RingCacheState


def test_placement_keeps_shards_within_one_token_and_tracks_indices():
    W = random.randint(2, 6)
    fills = tuple(random.randint(3, 6) for _ in range(W))
    state = RingCacheState(seq_len=sum(fills), fills=fills, slot_index=torch.arange(fills[0]), capacity=fills[0])
    for _ in range(30):
        n = random.choice([1, 1, 1, 2, 5])
        owners = state.place(n)
        mine = RingCacheState.owned(owners, 0)
        picked = list(range(n))[mine] if isinstance(mine, slice) else mine
        assert picked == [i for i, r in enumerate(owners) if r == 0]
        before = state
        state = state.advanced(0, owners, headroom=4)
        assert state.seq_len == before.seq_len + n
        assert state.slot_index.tolist()[before.fills[0] :] == [before.seq_len + i for i in picked]
        assert state.capacity >= state.fills[0]
    assert max(state.fills) - min(state.fills) <= 1
