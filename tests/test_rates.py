"""fmsring.rates: the device's rates, measured, and agreed by every rank."""

from __future__ import annotations

import math

import torch

from tests.distributed import run_ranks
from tests.tiny_checkpoint import VOCAB


def _measure_and_agree(rank, world):
    import torch.distributed as dist

    from fmsring.rates import Rates, agreed, measure

    own = Rates(matmul_tflops=rank + 1.0, attention_tflops=2.0 * (rank + 1), memory_gbps=3.0, link_gbps=None)
    measured = measure(torch.device("cpu"), torch.float32, 4, 16, dist.group.WORLD)
    return agreed(own, [dist.group.WORLD]), measured, agreed(measured, [dist.group.WORLD])


def test_every_rank_gets_rank_0s_rates_and_measures_a_link():
    results = run_ranks(3, _measure_and_agree)
    for given, measured, shared in results:
        assert given.matmul_tflops == 1.0 and given.attention_tflops == 2.0 and given.link_gbps is None
        assert shared == results[0][2]  # one set of rates, so every rank makes the same choice
        for value in (measured.matmul_tflops, measured.attention_tflops, measured.memory_gbps, measured.link_gbps):
            assert value is not None and math.isfinite(value) and value > 0


def _auto_followups(rank, world, path, prompt, turn):
    from fmsring.modes import followup
    from tests.tiny_checkpoint import fms_model

    ring = fms_model(path, torch.float32, "ring", ring_followup="auto")
    _, cache = ring(prompt, use_cache=True)
    assert ring.device_rates is None  # nothing measured until a follow-up needs the rates
    mode = followup.mode_for(ring, turn.shape[1], cache)
    logits, _ = ring(turn, past_key_value_states=cache, use_cache=True)
    return ring.device_rates, mode, logits


def test_auto_followup_measures_once_and_every_rank_chooses_alike(checkpoints):
    prompt, turn = torch.randint(0, VOCAB, (1, 12)), torch.randint(0, VOCAB, (1, 7))
    results = run_ranks(2, _auto_followups, checkpoints["gqa"], prompt, turn)
    (rates, mode, logits), (rates1, mode1, logits1) = results
    assert rates is not None and rates == rates1 and rates.link_gbps is not None
    assert mode == mode1 and mode in ("pass_kv", "pass_q")
    assert torch.equal(logits, logits1)
