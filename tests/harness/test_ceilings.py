"""fmsring.harness.ceilings: the device's rates, kept beside a CSV."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fmsring.harness import ceilings
from fmsring.harness.flops import Rates

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_ceilings_file_is_reused(tmp_path: Path):
    path = ceilings.ceilings_path(tmp_path / "results.csv")
    assert path.name == "results.ceilings.json"
    assert ceilings.load_or_measure(path, torch.device("cpu"), "float32", 4, 48, log=lambda _m: None) is None
    key = ceilings.rates_key("cpu", "float32", 4, 48)
    path.write_text(f'{{"{key}": {{"matmul_tflops": 1, "attention_tflops": 2, "memory_gbps": 3}}}}')
    got = ceilings.load_or_measure(path, torch.device("cpu"), "float32", 4, 48, log=lambda _m: None)
    assert got == Rates(1, 2, 3)


@pytest.mark.cuda
@needs_gpu
def test_rates_measured_on_a_gpu(tmp_path: Path):
    path = tmp_path / "r.ceilings.json"
    rates = ceilings.load_or_measure(path, torch.device("cuda"), "bfloat16", 32, 128)
    assert rates.matmul_tflops > 10 and rates.attention_tflops > 10 and rates.memory_gbps > 100
    assert ceilings.load_or_measure(path, torch.device("cuda"), "bfloat16", 32, 128) == rates  # read back


def test_ring_shift_is_not_measured_without_nccl():
    assert math.isnan(ceilings.measure_ring_shift_gbps())  # no NCCL group here
