"""fmsring.segments: a padded batch's mask recognised as segments, attended exactly without a bias.

Recognition holds to the mask itself (FMS's ``pad_input_ids``, left and right, bool, additive,
per-head dim of 1) and refuses anything else; each block call's segmented (out, lse) equals
masked attention under the mask it stands for, at every layout and world size; end to end, a
padded prompt (segments) and a mask with a hole in it (bias blocks) both match FMS.
"""

from __future__ import annotations

import random

import pytest
import torch
from fms.utils.generation import pad_input_ids

from fmsring.kernels import math_attention_with_lse
from fmsring.layout import LAYOUTS, ShardPlan
from fmsring.segments import Segments, segmented_blocks
from tests.distributed import run_ranks
from tests.tiny_checkpoint import VOCAB, fms_model


def padded_mask(lengths: list[int], side: str = "left") -> tuple[torch.Tensor, list[tuple[tuple[int, int], ...]]]:
    """FMS's mask for prompts of ``lengths`` padded to the longest, and each sequence's segments."""
    _, kw = pad_input_ids([torch.arange(n) for n in lengths], padding_side=side)
    width = max(lengths)
    bounds = []
    for n in lengths:
        cut = width - n if side == "left" else n
        bounds.append(((0, width),) if cut in (0, width) else ((0, cut), (cut, width)))
    return kw["mask"], bounds


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_masks_are_read_as_their_segments(side):
    lengths = [random.randrange(1, 40) for _ in range(3)] + [40]
    mask, bounds = padded_mask(lengths, side)
    for form in (mask, mask == 0, (mask == 0).unsqueeze(1)):
        assert Segments.of(form) == Segments(tuple(bounds)), (side, lengths)


def test_any_other_mask_is_not_segments():
    mask, _ = padded_mask([random.randrange(5, 30), 30])
    allowed = mask == 0
    holed = allowed.clone()
    holed[1, 20, 3] = False  # one key hidden from one query
    both_ways = allowed | allowed.transpose(1, 2)  # not causal
    biased = mask.clone()
    biased[0, -1, -2] = -1.5  # a finite bias, not a hidden key
    key_padding = allowed[:, -1:, :]  # one row for every query (FMS's generate without a cache)
    for other in (holed, both_ways, biased, key_padding, allowed.unsqueeze(1).expand(-1, 2, -1, -1)):
        assert Segments.of(other) is None


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_block_call_is_masked_attention_within_the_segments(world, layout):
    """Every (rank, source) block's calls, segmented, against the math path under the bias the
    padded mask gives the same rows and keys; rows the block gives no key stay out 0, lse -inf."""
    lengths = [random.randrange(world, 4 * world + 20) for _ in range(2)] + [4 * world + 20]
    mask, _ = padded_mask(lengths)
    segments = Segments.of(mask)
    n, b, h, d = mask.shape[-1], len(lengths), 2, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    plan = ShardPlan.build(n, world, layout)
    index = [plan.index_tensor(r) for r in range(world)]
    for rank in range(world):
        for src in range(world):
            mine, theirs = index[rank], index[src]
            ql, kl, vl = q[:, :, mine], k[:, :, theirs], v[:, :, theirs]
            calls = plan.block_calls(rank, src)
            got = dict(segmented_blocks(ql, kl, vl, 0.5, calls, segments, mine, theirs))
            for c in calls:
                bias = mask[:, mine[c.q_lo : c.q_hi]][:, :, theirs[c.k_lo : c.k_hi]]
                seen = (bias > float("-inf")).any(-1)[:, None].expand(-1, h, -1)
                rows, keys = slice(c.q_lo, c.q_hi), slice(c.k_lo, c.k_hi)
                want_out, want_lse = math_attention_with_lse(
                    ql[:, :, rows], kl[:, :, keys], vl[:, :, keys], 0.5, bias=bias
                )
                if not seen.any():
                    assert c not in got
                    continue
                out, lse = got[c]
                torch.testing.assert_close(out[seen], want_out[seen].to(out.dtype))
                torch.testing.assert_close(lse[seen], want_lse[seen])
                assert (lse[~seen] == float("-inf")).all() and (out[~seen] == 0).all()


def _masked_prefill_errors(rank, world, path, ids, masks):
    errs = {}
    with torch.no_grad():
        ref = fms_model(path)
        for layout in LAYOUTS:
            ring = fms_model(path, strategy="ring", ring_layout=layout)
            for name, (mask, positions) in masks.items():
                want = ref(ids, mask=mask, position_ids=positions)
                got = ring(ids, mask=mask, position_ids=positions)
                errs[layout, name] = (got - want).abs().max().item()
    return errs


def test_a_padded_prompt_and_a_holed_mask_match_fms_on_the_ring(checkpoints):
    """End to end at 2 ranks: a left-padded batch (its mask as segments) and the same mask with keys
    hidden at random (not segments: the additive blocks) give FMS's logits with that mask."""
    lengths = [random.randrange(3, 25) | 1, 25]
    padded, kw = pad_input_ids([torch.randint(1, VOCAB, (n,)) for n in lengths])
    holed = kw["mask"].clone()
    rows = torch.arange(holed.shape[1])
    hide = (torch.rand(holed.shape) < 0.2) & (rows[None, :, None] > rows[None, None, :])  # never the diagonal
    holed[hide] = float("-inf")
    masks = {"padded": (kw["mask"], kw["position_ids"]), "holed": (holed, kw["position_ids"])}
    assert Segments.of(kw["mask"]) is not None and Segments.of(holed) is None
    for errs in run_ranks(2, _masked_prefill_errors, checkpoints["gqa"], padded, masks):
        assert max(errs.values()) <= 1e-4, errs
