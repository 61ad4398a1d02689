"""Token layouts: coverage, balance, and the causal block schedule."""

import random

import pytest
import torch

from fmsring.layout import LAYOUTS, ShardPlan

CASES = [(L, W) for W in (1, 2, 3, 4, 8) for L in (W, W + 1, 2 * W - 1, 2 * W, 13, 37, 100, 257) if L >= W]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("L,W", CASES)
def test_every_token_on_exactly_one_rank_in_sequence_order(layout, L, W):
    """In sequence order on each rank: a window's decode step reads only the shard's last slots."""
    plan = ShardPlan.build(L, W, layout)
    seen = sorted(i for r in range(W) for i in plan.indices(r))
    assert seen == list(range(L))
    assert all(plan.indices(r) == sorted(set(plan.indices(r))) for r in range(W))
    assert all(n >= 1 for n in plan.local_lens)
    assert max(plan.local_lens) - min(plan.local_lens) <= 2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("L,W", CASES)
@pytest.mark.parametrize("follow_up", [False, True])
def test_block_calls_cover_the_causal_mask_once(layout, L, W, follow_up):
    """The union of all kernel calls is exactly the lower triangle, with no pair twice.

    As a follow-up, every rank's keys are first its cached tokens (all earlier
    than the plan's, uneven across ranks), then its tokens of the plan: new
    queries must see every cached key once and the new keys causally.
    """
    plan = ShardPlan.build(L, W, layout)
    cached = [random.randrange(0, 5) + (r % 2) for r in range(W)] if follow_up else [0] * W
    starts = [sum(cached[:r]) for r in range(W)]  # rank r's cached tokens: global [starts[r], +cached[r])
    P = sum(cached)
    hits = torch.zeros(L, P + L, dtype=torch.long)
    for r in range(W):
        q_idx = torch.tensor(plan.indices(r))
        for src in range(W):
            cache_idx = list(range(starts[src], starts[src] + cached[src]))
            k_idx = torch.tensor(cache_idx + [P + i for i in plan.indices(src)])
            for c in plan.block_calls(r, src, cached[src]):
                vis = torch.ones(c.q_hi - c.q_lo, c.k_hi - c.k_lo, dtype=torch.long)
                if c.causal:
                    vis = vis.tril()
                qi, ki = q_idx[c.q_lo : c.q_hi], k_idx[c.k_lo : c.k_hi]
                hits[qi.unsqueeze(1), ki.unsqueeze(0)] += vis
    assert torch.equal(hits, torch.ones(L, P + L, dtype=torch.long).tril(P))


@pytest.mark.parametrize("W", (2, 3, 4, 8))
def test_zigzag_balances_causal_work(W):
    L = 64 * W
    work = {}
    for layout in LAYOUTS:
        plan = ShardPlan.build(L, W, layout)
        work[layout] = [sum(i + 1 for i in plan.indices(r)) for r in range(W)]
    zig, cont = work["zigzag"], work["contiguous"]
    assert max(zig) / min(zig) < 1.02
    assert max(cont) / min(cont) > 2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("L,W", CASES)
def test_last_tokens_are_local_suffixes(layout, L, W):
    plan = ShardPlan.build(L, W, layout)
    for n in (1, 2, 5, L):
        n = min(n, L)
        got = []
        for r in range(W):
            k = plan.tail_count(r, n)
            got += plan.indices(r)[plan.local_len(r) - k :]
        assert sorted(got) == list(range(L - n, L))
    if L >= 2 * W:
        assert plan.owner(L - 1) == (0 if layout == "zigzag" else W - 1)


def test_bad_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="unknown ring layout"):
        ShardPlan.build(10, 2, "spiral")
    with pytest.raises(ValueError, match="at least one token per rank"):
        ShardPlan.build(3, 4)
