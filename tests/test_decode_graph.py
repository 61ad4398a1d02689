"""The captured step's inputs are the tensors the graph reads, and the collector pauses around a capture
(the CPU-checkable parts of decode_graph)."""

import gc

import pytest
import torch

from fmsring.decode_graph import StepInputs, collections_paused


def test_copy_writes_into_the_inputs_a_graph_reads():
    mine = StepInputs(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.zeros(2))
    reads = mine.values()  # what a graph captured with these inputs would read
    new = StepInputs(*(torch.rand_like(t) + 1 for t in reads))
    mine.copy_(new)
    assert all(r is t for r, t in zip(reads, mine.values()))
    assert all(torch.equal(r, t) for r, t in zip(reads, new.values()))
    twin = mine.clone()
    assert all(a is not b and torch.equal(a, b) for a, b in zip(twin.values(), mine.values()))


def test_shared_values_given_as_ints_stand_for_the_tensors_a_step_reads():
    """A write slot, a fill, a position and a query index given as host ints: materialized, the
    tensors the step read before they could be ints (shapes, dtypes, values); copied into a
    captured graph's inputs, fills of the same tensors, next to a given tensor's copy."""
    b = 3
    ids = torch.randint(0, 100, (b, 1))
    given = StepInputs(ids, 41, 7, 12, query_index=40)
    made = given.materialized()
    want = {
        "positions": torch.full((b, 1), 41, dtype=torch.int64),
        "write_slot": torch.full((1,), 7, dtype=torch.int64),
        "kv_lens": torch.full((b,), 12, dtype=torch.int32),
        "query_index": torch.full((1,), 40, dtype=torch.int64),
    }
    for name, tensor in want.items():
        got = getattr(made, name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    assert made.ids is ids and made.slot_bias is None
    static = made.clone()
    reads = static.values()
    positions = torch.randint(0, 50, (b, 1))  # one step gives positions, the next none
    static.copy_(StepInputs(ids + 1, positions, 8, 13, query_index=41))
    assert all(r is t for r, t in zip(reads, static.values()))
    assert torch.equal(static.ids, ids + 1) and torch.equal(static.positions, positions)
    assert static.write_slot.tolist() == [8] and static.kv_lens.tolist() == [13] * b
    assert static.query_index.tolist() == [41]
    static.copy_(StepInputs(ids, 42, 9, 14, query_index=42))
    assert static.positions.tolist() == [[42]] * b and static.kv_lens.dtype == torch.int32


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
