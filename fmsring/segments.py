"""A padded batch's mask as what it is: causal attention within segments of each sequence.

FMS's ``pad_input_ids`` masks a left- (or right-) padded batch so that a
token sees the earlier tokens of its own segment only: the prompt's tokens
see the prompt, the pads see the pads. Read as an additive bias, that mask is
a [b, L, L] fp32 tensor cut into blocks, which only the memory-efficient
kernel (or the math path, for a causal block) can take. Read as segments, each
block call splits into one call per sequence and segment, each plain causal
or unmasked attention over contiguous rows and keys: the fast kernels, no
bias, and nothing of size L x L.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fmsring.kernels import attention_with_lse
from fmsring.layout import BlockCall

# rows of the mask compared at once when recognising it: bounds the scratch at ROWS x L per sequence
ROWS = 1024


@dataclass(frozen=True)
class Segments:
    """Per sequence of the batch, its segments' [start, end) sequence indices, in order, covering it."""

    bounds: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def of(cls, mask: torch.Tensor) -> Segments | None:
        """The segments whose causal attention ``mask`` (FMS's: bool, True = attend, or additive
        0 / -inf; [b, L, L] or [b, 1, L, L]) is exactly, or None where it is any other mask."""
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask.squeeze(1)
        if mask.dim() != 3 or mask.shape[1] != mask.shape[2]:
            return None

        b, n, _ = mask.shape
        diagonal = _allowed(mask.diagonal(-1, 1, 2))
        if diagonal is None:
            return None
        starts = torch.ones(b, n, dtype=torch.bool, device=mask.device)
        starts[:, 1:] = ~diagonal  # a token that does not see the one before starts a segment
        segment = starts.cumsum(1)
        for lo in range(0, n, ROWS):  # row blocks: no temporary of the mask's size
            rows = torch.arange(lo, min(lo + ROWS, n), device=mask.device)
            same = segment[:, rows, None] == segment[:, None, :]
            causal = torch.arange(n, device=mask.device) <= rows[:, None]
            block = _allowed(mask[:, lo : lo + ROWS])
            if block is None or not torch.equal(block, same & causal):
                return None
        bounds = []
        for first in starts.cpu():
            edges = [*first.nonzero().flatten().tolist(), n]
            bounds.append(tuple(zip(edges[:-1], edges[1:])))
        return cls(tuple(bounds))


def _allowed(block: torch.Tensor) -> torch.Tensor | None:
    """A mask block as bool (True = attend), or None where an additive value is neither 0 nor -inf."""
    if block.dtype == torch.bool:
        return block
    seen = block == 0
    return seen if bool((seen | (block == float("-inf"))).all()) else None


def segmented_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    calls: tuple[BlockCall, ...],
    segments: Segments,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
) -> Iterator[tuple[BlockCall, tuple[torch.Tensor, torch.Tensor]]]:
    """Each of ``calls`` attended within ``segments``: (call, its rows' (out, lse)), rows that see
    no key of the block as out 0, lse -inf; a call that gives no row a key is skipped.

    ``q_index``/``k_index``: the sequence indices of the rows of q and of k, v (host, ascending:
    a rank stores its tokens in sequence order), so a segment's rows and keys in a call are
    contiguous. A causal call is a rank's own block, whose rows are its keys: a segment's part of
    it is causal from the same first row and key, and any other call's part is unmasked.
    """
    for c in calls:
        qi, ki = q_index[c.q_lo : c.q_hi].contiguous(), k_index[c.k_lo : c.k_hi].contiguous()
        parts = []
        for seq, bounds in enumerate(segments.bounds):
            edges = torch.tensor([e for bound in bounds for e in bound])
            rows, keys = torch.searchsorted(qi, edges).view(-1, 2), torch.searchsorted(ki, edges).view(-1, 2)
            for (r0, r1), (k0, k1) in zip(rows.tolist(), keys.tolist()):
                if r0 == r1 or k0 == k1:
                    continue
                rq = q[seq : seq + 1, :, c.q_lo + r0 : c.q_lo + r1]
                kk, vv = (t[seq : seq + 1, :, c.k_lo + k0 : c.k_lo + k1] for t in (k, v))
                parts.append((seq, r0, r1, attention_with_lse(rq, kk, vv, scale, c.causal)))
        if not parts:
            continue
        first = parts[0][3][0]
        out = first.new_zeros((q.shape[0], q.shape[1], c.q_hi - c.q_lo, q.shape[3]))
        lse = torch.full(out.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        for seq, r0, r1, (part_out, part_lse) in parts:
            out[seq, :, r0:r1] = part_out[0]
            lse[seq, :, r0:r1] = part_lse[0]
        yield c, (out, lse)
