"""The ring primitives every sharded attention mode is built from.

One ring loop (:func:`ring_blocks`): each rank's block travels to the next
rank while the block in hand is computed, so a pass of W steps hides the
transfers under the attention. Prefill's pass-KV, a follow-up's pass-KV and
its pass-Q all iterate it; :class:`Partials` merges what each block gives a
query row, and :func:`merge_shards` merges the partials of steps whose queries
every rank holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from fmsring.comm import RingComm
from fmsring.kernels import attention_with_lse, empty_partial
from fmsring.layout import ShardPlan
from fmsring.merge import merge_into, merge_pair_auto, merge_stacked_auto, pack_partial_auto
from fmsring.segments import Segments, segmented_blocks
from fmsring.windows import LayerAttention, windowed_blocks

# torch has named this collective both ways; take the one this torch has.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


class RingBuffers:
    """Flat scratch buffers for one forward's ring exchanges, allocated on the
    first layer (sized for the largest block any rank sends) and reused by
    every layer, so a 32-layer forward allocates them once (twice where a
    windowed layer's pass-Q comes before a full layer's larger pass-KV)."""

    def __init__(self) -> None:
        self._flat: dict[int, torch.Tensor] = {}

    def get(self, index: int, shape: tuple[int, ...], capacity: int, like: torch.Tensor) -> torch.Tensor:
        """Buffer ``index`` (of ``capacity`` elements, like ``like``) viewed as ``shape``."""
        if index not in self._flat or self._flat[index].numel() < capacity:
            self._flat[index] = like.new_empty(capacity)
        return self._flat[index][: math.prod(shape)].view(shape)


def ring_blocks(
    comm: RingComm,
    block: torch.Tensor,
    buffers: RingBuffers,
    shape_from: Callable[[int], tuple[int, ...]],
    capacity: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (source rank, its block) for every rank, this rank's own first.

    While the caller computes on a block, the next one is already on its way
    (received into one of two alternating ``buffers``, ``capacity`` elements
    each; ``shape_from(src)`` is src's block shape), and it is waited for
    only when the caller asks for it. The caller must consume every block:
    an exchange left in flight would be read half-received.
    """
    world, rank = comm.world_size, comm.rank
    for step in range(world):
        src = (rank - step) % world
        last = step + 1 == world
        if not last:
            incoming = buffers.get(step % 2, shape_from((src - 1) % world), capacity, block)
            comm.send_recv(block, incoming)
        yield src, block
        if not last:
            comm.wait()
            block = incoming


class Partials:
    """The running (out, lse) of every local query row during one ring pass.

    A row's first partial is stored as is. When no row gets more than two
    partials (``pairwise``), the second is merged straight into the query
    dtype by :func:`fmsring.merge.merge_pair` -- one fp32 computation, one
    rounding -- so no fp32 accumulator is held or streamed through; otherwise
    an fp32 accumulator takes any number of merges. Rows that no key reaches
    read as "no contribution" (out 0, lse -inf).
    """

    def __init__(self, q: torch.Tensor, pairwise: bool):
        self.shape, self.pairwise = q.shape, pairwise
        self.like = q
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self.written: list[tuple[int, int]] = []
        if not pairwise:
            self.out, self.lse = empty_partial(q)

    def add(self, lo: int, hi: int, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
        fresh = all(hi <= a or lo >= b for a, b in self.written)
        self.written.append((lo, hi))
        whole = lo == 0 and hi == self.shape[2]
        if self.out is None:
            if whole:
                self.out, self.lse = blk_out, blk_lse
                return
            out, self.lse = empty_partial(self.like)
            self.out = out.to(blk_out.dtype)
        assert self.lse is not None
        rows = slice(lo, hi)
        if fresh:
            self.out[:, :, rows].copy_(blk_out)
            self.lse[:, :, rows].copy_(blk_lse)
        elif self.pairwise:
            out, lse = merge_pair_auto(self.out[:, :, rows], self.lse[:, :, rows], blk_out, blk_lse)
            if whole:
                self.out, self.lse = out, lse
            else:
                self.out[:, :, rows].copy_(out)
                self.lse[:, :, rows].copy_(lse)
        else:
            merge_into(self.out[:, :, rows], self.lse[:, :, rows], blk_out, blk_lse)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [b, h, L, d], lse [b, h, L] fp32); empty rows as "no contribution"."""
        if self.out is None:
            return empty_partial(self.like)
        assert self.lse is not None
        return self.out, self.lse


def pass_kv(
    q: torch.Tensor,
    kv: torch.Tensor,
    plan: ShardPlan,
    cached: tuple[int, ...],
    comm: RingComm,
    buffers: RingBuffers,
    scale: float,
    layer: LayerAttention,
    bias_blocks: list[torch.Tensor | None] | None = None,
    seq_index: list[torch.Tensor] | None = None,
    segments: Segments | None = None,
    bands: dict | None = None,
) -> torch.Tensor:
    """Attention of this rank's queries q [b, h, Lq, d] over every rank's keys,
    the K/V blocks travelling around the ring while the block in hand is computed.

    kv [2, b, kvh, cached[rank] + Lq, d] is this rank's keys and values: its
    ``cached`` tokens (a follow-up's cache shard; 0 for a prefill) then its
    tokens of ``plan``. Only kv-heads travel (GQA is never expanded), heads
    before tokens, which is the layout cuDNN reads fastest. ``bias_blocks``
    (a prefill with a user mask) is the additive mask of the queries against
    each rank's keys, None where fully masked; ``segments`` (a prefill with a
    padded batch's mask, :mod:`fmsring.segments`) the same mask as causal
    attention within segments, attended without a bias. ``layer``'s sink joins
    the merge; its window skips the blocks it hides and masks those it
    straddles (its tiles kept in ``bands`` for the next window layer). Both need
    ``seq_index`` (a prefill's only: ``seq_index[r]`` are rank r's tokens'
    sequence indices, on the host). Returns out [b, h, Lq, d].
    """
    _, b, kvh, _, d = kv.shape
    rank = comm.rank
    indexed = layer.window or segments is not None
    assert not indexed or (seq_index is not None and not any(cached)), "a window or segments need every key's index"
    assert not (layer.window and segments is not None), "a windowed layer takes a padded batch's mask as bias blocks"
    index = seq_index or [None] * comm.world_size
    capacity = 2 * b * kvh * d * max(c + n for c, n in zip(cached, plan.local_lens))
    # at most two partials a row; a window's straddled block may come in pieces (windows.flash_windowed)
    pairwise = comm.world_size <= 2 and not any(cached) and bias_blocks is None and not layer.window
    pairwise = pairwise and layer.sinks is None
    acc = Partials(q, pairwise=pairwise)
    shape_from = lambda src: (2, b, kvh, cached[src] + plan.local_len(src), d)  # noqa: E731
    for src, block in ring_blocks(comm, kv, buffers, shape_from, capacity):
        if bias_blocks is not None:
            bias = bias_blocks[src]
            if bias is not None:
                if layer.window:
                    bias = bias + layer.bias(seq_index[rank].to(q.device), seq_index[src].to(q.device))
                acc.add(0, q.shape[2], *attention_with_lse(q, block[0], block[1], scale, bias=bias))
            continue
        calls = plan.block_calls(rank, src, cached[src])
        if segments is not None:
            blocks = segmented_blocks(q, block[0], block[1], scale, calls, segments, index[rank], index[src])
        else:
            blocks = windowed_blocks(q, block[0], block[1], scale, calls, layer, index[rank], index[src], bands)
        for c, blk in blocks:
            acc.add(c.q_lo, c.q_hi, *blk)
    return layer.add_sink(*acc.result())[0]


def heads_major(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """K/V [b, L, kvh, d] (FMS's and the cache's layout) packed as one [2, b, kvh, L, d] tensor, what the ring sends."""
    b, n, kvh, d = keys.shape
    kv = keys.new_empty(2, b, kvh, n, d)
    kv[0].copy_(keys.transpose(1, 2))
    kv[1].copy_(values.transpose(1, 2))
    return kv


def to_query_layout(out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """[b, h, L, d] (any float dtype) -> [b, L, h, d] contiguous in the query's dtype.

    cuDNN writes its output in the query's memory layout, which already is
    [b, L, h, d]: then this is a view, not a copy of the whole output.
    """
    view = out.transpose(1, 2)
    if view.dtype == query.dtype and view.is_contiguous():
        return view
    return torch.empty_like(query).copy_(view)


def merge_shards(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, comm: RingComm) -> torch.Tensor:
    """Every rank's partial (out [b, h, n, d], lse) merged on every rank, [b, n, h, d] in query's dtype.

    Every rank merges the same stack in the same order, so all ranks get
    bit-identical results.
    """
    if comm.world_size > 1:
        packed = pack_partial_auto(out, lse)
        stacked = packed.new_empty((comm.world_size * packed.shape[0], *packed.shape[1:]))
        _all_gather_single(stacked, packed, group=comm.group)
        stacked = stacked.view(comm.world_size, *packed.shape)
        out = merge_stacked_auto(stacked[..., :-1], stacked[..., -1], query.dtype)
    return to_query_layout(out, query)
