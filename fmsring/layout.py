"""Token layouts: which global token indices each ring rank owns.

Causal attention gives late tokens more work than early ones, so a contiguous
split leaves the last rank with ~2x the mean load. The zigzag layout cuts the
sequence into 2W chunks and gives rank r chunks r and 2W-1-r, which balances
causal work. Lengths need not divide evenly: chunk sizes differ by at most one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LAYOUTS = ("zigzag", "contiguous")


def _chunk_bounds(seq_len: int, n_chunks: int) -> list[tuple[int, int]]:
    """[start, end) of n_chunks near-equal chunks (the first ones one longer)."""
    base, extra = divmod(seq_len, n_chunks)
    bounds, start = [], 0
    for i in range(n_chunks):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _merge(segments: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Drop empty segments and join touching ones, so each is one kernel call."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(seg for seg in segments if seg[1] > seg[0]):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return tuple(out)


@dataclass(frozen=True)
class ShardPlan:
    """The token layout of one sequence of ``seq_len`` tokens over ``world_size`` ranks.

    ``segments[r]`` are the sorted, disjoint ``[start, end)`` ranges of global
    token indices that rank r holds, stored locally in that order.
    """

    seq_len: int
    world_size: int
    layout: str
    segments: tuple[tuple[tuple[int, int], ...], ...]
    # Worked out once here, not behind functools.cached_property, whose lock (Python 3.11) a
    # compiled decoder layer reading the plan (a short follow-up's) could not trace through.
    local_lens: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _calls: dict[tuple[int, int, int], tuple[BlockCall, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_lens", tuple(self.local_len(r) for r in range(self.world_size)))

    @classmethod
    def build(cls, seq_len: int, world_size: int, layout: str = "zigzag") -> ShardPlan:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown ring layout {layout!r}; choose one of {LAYOUTS}")
        if seq_len < world_size:
            raise ValueError(
                f"ring attention needs at least one token per rank: got a sequence of "
                f"{seq_len} tokens on {world_size} ranks"
            )
        if layout == "zigzag":
            chunks = _chunk_bounds(seq_len, 2 * world_size)
            per_rank = [[chunks[r], chunks[2 * world_size - 1 - r]] for r in range(world_size)]
        else:
            chunks = _chunk_bounds(seq_len, world_size)
            per_rank = [[chunks[r]] for r in range(world_size)]
        return cls(seq_len, world_size, layout, tuple(_merge(p) for p in per_rank))

    def local_len(self, rank: int) -> int:
        return sum(e - s for s, e in self.segments[rank])

    def indices(self, rank: int) -> list[int]:
        return [i for s, e in self.segments[rank] for i in range(s, e)]

    def index_tensor(self, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.indices(rank), dtype=torch.long, device=device)

    def tail_count(self, rank: int, n: int) -> int:
        """How many of the last ``n`` global tokens rank holds.

        In both layouts these are always a suffix of the rank's local tokens,
        so the model's own ``last_n_tokens`` narrowing picks them.
        """
        return sum(1 for i in self.indices(rank) if i >= self.seq_len - n)

    def owner(self, index: int) -> int:
        """The rank that holds global token ``index``."""
        for r, segs in enumerate(self.segments):
            if any(s <= index < e for s, e in segs):
                return r
        raise IndexError(f"token {index} is outside a sequence of {self.seq_len}")

    def offsets(self, rank: int) -> list[tuple[int, int, int]]:
        """(global start, global end, local offset) of each of rank's segments."""
        out, off = [], 0
        for s, e in self.segments[rank]:
            out.append((s, e, off))
            off += e - s
        return out

    def block_calls(self, rank: int, src: int, cached: int = 0) -> tuple[BlockCall, ...]:
        """The attention kernel calls of rank's queries against src's keys.

        src's keys are its ``cached`` tokens (a follow-up's cache shard, all
        earlier than every token of this plan) followed by its tokens of this
        plan, in that order. A rank's own tokens are stored in global order,
        so its own block is exactly causal over the local order: one causal
        call, after one unmasked call over its cache. Against another rank,
        segments are disjoint, so a key segment is wholly before a query
        segment (no mask) or wholly after it (skipped); the keys a query
        segment sees are a prefix of src's keys, so each query segment needs
        one unmasked call, and neighbouring query segments that see the same
        prefix share it.
        """
        key = (rank, src, cached)
        if key not in self._calls:
            calls: list[BlockCall] = []
            if src == rank:
                n = self.local_len(rank)
                if cached:
                    calls.append(BlockCall(0, n, 0, cached, False))
                calls.append(BlockCall(0, n, cached, cached + n, True))
            else:
                for qs, qe, qoff in self.offsets(rank):
                    prefix = cached + sum(e - s for s, e in self.segments[src] if e <= qs)
                    if not prefix:
                        continue
                    if calls and calls[-1].k_hi == prefix and calls[-1].q_hi == qoff:
                        calls[-1] = BlockCall(calls[-1].q_lo, qoff + qe - qs, 0, prefix, False)
                    else:
                        calls.append(BlockCall(qoff, qoff + qe - qs, 0, prefix, False))
            self._calls[key] = tuple(calls)
        return self._calls[key]


@dataclass(frozen=True)
class BlockCall:
    """Query rows [q_lo, q_hi) attend to key rows [k_lo, k_hi); causal if on the diagonal."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool
