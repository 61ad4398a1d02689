"""fmsring.harness.schema: results.csv written and read under concurrency, its names."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmsring.harness import plan, schema


def test_csv_round_trip_and_header_check(tmp_path: Path):
    path = tmp_path / "r.csv"
    row = {
        **plan.point("ring", 2, 48, "followup", batch=1, dtype="float32", layout="zigzag", variant="v", cached_len=7),
        "latency_ms": 1.5,
        "status": "mismatch",
        "error": 'quote " and, comma',
    }
    schema.append_rows(path, [row])
    path.write_bytes(path.read_bytes() + b"ring,v,2,4")  # a torn last line
    schema.append_rows(path, [{**row, "seq_len": 61, "status": "ok"}])
    rows = schema.read_rows(path)
    assert [r["status"] for r in rows] == ["mismatch", "ok"] and rows[0]["error"] == row["error"]
    assert schema.row_key(rows[0]) == schema.Point("ring", "v", 2, 48, 7, "followup")
    assert float(rows[0]["latency_ms"]) == 1.5 and rows[0]["layout"] == "zigzag"
    assert schema.done_points(path) == {schema.Point("ring", "v", 2, 48, 7, "followup"),
                                        schema.Point("ring", "v", 2, 61, 7, "followup")}  # fmt: skip
    old = tmp_path / "old.csv"
    old.write_text(",".join(c for c in schema.COLUMNS if c != "variant") + "\n")
    with pytest.raises(ValueError, match="older schema"):
        schema.append_rows(old, [row])


def _append_many(path: str, writer: int) -> None:
    for i in range(40):
        schema.append_rows(path, [{"strategy": "ring", "variant": f"w{writer}", "world_size": 2, "seq_len": i,
                                   "phase": "prefill", "status": "ok", "error": "x" * 3000}])  # fmt: skip


def test_concurrent_appends_never_interleave(tmp_path: Path):
    """Bench ranks and the sweep append to one file; the lock keeps every row whole."""
    import multiprocessing

    path = str(tmp_path / "r.csv")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows = schema.read_rows(path)
    assert len(rows) == 160 and all(len(r["error"]) == 3000 for r in rows)
    assert {(r["variant"], int(r["seq_len"])) for r in rows} == {(f"w{w}", i) for w in range(4) for i in range(40)}
    assert open(path).read().count("strategy,variant") == 1  # one header


def test_strategies_and_phases_are_strings_with_their_facts():
    """str enums: CSV values and string comparisons keep working; each strategy knows its mesh and cache."""
    assert schema.STRATEGIES == ("single", "ring", "tp", "torch_cp") and schema.Phase.FOLLOWUP == "followup"
    assert [schema.mesh_sizes(s, 4, 2) for s in schema.STRATEGIES] == [(1, 1), (2, 2), (1, 4), (4, 1)]
    assert [schema.Strategy(s).cached for s in schema.STRATEGIES] == [True, True, True, False]
    assert schema.COLUMNS[-1] == "gpu_memory_gib" and f"{schema.Strategy.RING}" == "ring"
    assert schema.COLUMNS.index("first_step_ms") == schema.COLUMNS.index("ttft_ms") + 1
