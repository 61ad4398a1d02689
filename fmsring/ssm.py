"""Mamba2 layers (FMS's ``SSM``, as in Bamba) on a sharded sequence, exactly.

A Mamba2 layer is a depthwise causal conv over ``xBC`` (its kernel's last
K-1 inputs reach back past a shard's first token) and a linear scan whose
state h [b, heads, head_dim, state] runs along the whole sequence:
h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t, read out as y_t = C_t . h_t + D x_t.
Both carry across shards in closed form, so each rank runs FMS's forward
(its scan in contracted form, :mod:`fmsring.ssd`) on each of its segments (a
zigzag rank holds two, apart; a segment longer than the scan's memory budget
is cut into pieces, :func:`piece_len`) and adds what the rest of the sequence
contributes:

* **conv halo**: every segment's last K pre-conv ``xBC`` columns are
  all-gathered; a segment's conv then runs on the last K-1 columns before it,
  in sequence order (a short segment passes its own columns on), instead of
  FMS's zero padding;
* **state**: FMS's scan from a zero state gives each segment's final state
  h0; with its total decay exp(sum A dt) a segment maps an incoming state
  h_in to exp(sum A dt) h_in + h0. These are all-gathered and chained in
  sequence order, so each segment learns its h_in, whose share of y_t is
  exp(sum_{s<=t} A dt_s) C_t . h_in: added to FMS's y before the gated norm,
  which is not linear.

Every rank then also holds the whole sequence's final state and conv window
(FMS's ``SSMCacheUnit``, kept in the ring's cache beside the sharded K/V): a
one-token step runs FMS's own recurrence on it, identically on every rank; a
follow-up is sharded like a prompt, going on from that state and window; a
step every rank computes whole (too short to shard) is one segment on each.
A padding mask is refused: FMS zeroes pads' states by a mask convention the
ring does not pass its Mamba2 layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fms.models.bamba import BambaBlock
from fms.modules.ssm import SSM, SSMCacheUnit
from torch import nn
from torch.nn import functional as F

from fmsring.comm import all_gather_padded
from fmsring.layout import ShardPlan
from fmsring.ssd import SCRATCH_PER_TOKEN, chunked_scan


@dataclass(frozen=True)
class ShardedScan:
    """A forward's token layout (a prompt's or a follow-up's): every SSM layer in it runs on
    ``rank``'s segments of ``plan``, exchanging over ``group``."""

    plan: ShardPlan
    rank: int
    group: dist.ProcessGroup | None

    @classmethod
    def whole(cls, seq_len: int) -> ShardedScan:
        """Every token on this rank (a replicated step): one segment, nothing exchanged."""
        return cls(ShardPlan.build(seq_len, 1), 0, None)


# The scan the SSM layers run on, set by sharded(); None outside it (a one-token step). A module
# global, not a ContextVar: a decode step's Mamba2 block is compiled whole (fmsring.fusion), and
# dynamo traces a global read (guarding on it) where a ContextVar's .get() breaks the graph.
_SCAN: ShardedScan | None = None


@contextmanager
def sharded(scan: ShardedScan) -> Iterator[None]:
    """Run the SSM layers of the forwards inside on ``scan``'s shards: FMS's Bamba block passes its
    SSM only the mask, not the attention kwargs that carry the mode."""
    global _SCAN
    outer, _SCAN = _SCAN, scan
    try:
        yield
    finally:
        _SCAN = outer


def has_ssm(model: nn.Module) -> bool:
    """Whether ``model`` has Mamba2 layers."""
    return any(isinstance(m, SSM) for m in model.modules())


def make_ring(model: nn.Module) -> None:
    """Make every FMS ``SSM`` of ``model`` a :class:`RingSSM`, in place."""
    for m in model.modules():
        if type(m) is SSM:
            m.__class__ = RingSSM


def zero_states(model: nn.Module, batch: int, like: torch.Tensor) -> list[SSMCacheUnit | None]:
    """Per decoder layer of a Bamba model, in order, a zero Mamba2 state (as FMS's first call with
    a cache makes them; dtype and device of ``like``), or None for an attention layer."""
    return [
        _zero_unit(m.ssm, batch, like.dtype, like.device) if m.is_mamba_layer else None
        for m in model.modules()
        if isinstance(m, BambaBlock)
    ]


def _zero_unit(ssm: SSM, batch: int, dtype: torch.dtype, device: torch.device) -> SSMCacheUnit:
    expand = ssm.intermediate_size / ssm.emb_dim
    return SSMCacheUnit(
        ssm.emb_dim, ssm.nheads, ssm.head_dim, ssm.conv_kernel_size, expand, ssm.n_groups, ssm.ssm_state_size,
        batch, dtype, str(device),
    )  # fmt: skip


class RingSSM(SSM):
    """FMS's ``SSM``: its own forward, or, inside :func:`sharded`, this rank's segments with the
    conv halo and the incoming state of the rest of the sequence."""

    def forward(self, input_states, mask, past_key_value_state=None, cache_position=None, **kwargs):
        if _SCAN is not None:
            return _sharded_forward(self, _SCAN, input_states, past_key_value_state)
        unit = past_key_value_state
        conv_state = None if unit is None else unit.conv_state
        out = super().forward(input_states, mask, unit, cache_position, **kwargs)
        if conv_state is not None and unit.conv_state is not conv_state:
            # FMS's one-token step rebinds the unit's conv window to a rolled copy; written back
            # into the unit's own buffer, every state stays at one address, so a captured decode
            # step (fmsring.decode_graph) advances them on each replay
            conv_state.copy_(unit.conv_state)
            unit.conv_state = conv_state
        return out


# The scan holds a few [heads, chunk] fp32 rows a token (fmsring.ssd): a segment longer than this
# budget allows (13K tokens at Bamba-9.8B's shapes) runs in pieces, each passing its state on to the
# next exactly as segments on different ranks do.
SCAN_SCRATCH_BYTES = 8 * 2**30


def piece_len(ssm: SSM) -> int:
    """The most tokens the scan runs at once within :data:`SCAN_SCRATCH_BYTES` (whole chunks, at least one)."""
    per_token = SCRATCH_PER_TOKEN * ssm.nheads * ssm.chunk_size * 4
    return max(1, SCAN_SCRATCH_BYTES // (per_token * ssm.chunk_size)) * ssm.chunk_size


def _segments(plan: ShardPlan, rank: int, piece: int) -> list[tuple[int, int, int]]:
    """(global start, length, local offset) of each of ``rank``'s segments, cut into pieces of at
    most ``piece`` tokens (an empty segment stays one, of none)."""
    return [
        (s + i, min(piece, e - s - i), off + i)
        for s, e, off in plan.offsets(rank)
        for i in range(0, max(e - s, 1), piece)
    ]


def _gather(t: torch.Tensor, scan: ShardedScan, slots: int) -> list[torch.Tensor]:
    """Every rank's ``t`` (its segments along dim 0, at most ``slots``), by rank."""
    if scan.plan.world_size == 1:
        return [t]
    return all_gather_padded(t, 0, scan.group, slots)


def _by_sequence(
    pieces: list[list[tuple[int, int, int]]], parts: list[torch.Tensor]
) -> list[tuple[int, int, torch.Tensor]]:
    """(start, length, tensor) of every piece of the sequence, in sequence order: ``pieces[r]`` are
    rank r's (:func:`_segments`), ``parts[r]`` its tensors, one per piece."""
    segs = [(s, n, part[i]) for mine, part in zip(pieces, parts) for i, (s, n, _) in enumerate(mine)]
    return sorted(segs, key=lambda seg: seg[0])


def _sharded_forward(ssm: SSM, scan: ShardedScan, x: torch.Tensor, unit: SSMCacheUnit | None):
    """The layer's output on this rank's tokens of ``scan``, the sequence going on from ``unit``'s
    state and conv window (a cache's; zeros for a prompt), which then hold the sequence's end."""
    k = ssm.conv_kernel_size
    b = x.shape[0]
    window = torch.zeros(b, ssm.conv_dim, k, dtype=x.dtype, device=x.device) if unit is None else unit.conv_state
    pieces = [_segments(scan.plan, r, piece_len(ssm)) for r in range(scan.plan.world_size)]
    mine, slots = pieces[scan.rank], max(len(p) for p in pieces)
    # 1. every segment's last k pre-conv columns (left-padded with zeros when shorter), all ranks'
    tails = torch.stack([_conv_input(ssm, x[:, max(off, off + n - k) : off + n], k) for _, n, off in mine])
    everyone = _by_sequence(pieces, _gather(tails, scan, slots))

    def before(start: int, width: int) -> torch.Tensor:
        """The ``width`` pre-conv columns before sequence index ``start`` (the window's before the first)."""
        cols = [t[..., k - min(n, k) :] for s, n, t in everyone if s < start]
        return torch.cat([window.to(tails.dtype), *cols], dim=-1)[..., -width:]

    # 2. FMS's forward on each segment from a zero state, its conv on the halo
    runs = [_run_segment(ssm, x[:, off : off + n], before(s, k - 1)) for s, n, off in mine]
    # 3. every segment's (final state from zero, total decay), chained in sequence order
    finals = torch.stack([torch.cat([r.state.flatten(1), r.decay[:, -1]], dim=1) for r in runs])
    h = torch.zeros_like(runs[0].state) if unit is None else unit.ssm_state.float()
    incoming = {}
    for s, _, packed in _by_sequence(pieces, _gather(finals, scan, slots)):
        incoming[s] = h
        state, decay = packed[:, : h[0].numel()].reshape(h.shape), packed[:, h[0].numel() :]
        h = decay.exp()[..., None, None] * h + state
    # 4. each token's share of its segment's incoming state, added before the gated norm
    outs = [
        ssm.out_proj(ssm.norm(r.y + r.readout(incoming[s]), r.gate).to(x.dtype)) for (s, _, _), r in zip(mine, runs)
    ]
    if unit is not None:  # the whole sequence's state and conv window, on every rank, for decode
        unit.ssm_state.copy_(h)
        unit.conv_state.copy_(before(scan.plan.seq_len, k))
    return torch.cat(outs, dim=1), unit


def _conv_input(ssm: SSM, x: torch.Tensor, k: int) -> torch.Tensor:
    """The pre-conv ``xBC`` [b, conv_dim, k] of tokens ``x`` (at most k), left-padded with zeros."""
    xbc = ssm.in_proj(x)[..., ssm.intermediate_size : ssm.intermediate_size + ssm.conv_dim].transpose(1, 2)
    return F.pad(xbc, (k - xbc.shape[-1], 0))


@dataclass
class _Segment:
    """What FMS's forward computed on one segment from a zero state."""

    y: torch.Tensor  # [b, n, heads * head_dim] fp32: the scan's output with D's skip, before the gated norm
    gate: torch.Tensor
    C: torch.Tensor  # [b, n, groups, state] fp32: each group's heads read through it
    decay: torch.Tensor  # [b, n, heads]: sum of A dt over the segment up to each token
    state: torch.Tensor  # [b, heads, head_dim, state] fp32: the final state from zero

    def readout(self, h_in: torch.Tensor) -> torch.Tensor:
        """The incoming state's share of y: exp(decay_t) C_t . h_in, [b, n, heads * head_dim]."""
        b, heads, p, n = h_in.shape
        grouped = h_in.reshape(b, self.C.shape[2], heads // self.C.shape[2], p, n)
        y = torch.einsum("bgrpn,blgn->blgrp", grouped, self.C).reshape(b, -1, heads, p)
        return (y * self.decay.exp()[..., None]).flatten(2)


def _run_segment(ssm: SSM, x: torch.Tensor, halo: torch.Tensor) -> _Segment:
    """FMS's ``SSM.forward`` on ``x`` from a zero state, up to its gated norm (which runs later, on
    y plus the incoming state's share), with two changes: its conv reads ``halo`` (the k-1 pre-conv
    columns before the segment) instead of zeros, and its scan is :func:`fmsring.ssd.chunked_scan`,
    the same math in a few rows a token instead of FMS's ~25 MB."""
    b, n, _ = x.shape
    grouped = ssm.n_groups * ssm.ssm_state_size
    gate, xbc, dt = ssm.in_proj(x).split([ssm.intermediate_size, ssm.conv_dim, ssm.nheads], dim=-1)
    conv = ssm.conv1d
    xbc = F.conv1d(
        torch.cat([halo.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1), conv.weight, conv.bias, groups=conv.groups
    )
    xs, B, C = ssm.act(xbc.transpose(1, 2)).split([ssm.intermediate_size, grouped, grouped], dim=-1)
    dt = F.softplus(dt + ssm.dt_bias).clamp(*ssm.time_step_limit)
    xs = xs.reshape(b, n, ssm.nheads, ssm.head_dim).float()
    B, C = (t.reshape(b, n, ssm.n_groups, ssm.ssm_state_size).float() for t in (B, C))
    y, state, decay = chunked_scan(xs, dt, -torch.exp(ssm.A_log.float()), B, C, ssm.chunk_size)
    y = y + ssm.D[..., None] * xs
    return _Segment(y.reshape(b, n, -1), gate, C, decay, state)
