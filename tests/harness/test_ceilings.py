"""fmsring.harness.ceilings: the device's rates, kept beside a CSV, and the interconnect's name."""

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


TOPO = """\
\tGPU0\tGPU1\tGPU2\tCPU Affinity
GPU0\t X \t{link}\tSYS\t0-31
GPU1\t{link}\t X \tSYS\t0-31
"""


def test_interconnect_is_named_per_run(monkeypatch: pytest.MonkeyPatch):
    """NVLink or PCIe from nvidia-smi's matrix; "pcie-like" whenever NCCL_P2P_DISABLE sends NCCL
    through host memory; nothing for CPUs or one GPU."""
    assert ceilings.topo_link(TOPO.format(link="NV18")) == "nvlink"
    assert ceilings.topo_link(TOPO.format(link="PXB")) == "pcie"
    assert ceilings.topo_link("no matrix here") == ""
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    assert ceilings.interconnect("cuda", 4) == "pcie-like"
    assert ceilings.interconnect("cuda", 1) == "" and ceilings.interconnect("cpu", 0) == ""
    assert math.isnan(ceilings.measure_ring_shift_gbps())  # no NCCL group here
