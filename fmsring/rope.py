"""The RoPE tables a forward's positions need, grown past FMS's own size.

FMS computes each rotary table once, for ``max_expected_seq_len`` positions,
and never regrows it: a ring prompt or a long generation runs past it. The
table is regrown here through FMS's own ``compute_freqs_cis`` after dropping
its cached entry (``cached_freqs``, keyed by device and scaling alpha, is the
only way FMS offers to recompute it), and only for RoPE variants whose angle
at a position does not depend on the table's size, so regrowing is exact.
"""

from __future__ import annotations

from typing import Any

import torch

# RoPE variants whose angle at a position does not depend on the table's size.
_GROWABLE_ROPE = ("regular", "llama3", "yarn")


class RopeTables:
    """The distinct rotary encoders of one model (FMS shares one between layers)."""

    def __init__(self, rotaries: list[Any]):
        self.rotaries = rotaries

    def fit(self, max_position: int, device: torch.device) -> None:
        """Grow the tables to cover ``max_position``.

        A table grows to at least twice its size: a generation past the table
        then regrows it (and recaptures the decode graph, which reads it) a
        logarithmic number of times, not at every token.
        """
        for rot in self.rotaries:
            cached = rot.max_seq_len_cached.get(device.index, 0)
            if max_position < cached:
                continue
            if rot.rope_type not in _GROWABLE_ROPE:
                raise ValueError(
                    f"position {max_position} is beyond the RoPE table ({cached}) and {rot.rope_type!r} "
                    "RoPE scaling depends on the table length; raise max_expected_seq_len when loading"
                )
            size = max(max_position + 1, 2 * cached)
            rot.cached_freqs.get(device.index, {}).pop(rot.rope_scaling.get_alpha(size), None)
            rot.compute_freqs_cis(device, size)

    def sizes(self, device: torch.device) -> tuple[int, ...]:
        """The table sizes: a captured step reads the tables, which move when regrown."""
        return tuple(rot.max_seq_len_cached.get(device.index, 0) for rot in self.rotaries)

    def positions(
        self, x: torch.Tensor, position_ids: torch.Tensor | None, start: int, last_max: int = -1
    ) -> tuple[torch.Tensor, int]:
        """The tokens' positions (``start`` onwards unless given) and the largest of them, with the
        tables grown to cover it.

        Given positions are read on the host (one sync) except for one token
        on a non-empty cache: a decode step advances the largest position by
        one (``last_max`` + 1), as FMS's ``generate`` does, so decoding never
        waits for the device.
        """
        n = x.shape[1]
        if position_ids is None:
            top = start + n - 1
        elif n == 1 and start > 0:
            top = last_max + 1
        else:
            top = int(position_ids.max())
        self.fit(top, x.device)
        if position_ids is not None:
            return position_ids, top
        return torch.arange(start, start + n, device=x.device).expand(x.shape[0], -1), top
