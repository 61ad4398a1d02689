"""fmsring.harness.provenance: what a row records about where it was measured."""

from __future__ import annotations

import os

import pytest

from fmsring.harness import provenance
from fmsring.harness.grid import SweepConfig


def test_rows_record_the_environment_that_changes_a_measurement(monkeypatch):
    for name in [*provenance.PERFORMANCE_ENV, *(k for k in os.environ if k.startswith(provenance.INDUCTOR_ENV_PREFIX))]:
        monkeypatch.delenv(name, raising=False)
    assert provenance.launch_env() == ""
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER", "0")  # any inductor setting
    monkeypatch.setenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/cache")  # where compiled code lives: not recorded
    monkeypatch.setenv("HOME", "/elsewhere")  # not one that changes a measurement
    assert provenance.launch_env() == (
        "NCCL_P2P_DISABLE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
        "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER=0"
    )


def test_rows_name_the_model_and_the_card():
    info = provenance.row_provenance(SweepConfig(model_kwargs={"nlayers": 2}), repeats=2)
    assert info["model"] == 'llama/micro {"nlayers": 2}' and info["gpu_name"] == "cpu" and info["repeats"] == 2
    assert info["gpu_memory_gib"] == ""  # no card: no capacity (a GPU row gets total_memory in GiB)


TOPO = """\
\tGPU0\tGPU1\tGPU2\tCPU Affinity
GPU0\t X \t{link}\tSYS\t0-31
GPU1\t{link}\t X \tSYS\t0-31
"""


def test_interconnect_is_named_per_run(monkeypatch: pytest.MonkeyPatch):
    """NVLink or PCIe from nvidia-smi's matrix; "pcie-like" whenever NCCL_P2P_DISABLE sends NCCL
    through host memory; nothing for CPUs or one GPU."""
    assert provenance.topo_link(TOPO.format(link="NV18")) == "nvlink"
    assert provenance.topo_link(TOPO.format(link="PXB")) == "pcie"
    assert provenance.topo_link("no matrix here") == ""
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    assert provenance.interconnect("cuda", 4) == "pcie-like"
    assert provenance.interconnect("cuda", 1) == "" and provenance.interconnect("cpu", 0) == ""
