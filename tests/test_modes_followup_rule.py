"""The pass-KV / pass-Q choice from given rates (pure arithmetic, no ranks)."""

import pytest

from fmsring.modes.followup import FollowupShape, choose_followup, exposed_link_bytes
from fmsring.rates import Rates

LLAMA3_8B = dict(heads=32, kv_heads=8, head_dim=128, elem_bytes=2)
# rates of the order of 2 GPUs on NVLink: cuDNN attention, HBM copy, ring shift
NVLINK = Rates(matmul_tflops=700.0, attention_tflops=620.0, memory_gbps=3000.0, link_gbps=260.0)


def shape(t: int, p: int, w: int = 2) -> FollowupShape:
    return FollowupShape(new_tokens=t, cached_tokens=p, world_size=w, **LLAMA3_8B)


def test_few_new_tokens_on_a_long_cache_pass_q_many_pass_kv():
    assert choose_followup(shape(512, 131072), NVLINK) == "pass_q"
    assert choose_followup(shape(8192, 131072), NVLINK) == "pass_kv"
    assert choose_followup(shape(32768, 32768, w=4), NVLINK) == "pass_kv"


@pytest.mark.parametrize("w", [2, 4, 8])
@pytest.mark.parametrize("p", [8192, 131072, 1 << 20])
def test_one_crossover_per_cache_length(w, p):
    """As T grows pass-KV's transfers hide under more compute: once it wins it keeps winning."""
    choices = [choose_followup(shape(t, p, w), NVLINK) for t in (2**k for k in range(3, 17))]
    first_kv = choices.index("pass_kv") if "pass_kv" in choices else len(choices)
    assert choices[first_kv:] == ["pass_kv"] * (len(choices) - first_kv)
    assert choices[0] == "pass_q"


def test_one_rank_moves_nothing_and_copies_nothing():
    s = shape(4096, 65536, w=1)
    assert exposed_link_bytes(s, "pass_q", NVLINK) == 0
    assert choose_followup(s, None) == "pass_q"


def test_a_slower_link_moves_the_crossover_to_more_new_tokens():
    """pass-KV ships the cache: the slower the link against the compute, the more new tokens it
    takes for that to hide, so a case pass-KV wins on NVLink goes to pass-Q over a slow link."""
    slow = Rates(matmul_tflops=700.0, attention_tflops=620.0, memory_gbps=3000.0, link_gbps=20.0)
    assert choose_followup(shape(8192, 131072), NVLINK) == "pass_kv"
    assert choose_followup(shape(8192, 131072), slow) == "pass_q"

    def crossover(rates):
        ts = [2**k for k in range(3, 20)]
        return next(t for t in ts if choose_followup(shape(t, 131072), rates) == "pass_kv")

    assert crossover(slow) > crossover(NVLINK)
