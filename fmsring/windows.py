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

from dataclasses import dataclass
from typing import Any, Literal

import torch

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


def windowed_calls(
    calls: tuple[BlockCall, ...],
    layer: LayerAttention,
    q_index: torch.Tensor | None,
    k_index: torch.Tensor | None,
    device: torch.device | str,
) -> list[tuple[BlockCall, torch.Tensor | None]]:
    """``calls`` through ``layer``'s window: each with None (attend as planned) or a bias. A call
    the window hides wholly is dropped; one it straddles loses the keys behind every query's
    window and gets the band (window and causality, by sequence index) as its bias, so a window
    of w costs about w keys per query, not the prompt. ``q_index``/``k_index``: host int tensors,
    the sequence indices of the query rows and key rows the calls index, ascending (every layout
    stores a rank's tokens, and the cache its slots, in sequence order)."""
    if not layer.window:
        return [(c, None) for c in calls]
    assert q_index is not None and k_index is not None
    out = []
    for c in calls:
        qi, ki = q_index[c.q_lo : c.q_hi], k_index[c.k_lo : c.k_hi]
        seen = layer.sees(int(qi[0]), int(qi[-1]), int(ki[0]), int(ki[-1]))
        if seen == "all":
            out.append((c, None))
        elif seen == "some":
            skip = int(torch.searchsorted(ki, int(qi[0]) - layer.window, right=True))
            kept = BlockCall(c.q_lo, c.q_hi, c.k_lo + skip, c.k_hi, False)
            out.append((kept, layer.bias(qi.to(device), ki[skip:].to(device), c.causal)))
    return out
