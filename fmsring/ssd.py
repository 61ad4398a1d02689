"""Mamba2's scan in its chunked form (the state-space dual), the math of FMS's own.

FMS's ``SSM`` computes the scan chunk by chunk as Mamba2 defines it, but
forms every product before summing it: [chunk, chunk, heads, state] and
[chunk, chunk, heads, head_dim] fp32 per chunk, about 25 MB a token at
Bamba-9.8B's shapes (an 8K-token prompt asks for 128 GiB). Here each product
is a contraction (:func:`torch.einsum`, batched matmuls), so what a token holds
is a few [heads, chunk] fp32 rows (:data:`SCRATCH_PER_TOKEN`) and the work is
matmuls. The chunks, the decays (FMS's ``segment_sum``) and the order of the
four terms are FMS's, so the result is FMS's within fp32 rounding.
"""

from __future__ import annotations

import torch
from fms.modules.ssm import segment_sum
from torch.nn import functional as F

# fp32 values of [heads, chunk] a token holds at once during the scan: the within-chunk decays
# (segment_sum's expand, cumsum and mask, their exp) and the decayed scores
SCRATCH_PER_TOKEN = 5


def chunked_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scan h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t from a zero state.

    Args:
        x: [b, n, heads, head_dim] fp32, the scan's inputs.
        dt: [b, n, heads], each token's time step (after softplus and clamp).
        A: [heads] fp32, negative.
        B, C: [b, n, groups, state] fp32; heads share their group's.
        chunk: tokens per chunk (the model's ``chunk_size``).

    Returns:
        y [b, n, heads, head_dim] fp32 (without the D skip), the final state
        [b, heads, head_dim, state] fp32, and the decay sum_{s<=t} A dt_s
        [b, n, heads] fp32.
    """
    b, n, h, p = x.shape
    g, s = B.shape[2:]
    r, pad = h // g, -n % chunk
    c = (n + pad) // chunk

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [b, n, ...] -> [b, c, chunk, ...], zeros after the end
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).view(b, c, chunk, *t.shape[2:])

    a = A * dt
    decay = a.cumsum(1)
    xdt = chunks(x * dt[..., None])  # [b, c, l, h, p]
    ac = chunks(a).permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cum = ac.cumsum(-1)
    Bc, Cc = chunks(B), chunks(C)  # [b, c, l, g, s]
    # 1. within each chunk: scores C_l . B_s, decayed from s to l, applied to x dt
    within = torch.exp(segment_sum(ac)).view(b, g, r, c, chunk, chunk).permute(0, 3, 1, 2, 4, 5)
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc).unsqueeze(3) * within  # [b, c, g, r, l, s]
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores, xdt.view(b, c, chunk, g, r, p))
    del within, scores
    # 2. each chunk's final state from a zero start
    to_end = torch.exp(a_cum[..., -1:] - a_cum).permute(0, 2, 3, 1)  # [b, c, l, h]
    states = torch.einsum("bclgn,bclgrp->bcgrpn", Bc, (xdt * to_end[..., None]).view(b, c, chunk, g, r, p))
    # 3. the states chained across chunks: each chunk's incoming state, and the last one's outgoing
    across = torch.exp(segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # [b, h, c + 1, c + 1]
    states = torch.cat([states.new_zeros(b, 1, h, p, s), states.view(b, c, h, p, s)], dim=1)
    states = torch.einsum("bhzc,bchpn->bzhpn", across, states)
    incoming, final = states[:, :-1], states[:, -1]
    # 4. each token's share of its chunk's incoming state
    from_start = torch.exp(a_cum).permute(0, 2, 3, 1).reshape(b, c, chunk, g, r, 1)
    y += torch.einsum("bclgn,bcgrpn->bclgrp", Cc, incoming.reshape(b, c, g, r, p, s)) * from_start
    return y.reshape(b, c * chunk, h, p)[:, :n], final, decay
