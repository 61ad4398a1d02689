"""Split-KV plans: how a decode step cuts each cache shard into chunks that
programs of fmsring's decode kernel (:mod:`fmsring.decode_kernel`) read in
parallel. Pure torch, so a plan is made (and tested) without Triton."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


MIN_SPLIT_SLOTS = 512  # a chunk shorter than this costs more in its partial than it gains in parallelism
TILE_SLOTS = 64  # cache slots per tile of the decode kernel, which reads this: chunks are whole tiles


def decode_splits(batch: int, kv_heads: int, capacity: int, sms: int) -> int:
    """How many chunks a decode step cuts each cache shard into.

    The decode kernel's grid is one program per (sequence, kv-head) and
    chunk: 8 programs for LLaMA-3-8B at batch 1 without chunks, on a GPU of
    132 SMs. Chunks multiply the programs up to one per SM, rounded down, with
    no chunk under :data:`MIN_SPLIT_SLOTS` of the capacity. Down, because
    every program reads as much: rounded up (17 chunks of 8 kv-heads on 132
    SMs) a few SMs run two programs and the step waits for them
    (``scripts/decode_kernel_sweep.py``; docs/performance.md, Decode).
    """
    wanted = sms // max(batch * kv_heads, 1)
    return max(1, min(wanted, capacity // MIN_SPLIT_SLOTS))


def split_kv_chunks(
    kv_lens: torch.Tensor, splits: int, first: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's first ``kv_lens[i]`` cache slots cut into ``splits`` chunks of whole
    :data:`TILE_SLOTS` tiles, as equal as that allows: (starts [b*splits], a chunk's first slot in
    its sequence's cache, and used [b*splits], how many slots it reads), both int32. Chunks follow
    the fill, not the capacity, so every chunk has work until the last tiles run out; the ones past
    them have nothing to read (used 0). ``first`` [b] skips each sequence's slots before
    ``first[i]``: a sliding window shows only the fill's last slots, so a windowed layer's step
    reads those alone, not the shard."""
    if splits < 1:
        raise ValueError(f"cannot cut a cache into {splits} chunks")
    lens = kv_lens.to(torch.int64).unsqueeze(1)
    lo = 0 if first is None else first.to(torch.int64).unsqueeze(1)
    chunk = (lens - lo + splits * TILE_SLOTS - 1) // (splits * TILE_SLOTS) * TILE_SLOTS
    starts = lo + torch.arange(splits, device=kv_lens.device, dtype=torch.int64) * chunk
    used = (lens - starts).clamp(min=0).minimum(chunk)
    return starts.reshape(-1).to(torch.int32), used.reshape(-1).to(torch.int32)


class SplitKV(NamedTuple):
    """How split-KV decoding reads the caches of ``batch`` sequences: each sequence's chunks,
    :func:`split_kv_chunks`' ``starts`` and ``used``. Every layer of a decode step has the same
    cache fill, so one plan, made before the layers, serves them all.

    The chunk count is no field of its own but the length of ``used`` per sequence: a
    compiled decoder layer then sees it as a tensor size, which dynamic shapes may vary,
    instead of a Python int that every new value recompiles."""

    batch: int
    starts: torch.Tensor
    used: torch.Tensor

    @property
    def splits(self) -> int:
        return self.used.shape[0] // self.batch

    def from_slot(self, kv_lens: torch.Tensor, first: torch.Tensor) -> SplitKV:
        """As many chunks over slots ``first[i]`` to ``kv_lens[i]`` only (:func:`split_kv_chunks`)."""
        return SplitKV(self.batch, *split_kv_chunks(kv_lens, self.splits, first))


def split_kv(kv_lens: torch.Tensor, splits: int) -> SplitKV:
    """The plan for caches filled to ``kv_lens`` [b], cut into ``splits`` chunks each."""
    return SplitKV(kv_lens.shape[0], *split_kv_chunks(kv_lens, splits))
