"""Split-KV plans (pure torch): chunks in whole tiles that follow the fill, enough of them to fill the GPU."""

import pytest
import torch

from fmsring.split_kv import decode_splits, split_kv_chunks


def test_split_kv_chunks_follow_the_fill_in_whole_tiles():
    """200 filled slots in 3 chunks: tiles of 64, so chunks of 128, 72 and nothing -- not the
    capacity's thirds, which would leave chunks past the fill with nothing to read while the
    others read more."""
    starts, used = split_kv_chunks(torch.tensor([200, 64, 0], dtype=torch.int32), 3)
    assert starts.tolist() == [0, 128, 256, 0, 64, 128, 0, 0, 0]
    assert used.tolist() == [128, 72, 0, 64, 0, 0, 0, 0, 0]
    # a window that hides the first 70 and 10 slots: the chunks start after them, still whole tiles
    starts, used = split_kv_chunks(torch.tensor([200, 64], dtype=torch.int32), 3, torch.tensor([70, 10]))
    assert starts.tolist() == [70, 134, 198, 10, 74, 138]
    assert used.tolist() == [64, 64, 2, 54, 0, 0]
    with pytest.raises(ValueError, match="cannot cut a cache into 0 chunks"):
        split_kv_chunks(torch.tensor([5], dtype=torch.int32), 0)


def test_decode_splits_fill_the_gpu_without_tiny_chunks():
    assert decode_splits(1, 8, 131072, 132) == 16  # 16 x 8 programs: one per SM, none with two
    assert decode_splits(1, 2, 131072, 132) == 66
    assert decode_splits(4, 8, 131072, 132) == 4
    assert decode_splits(40, 8, 131072, 132) == 1  # more programs than SMs unsplit: no chunks
    assert decode_splits(1, 8, 2048, 132) == 4  # no chunk under MIN_SPLIT_SLOTS
    assert decode_splits(64, 8, 131072, 132) == 1
    assert decode_splits(1, 8, 100, 132) == 1
