"""fmsring.harness.exactness: the tolerances' verdicts and the comparison of outputs."""

from __future__ import annotations

import math

import pytest
import torch

from fmsring.harness.exactness import compare, judge


@pytest.mark.parametrize(
    "dtype, errors, verdict",
    [
        ("float32", {"max_abs_err": 3e-5, "rel_err": 1.99, "ref_norm": 1.5e-5}, "rel_err 1.99 > 0.0001"),
        ("float32", {"max_abs_err": 5e-7, "rel_err": 2e-7, "ref_norm": 15.0}, ""),
        ("bfloat16", {"max_abs_err": 0.1, "rel_err": 4.7e-3, "ref_norm": 900.0}, ""),
        ("bfloat16", {"max_abs_err": 0.5, "rel_err": 0.03, "ref_norm": 900.0}, "rel_err 0.03 > 0.02"),
        # a flipped greedy token: a near-tie passes, a clear gap does not
        ("bfloat16", {"max_abs_err": 0.1, "rel_err": 4e-3, "ref_norm": 900.0, "top2_gap": 0.15}, ""),
        ("bfloat16", {"max_abs_err": 0.1, "rel_err": 4e-3, "ref_norm": 900.0, "top2_gap": 0.5}, "top-2 gap 0.5"),
        ("float32", {"max_abs_err": 0.0, "rel_err": math.nan, "ref_norm": 0.0}, "degenerate"),
        ("float32", {"max_abs_err": math.nan, "rel_err": math.nan, "ref_norm": 3.0}, "non-finite"),
    ],
)
def test_judge(dtype: str, errors: dict, verdict: str):
    got = judge(dtype, errors)
    assert (verdict in got) if verdict else got == "", got


def test_compare_stops_at_the_first_differing_decode_step():
    ref = torch.randn(4, 2, 50)  # [1 + steps, batch, vocab]
    out = ref.clone()
    out[2:] += torch.randn(2, 2, 50)  # steps 2 and 3 diverged
    ref_tokens, tokens = ref.argmax(-1).T, out.argmax(-1).T
    tokens[:, 2] = (ref_tokens[:, 2] + 1) % 50  # the first different token is at step 2
    got = compare((out, tokens), (ref, ref_tokens))
    diff = out[:3].double() - ref[:3].double()
    assert got["max_abs_err"] == pytest.approx(diff.abs().max().item())
    assert got["rel_err"] == pytest.approx((diff.norm() / ref[:3].double().norm()).item())
    assert got["same_next_token"] is False
    top2 = ref[2].topk(2, -1).values
    assert got["top2_gap"] == pytest.approx((top2[:, 0] - top2[:, 1]).max().item())
    same = compare((ref[0], ref_tokens[:, 0]), (ref[0], ref_tokens[:, 0]))
    assert same["max_abs_err"] == 0 and same["same_next_token"] is True and "top2_gap" not in same
