"""The pass-KV / pass-Q choice (pure arithmetic, no ranks)."""

import pytest

from fmsring.followup import FollowupShape, choose_followup, exposed_link_bytes

LLAMA3_8B = dict(heads=32, kv_heads=8, head_dim=128, elem_bytes=2)


def shape(t: int, p: int, w: int = 2) -> FollowupShape:
    return FollowupShape(new_tokens=t, cached_tokens=p, world_size=w, **LLAMA3_8B)


def test_few_new_tokens_on_a_long_cache_pass_q_many_pass_kv():
    assert choose_followup(shape(512, 131072)) == "pass_q"
    assert choose_followup(shape(8192, 131072)) == "pass_kv"
    assert choose_followup(shape(32768, 32768, w=4)) == "pass_kv"


@pytest.mark.parametrize("w", [2, 4, 8])
@pytest.mark.parametrize("p", [8192, 131072, 1 << 20])
def test_one_crossover_per_cache_length(w, p):
    """As T grows pass-KV's transfers hide under more compute: once it wins it keeps winning."""
    choices = [choose_followup(shape(t, p, w)) for t in (2**k for k in range(3, 17))]
    first_kv = choices.index("pass_kv") if "pass_kv" in choices else len(choices)
    assert choices[first_kv:] == ["pass_kv"] * (len(choices) - first_kv)
    assert choices[0] == "pass_q"


def test_one_rank_moves_nothing_and_copies_nothing():
    s = shape(4096, 65536, w=1)
    assert exposed_link_bytes(s, "pass_q") == 0
    assert choose_followup(s) == "pass_q"
