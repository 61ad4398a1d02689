"""Attention sinks and sliding windows, the two things a layer may add to causal attention.

FMS passes both to a layer's attention op when the layer has sinks
(``SinkAttentionKwargs``: gpt-oss and Granite-SWA, every layer with sinks, every
other one with a window). Its math op (``sdpa_with_sinks``) defines them:

* a **sink** is one more logit per head in every query's softmax, with no
  value vector: it takes a share of the weight and gives nothing back. In
  log-sum-exp form it is one more partial result -- out 0, lse = the sink --
  so it merges exactly like a block of keys, once per query row, wherever
  that row's partials meet (:meth:`LayerAttention.add_sink`);
* a **window** w lets the query at sequence index i see the keys at indices
  i - w < j <= i: w keys, itself included. Indices count cache slots, pads
  included, not position ids. A block of keys wholly before every query's
  window is skipped, one wholly inside is attended as if there were no
  window, and only one it straddles gets a mask (:meth:`LayerAttention.sees`,
  :meth:`LayerAttention.bias`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fmsring.kernels import attention_with_lse, flash_window_with_lse, takes_flash_window
from fmsring.layout import BlockCall

Seen = Literal["all", "none", "some"]


@dataclass(frozen=True)
class LayerAttention:
    """One layer's sinks (this rank's heads' logits, [h], or None) and window (0: none)."""

    sinks: torch.Tensor | None = None
    window: int = 0

    @classmethod
    def of(cls, kwargs: dict[str, Any]) -> LayerAttention:
        """What FMS passed the op (``sinks``, ``sliding_window``; absent for layers without sinks)."""
        return cls(kwargs.get("sinks"), kwargs.get("sliding_window") or 0)

    def add_sink(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A partial result (out [b, h, L, d], lse [b, h, L]) with the sink merged in: out in fp32.

        Merging (0, sink) scales out by exp(lse) / (exp(lse) + exp(sink)),
        i.e. sigmoid(lse - sink): a row that saw no key stays 0.
        """
        if self.sinks is None:
            return out, lse
        sink = self.sinks.float().view(1, -1, 1)
        return out.float() * torch.sigmoid(lse - sink).unsqueeze(-1), torch.logaddexp(lse, sink.expand_as(lse))

    def sees(self, q_first: int, q_last: int, k_first: int, k_last: int) -> Seen:
        """Whether queries at sequence indices ``q_first..q_last`` see keys at ``k_first..k_last``
        (both ascending, inclusive) through the window: all of them, none, or some (the block
        needs :meth:`bias`). Causality is the caller's: this is the window alone."""
        if not self.window or k_first > q_last - self.window:
            return "all"
        if k_last <= q_first - self.window:
            return "none"
        return "some"

    def bias(self, q_index: torch.Tensor, k_index: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Additive fp32 [1, Lq, Lk]: 0 where the query at ``q_index`` [Lq] sees the key at
        ``k_index`` [Lk] through the window, -inf where the key is too far back (or, ``causal``,
        after the query)."""
        q, k = q_index.unsqueeze(1), k_index.unsqueeze(0)
        hidden = (k <= q - self.window) | (k > q) if causal else k <= q - self.window
        return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf")).unsqueeze(0)


@dataclass(frozen=True)
class Band:
    """A straddled block cut into tiles of query rows, each with only the keys its rows can see.

    ``rows`` [n, tile]: each tile's query rows (the last one repeated to fill the last tile),
    ``cols`` [n, span]: each tile's key rows, ``bias`` [n, tile, span]: additive fp32, 0 where
    the query sees the key (within the window, not after it), -inf elsewhere and on the
    padding columns of tiles that see fewer than ``span`` keys.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    bias: torch.Tensor


def band(layer: LayerAttention, q_index: torch.Tensor, k_index: torch.Tensor, device: torch.device | str) -> Band:
    """The tiles of a block that ``layer``'s window straddles (queries at sequence indices
    ``q_index``, keys at ``k_index``: host, ascending). A tile of t query rows sees at most
    t + w - 1 keys, so with t about w the block costs ~2w keys per query, not its width."""
    w, lq = layer.window, len(q_index)
    tile = min(-(-lq // 32) * 32, -(-max(w, 64) // 32) * 32)
    rows = torch.arange(-(-lq // tile) * tile).clamp_max(lq - 1).view(-1, tile)
    qi = q_index[rows]
    lo = torch.searchsorted(k_index, qi[:, 0] - w, right=True)
    hi = torch.searchsorted(k_index, qi[:, -1].contiguous(), right=True)
    cols = lo.unsqueeze(1) + torch.arange(max(int((hi - lo).max()), 1))
    kept = cols < hi.unsqueeze(1)
    cols = cols.clamp_max(len(k_index) - 1)
    q, k = qi.to(device).unsqueeze(2), k_index[cols].to(device).unsqueeze(1)
    hidden = (k <= q - w) | (k > q) | ~kept.to(device).unsqueeze(1)
    bias = torch.zeros(hidden.shape, device=device).masked_fill_(hidden, float("-inf"))
    return Band(rows.to(device), cols.to(device), bias)


def band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tiles: Band
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [b, h, Lq, d] over k, v [b, kvh, Lk, d] tile by tile (:func:`band`), every
    tile in one batched call with its bias (a fused kernel that takes one: the memory-efficient
    kernel on CUDA, the flash kernel on a CPU). Returns (out, lse) of the block's query rows."""
    b, h, lq, d = q.shape
    n, tile = tiles.rows.shape

    def tiled(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [b, heads, n * x, d] -> [b * n, heads, x, d]
        t = t.index_select(2, index.flatten())
        return t.view(b, t.shape[1], n, -1, d).transpose(1, 2).reshape(b * n, t.shape[1], -1, d)

    out, lse = attention_with_lse(
        tiled(q, tiles.rows), tiled(k, tiles.cols), tiled(v, tiles.cols), scale, bias=tiles.bias.repeat(b, 1, 1)
    )
    out = out.view(b, n, h, tile, d).transpose(1, 2).reshape(b, h, n * tile, d)[:, :, :lq]
    return out, lse.view(b, n, h, tile).transpose(1, 2).reshape(b, h, n * tile)[:, :, :lq]


def windowed_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    calls: tuple[BlockCall, ...],
    layer: LayerAttention,
    q_index: torch.Tensor | None,
    k_index: torch.Tensor | None,
    bands: dict | None = None,
) -> Iterator[tuple[BlockCall, tuple[torch.Tensor, torch.Tensor]]]:
    """Each of ``calls`` attended through ``layer``'s window: (call or a piece of it, its rows'
    (out, lse)). A call the window hides wholly is skipped, one it wholly shows is attended as
    planned, one it straddles through flash's own window where it runs (:func:`flash_windowed`:
    CUDA, half precision), elsewhere tile by tile (:func:`band_attention`), so a window of w
    costs about w (flash) or 2w (tiles) keys per query, not the prompt. ``q_index``/``k_index``:
    host int tensors, the sequence indices of the rows of q and of k, v, ascending (every layout
    stores a rank's tokens, and the cache its slots, in sequence order); None without a window.
    ``bands``: where given, each straddled call's tiles are kept there and reused by the next
    layer of the same window (a prefill's window layers all cut the same blocks)."""
    bands = {} if bands is None else bands
    for c in calls:
        rows, keys, values = q[:, :, c.q_lo : c.q_hi], k[:, :, c.k_lo : c.k_hi], v[:, :, c.k_lo : c.k_hi]
        seen = "all"
        if layer.window:
            qi, ki = q_index[c.q_lo : c.q_hi], k_index[c.k_lo : c.k_hi]
            seen = layer.sees(int(qi[0]), int(qi[-1]), int(ki[0]), int(ki[-1]))
        if seen == "all":
            yield c, attention_with_lse(rows, keys, values, scale, c.causal)
        elif seen == "some" and takes_flash_window(q):
            yield from flash_windowed(q, k, v, scale, c, layer.window, qi, ki)
        elif seen == "some":
            key = (layer.window, c, int(qi[0]), int(ki[0]))  # the first indices tell the ranks apart
            if key not in bands:
                bands[key] = band(layer, qi, ki, q.device)
            yield c, band_attention(rows, keys, values, scale, bands[key])


def runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """The [lo, hi) row ranges over which the ascending sequence indices ``index`` (host) step by
    one: a rank's zigzag chunks, or its cache slots then its new tokens, each make one."""
    cuts = ((index[1:] - index[:-1]) != 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *cuts, len(index)]
    return list(zip(bounds[:-1], bounds[1:]))


def flash_windowed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    c: BlockCall,
    window: int,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
) -> Iterator[tuple[BlockCall, tuple[torch.Tensor, torch.Tensor]]]:
    """Call ``c``, which a window of ``window`` keys straddles, through flash attention's own
    window (:func:`fmsring.kernels.flash_window_with_lse`), which needs query rows and keys each
    contiguous in the sequence: the call is cut at the jumps of its indices (``q_index``,
    ``k_index``: the call's rows' sequence indices, host), and each piece of queries at
    q0..q1 over keys at k0..k1 is one call whose window, aligned at the pieces' last rows, is
    the layer's: ``right`` = q1 - k1 keys past the diagonal, ``left`` = window - 1 - right
    before it. Query rows past the reach of a piece's keys (q > k1 + window - 1) are left out
    of its call, so every row sees a key."""
    for qa, qb in runs(q_index):
        for ka, kb in runs(k_index):
            q0, q1, k0, k1 = int(q_index[qa]), int(q_index[qb - 1]), int(k_index[ka]), int(k_index[kb - 1])
            if k0 > q1 or k1 <= q0 - window:  # after every query, or before every query's window
                continue
            assert k1 < q0 or (k0, k1) == (q0, q1), "keys are wholly before the queries or are the queries"
            reached = qa + min(qb - qa, k1 + window - q0)
            right = int(q_index[reached - 1]) - k1
            piece = BlockCall(c.q_lo + qa, c.q_lo + reached, c.k_lo + ka, c.k_lo + kb, right == 0)
            rows = q[:, :, piece.q_lo : piece.q_hi]
            keys, values = k[:, :, piece.k_lo : piece.k_hi], v[:, :, piece.k_lo : piece.k_hi]
            yield piece, flash_window_with_lse(rows, keys, values, scale, window - 1 - right, right)
