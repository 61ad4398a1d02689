"""fmsring.harness.provenance: what a row records about where it was measured."""

from __future__ import annotations

from fmsring.harness import provenance
from fmsring.harness.grid import SweepConfig


def test_rows_record_the_environment_that_changes_a_measurement(monkeypatch):
    for name in provenance.PERFORMANCE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert provenance.launch_env() == ""
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("HOME", "/elsewhere")  # not one that changes a measurement
    assert provenance.launch_env() == "NCCL_P2P_DISABLE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"


def test_rows_name_the_model_and_the_card():
    info = provenance.row_provenance(SweepConfig(model_kwargs={"nlayers": 2}), repeats=2)
    assert info["model"] == 'llama/micro {"nlayers": 2}' and info["gpu_name"] == "cpu" and info["repeats"] == 2
    assert info["gpu_memory_gib"] == ""  # no card: no capacity (a GPU row gets total_memory in GiB)
