"""The exact merge of partial attention results.

Ring attention sees one K/V block at a time, so each block's softmax is
partial; carrying the log-sum-exp (lse) of every query row lets partial
results be combined exactly, in any order, in fp32. Every mode merges
through these functions (a decode step's chunks through their one-kernel form,
:func:`fmsring.decode_kernel.merge_chunks`).
"""

from __future__ import annotations

import torch

from fmsring.fusion import fused


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that saw no key) as 0, so exp(x - it) gives 0 instead of nan."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def merge_split(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks' partials [S, b, kvh, g, lq, (d)] merged into fp32 (out [b, h, lq, d], lse [b, h, lq]).

    The decode step merges its chunks in one Triton kernel that does this
    (:func:`fmsring.decode_kernel.merge_chunks`); this is its definition in
    torch, what its tests check it against, and the merge the step compiled
    before it (the baseline of ``scripts/decode_kernel_sweep.py``)."""
    _, b, kvh, g, lq, d = outs.shape
    total = torch.logsumexp(lses, dim=0)
    out = (outs.float() * torch.exp(lses - finite_lse(total)).unsqueeze(-1)).sum(dim=0)
    return out.reshape(b, kvh * g, lq, d), total.reshape(b, kvh * g, lq)


def merge_into(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """Fold one block's (out, lse) into the running (out, lse), in place, in fp32.

    out: [..., Lq, d], lse: [..., Lq]. Exact: the result equals attention over
    the union of both key sets, whatever the order blocks arrive in.
    """
    new_lse = torch.logaddexp(lse, blk_lse)
    ref = finite_lse(new_lse)
    out.mul_(torch.exp(lse - ref).unsqueeze(-1)).addcmul_(blk_out, torch.exp(blk_lse - ref).unsqueeze(-1))
    lse.copy_(new_lse)


def merge_pair(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial results merged in fp32, returned in out_a's dtype with their lse.

    When a query row only ever gets two partials, this is the whole merge:
    one fp32 computation and one rounding, as with an fp32 accumulator, but
    without one. :data:`merge_pair_auto` runs it as one fused kernel on CUDA.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    ref = finite_lse(lse)
    out = out_a.float() * torch.exp(lse_a - ref).unsqueeze(-1) + out_b.float() * torch.exp(lse_b - ref).unsqueeze(-1)
    return out.to(out_a.dtype), lse


def merge_stacked(outs: torch.Tensor, lses: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Merge partial results stacked on dim 0 (one per rank) into one output,
    in ``dtype`` (default: the outs' dtype).

    outs: [W, ..., Lq, d], lses: [W, ..., Lq]. Every rank merges the same
    stack in the same order, so all ranks get bit-identical results.
    """
    total = torch.logsumexp(lses, dim=0)
    ref = finite_lse(total)
    return (outs * torch.exp(lses - ref).unsqueeze(-1)).sum(dim=0).to(dtype or outs.dtype)


def pack_partial(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(out [..., d], lse [...]) as one fp32 tensor [..., d + 1]: what one
    collective carries so a decode step's shards can be merged."""
    return torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1)


# One fused kernel each on CUDA; a decode step is mostly one small kernel after another.
merge_pair_auto = fused(merge_pair)
merge_stacked_auto = fused(merge_stacked)
pack_partial_auto = fused(pack_partial)
