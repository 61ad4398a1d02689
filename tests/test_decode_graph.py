"""The captured step's inputs are the tensors the graph reads, and the collector pauses around a capture
(the CPU-checkable parts of decode_graph)."""

import gc

import pytest
import torch

from fmsring.decode_graph import StepInputs, collections_paused


def test_copy_writes_into_the_inputs_a_graph_reads():
    mine = StepInputs(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.zeros(2))
    reads = mine.tensors()  # what a graph captured with these inputs would read
    new = StepInputs(*(torch.rand_like(t) + 1 for t in reads))
    mine.copy_(new)
    assert all(r is t for r, t in zip(reads, mine.tensors()))
    assert all(torch.equal(r, t) for r, t in zip(reads, new.tensors()))
    twin = mine.clone()
    assert all(a is not b and torch.equal(a, b) for a, b in zip(twin.tensors(), mine.tensors()))


@pytest.mark.parametrize("enabled", [True, False])
def test_collections_pause_inside_and_return_as_they_were(enabled: bool):
    (gc.enable if enabled else gc.disable)()
    try:
        with collections_paused():
            assert not gc.isenabled()
        assert gc.isenabled() == enabled
        with pytest.raises(RuntimeError, match="a failed capture"), collections_paused():
            raise RuntimeError("a failed capture")
        assert gc.isenabled() == enabled
    finally:
        gc.enable()
