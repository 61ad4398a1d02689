"""fmsring.harness.results: docs/results.md is the committed runs rendered, and a small run
renders to the table written here by hand."""

from __future__ import annotations

from pathlib import Path

from fmsring.harness import results
from tests.conftest import ROOT
from tests.harness.synthetic_runs import row, write_needle_run, write_run


def test_docs_results_is_the_committed_runs_rendered():
    """A run added (or a CSV changed) without `make results` fails here."""
    rendered = results.render(ROOT / "runs")
    assert rendered == (ROOT / "docs" / "results.md").read_text(), f"docs/results.md is stale: run `{results.COMMAND}`"


def test_a_small_run_renders_to_the_expected_tables(tmp_path: Path):
    late = {"timestamp": "2026-11-26T00:00:00+00:00", "git_sha": "0123456789abcdef"}
    write_run(tmp_path, "old", [row("single", 1, 1024, latency_ms=10.0)])
    rows = [
        row(
            "tp",
            2,
            8192,
            latency_ms=60.0,
            floor_ms=40.0,
            rel_err=4e-3,
            max_abs_err=0.05,
            ref_norm=900.0,
            tp_size=2,
            cp_size=1,
            same_next_token=True,
        ),
        row("single", 1, 8192, latency_ms=100.0, floor_ms=80.0, peak_mem_gib=20.5),
        row("ring", 2, 8192, variant="eager", latency_ms=123.456, floor_ms=40.0, cp_size=2, tp_size=1),
        row("ring", 2, 16384, status="oom", error="CUDA out of memory", floor_ms=90.0, cp_size=2, tp_size=1),
        row(
            "ring",
            2,
            8192,
            "decode",
            latency_ms=5.0,
            floor_ms=2.5,
            ttft_ms=300.0,
            first_step_ms=900.0,
            batch=4,
            cp_size=2,
            tp_size=1,
        ),
        row("ring", 2, 8192, "followup", cached_len=32768, latency_ms=200.0, floor_ms=150.0, cp_size=2, tp_size=1),
        row("ring", 2, 32768 + 8192, latency_ms=800.0, cp_size=2, tp_size=1),
    ]
    write_run(tmp_path, "new", [r | late for r in rows])
    write_run(tmp_path, "new", [row("ring", 2, 7000, dtype="float32", latency_ms=3.0) | late], csv="results_fp32.csv")
    (tmp_path / "local").mkdir()  # runs/local/ is this machine's, never rendered
    write_run(tmp_path / "local", "mine", [row("ring", 2, 1024, latency_ms=1.0)])
    text = results.render(tmp_path)
    assert f"`{results.COMMAND}`" in text.splitlines()[2]
    body = text[text.index("## new") :]
    assert body.index("## new") < body.index("## old") and "mine" not in text  # newest run first
    assert body.index("`results.csv`: 8x NVIDIA H100 80GB HBM3; llama/3-8b; bfloat16; code 0123456") < body.index(
        "`results_fp32.csv`: 8x NVIDIA H100 80GB HBM3; llama/3-8b; float32; code 0123456"
    )
    prefill = """\
| tokens | config (cp x tp) | ms | floor ms | x floor | peak GiB | rel err | same next token | status |
| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |
| 8k | single 1x1 | 100.0 | 80.00 | 1.25 | 20.50 |  |  | ok |
| 8k | ring/eager 2x1 | 123.5 | 40.00 | 3.09 |  |  |  | ok |
| 8k | tp 1x2 | 60.00 | 40.00 | 1.50 |  | 4.0e-03 | yes | ok |
| 16k | ring 2x1 |  | 90.00 |  |  |  |  | oom |
| 40k | ring 2x1 | 800.0 |  |  |  |  |  | ok |
"""
    decode = """\
| tokens | config (cp x tp) | batch | ms | floor ms | x floor | TTFT ms | first call ms | status |
| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |
| 8k | ring 2x1 | 4 | 5.000 | 2.500 | 2.00 | 300.0 | 900.0 | ok |
"""
    followup = """\
| cached | tokens | config (cp x tp) | ms | floor ms | x floor | fresh prefill ms | cache gain | status |
| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |
| 32k | 8k | ring 2x1 | 200.0 | 150.0 | 1.33 | 800.0 | 4.00 | ok |
"""
    assert f"prefill:\n\n{prefill}" in body and f"decode (ms per token):\n\n{decode}" in body
    assert f"followup:\n\n{followup}" in body


def test_a_needle_run_renders_as_its_strategies_table(tmp_path: Path):
    write_run(tmp_path, "bench", [row("single", 1, 1024, latency_ms=10.0)])
    (tmp_path / "needle").mkdir()
    write_needle_run(tmp_path / "needle")
    text = results.render(tmp_path)
    assert text.index("## needle") < text.index("## bench")  # newest first, by the rows' timestamps
    table = """\
`needle.csv`: needle in a haystack; smol; cpu; float32; code 0123456

| strategy | cases | found | identical tokens | max logit diff | median prefill s | failed |
| --- | ---: | --- | --- | ---: | ---: | ---: |
| FMS unsharded | 4 | 4/4 | - |  | 1.536 | 0 |
| ring, 2 ranks | 4 | 3/4 | 3/4 | 2.0e-05 | 1.536 | 0 |
| ring, 4 ranks | 4 | 3/3 | 3/3 | 2.0e-05 | 1.024 | 1 |
"""
    assert table in text
