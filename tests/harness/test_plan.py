"""fmsring.harness.plan: which rows a launch writes, and the ring variants."""

from __future__ import annotations

import pytest

from fmsring.harness import plan, schema
from fmsring.harness.grid import SweepConfig


def test_planned_points_for_followup_and_variants():
    pts = plan.planned_points("ring", 2, ["", "eager"], [3, 5], ["prefill", "followup"], [24], True)
    prefill = [(p.variant, p.seq_len) for p in pts if p.phase == "prefill"]
    # prefill of 3 and 5, then the follow-ups on 24, then the fresh prefills of 24+3 and 24+5
    assert prefill == [("", 3), ("", 5), ("", 27), ("", 29), ("eager", 3), ("eager", 5), ("eager", 27), ("eager", 29)]
    assert {(p.seq_len, p.cached_len) for p in pts if p.phase == "followup"} == {(3, 24), (5, 24)}
    # a P+T the prefill phase measures anyway is not measured twice; peers never recompute
    again = plan.planned_points("ring", 2, [""], [4, 28], ["prefill", "followup"], [24], True)
    assert sorted(p.seq_len for p in again if p.phase == "prefill") == [4, 28, 52]
    assert all(p.phase != "prefill" for p in plan.planned_points("tp", 2, [""], [3], ["followup"], [24], True))
    cfg = SweepConfig(ring_variants={"": {}, "x": {}}, ring_kwargs={"ring_fuse": False}, as_shipped=True)
    assert [v.label for v in plan.variants("single", cfg)] == ["", schema.AS_SHIPPED]
    assert [v.label for v in plan.variants("ring", cfg)] == ['{"ring_fuse": false}', 'x {"ring_fuse": false}']


def test_compile_peers_adds_a_compiled_variant_to_single_and_tp_alone():
    """The tuned peer compiled whole beside the default and the as-shipped variants, which stay as
    they were; torch_cp (no decode) and ring (its own compiled step) get none."""
    plain = SweepConfig(as_shipped=True, strategies=["single", "tp", "torch_cp", "ring"])
    assert {s: [v.label for v in plan.variants(s, plain)] for s in plain.strategies} == {
        "single": ["", schema.AS_SHIPPED], "tp": ["", schema.AS_SHIPPED], "torch_cp": ["", schema.AS_SHIPPED],
        "ring": [""],
    }  # fmt: skip
    assert all(not v.compile_mode for s in plain.strategies for v in plan.variants(s, plain))
    cfg = SweepConfig(as_shipped=True, strategies=plain.strategies, compile_peers="reduce-overhead")
    for s in ("single", "tp"):
        default, compiled, shipped = plan.variants(s, cfg)
        assert (default, shipped) == tuple(plan.variants(s, plain))
        assert compiled == plan.Variant(s, schema.COMPILED, tuned=True, compile_mode="reduce-overhead")
    assert plan.variants("torch_cp", cfg) == plan.variants("torch_cp", plain)
    assert plan.variants("ring", cfg) == plan.variants("ring", plain)
    labels = [p.variant for p in cfg.points(2, "tp") if p.phase == "decode"]
    assert labels == ["", "", schema.COMPILED, schema.COMPILED, schema.AS_SHIPPED, schema.AS_SHIPPED]


def test_ring_variants_are_checked():
    assert plan.parse_ring_variants('{"": {}, "eager": {"ring_cuda_graphs": false}}')["eager"] == {
        "ring_cuda_graphs": False
    }
    for bad in ('{"a": {"ring_bogus": 1}}', "[1]", '{"a": 3}', "{}", '{"as-shipped": {}}', '{"compiled": {}}'):
        with pytest.raises(ValueError):
            plan.parse_ring_variants(bad)
