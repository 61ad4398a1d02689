"""The user's mask as ring attention reads it: a decode step's bias against the general path
(``mask_at_slots``), on fresh random masks -- bool and additive float, FMS's 4-d and 3-d forms, a
shard whose slots hold scattered sequence indices -- and against the row a square mask gives the
new token."""

from __future__ import annotations

import random

import pytest
import torch

from fmsring.cache import RingCacheState
from fmsring.masks import additive, decode_bias, mask_at_slots


def shard(seq_len: int) -> RingCacheState:
    """A rank's state holding a random subset of the sequence's tokens, in sequence order."""
    fill = random.randrange(1, seq_len + 1)
    slots = torch.tensor(sorted(random.sample(range(seq_len), fill)))
    return RingCacheState(seq_len, (fill,), slots, capacity=fill + random.randrange(0, 9), cache_id=0)


@pytest.mark.parametrize("form", ["bool 4d", "bool 3d", "float 4d"])
def test_a_decode_bias_is_the_mask_row_at_the_filled_slots(form):
    b, seq_len = 3, random.randrange(5, 40)
    state = shard(seq_len)
    keep = torch.rand(b, 1, 1, seq_len) > 0.3
    mask = keep if form.startswith("bool") else additive(keep).unsqueeze(1) + torch.randn(b, 1, 1, seq_len)
    if form.endswith("3d"):
        mask = mask.squeeze(1)
    bias = decode_bias(mask, state)
    fill = state.fills[0]
    assert bias.shape == (b, state.capacity) and bias.dtype == torch.float32
    assert torch.equal(bias[:, :fill], mask_at_slots(mask, 1, state)[:, 0])


def test_a_square_mask_gives_the_new_tokens_row():
    """A decode step's token is the mask's last query: its row, not the first token's."""
    seq_len = random.randrange(4, 30)
    state = shard(seq_len)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(2, 1, -1, -1)
    assert torch.all(decode_bias(causal, state)[:, : state.fills[0]] == 0)


def test_a_mask_that_does_not_cover_the_cache_is_refused():
    state = shard(10)
    with pytest.raises(ValueError, match="covers 9 keys"):
        decode_bias(torch.ones(1, 1, 1, 9, dtype=torch.bool), state)
    with pytest.raises(ValueError, match="per-head masks"):
        decode_bias(torch.ones(1, 2, 1, 10, dtype=torch.bool), state)
