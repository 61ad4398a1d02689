"""The notebooks: paired with their .py, outputs stripped, parameters documented, and they run under papermill."""

from __future__ import annotations

import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

jupytext = pytest.importorskip("jupytext", reason="the notebook tools (dev extra); the GPU machine has none")
nbformat = pytest.importorskip("nbformat", reason="the notebook tools (dev extra); the GPU machine has none")

NOTEBOOKS = ROOT / "notebooks"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def papermill(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # kernel "python3" with argv "python" runs as sys.executable: this venv's Python
    cmd = [sys.executable, "-m", "papermill", "-k", "python3", "--log-level", "WARNING", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def parameters_cell(nb) -> str:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    return cells[0].source


def parameter_names(source: str) -> list[str]:
    return [n.target.id for n in ast.parse(source).body if isinstance(n, ast.AnnAssign)]


@pytest.mark.parametrize("name", ["run", "analysis", "needle"])
def test_paired_and_stripped(name: str):
    ipynb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    py = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert [(c.cell_type, c.source) for c in ipynb.cells] == [(c.cell_type, c.source) for c in py.cells]
    for c in ipynb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None
    # literal defaults, one comment each
    source = parameters_cell(ipynb)
    for line in source.splitlines():
        node = ast.parse(line).body[0]
        assert isinstance(node, ast.AnnAssign)
        ast.literal_eval(node.value)
        assert "  # " in line and line.count("=") == 1, line


def test_help_notebook_lists_every_parameter():
    names = parameter_names(parameters_cell(nbformat.read(NOTEBOOKS / "run.ipynb", as_version=4)))
    assert {"world_sizes", "strategies", "seq_lens", "device", "dtype", "variant", "timeout_s"} <= set(names)
    assert {"cached_lens", "ring_variants", "as_shipped"} <= set(names)
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(NOTEBOOKS / "run.ipynb")],
                         env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    listed = {line.split(":")[0].strip() for line in out.stdout.splitlines() if line.startswith("  ") and ":" in line}
    assert set(names) <= listed, set(names) - listed
    assert "processes (GPUs) per launch" in out.stdout  # the help comments come through


def test_the_needle_notebook_parameters_are_the_config_defaults():
    """notebooks/needle.ipynb's parameters are NeedleConfig's fields with its defaults, in its order
    (make needle reads the run folder from the config; the notebook runs it)."""
    from fmsring.harness.needle import NeedleConfig

    source = parameters_cell(nbformat.read(NOTEBOOKS / "needle.ipynb", as_version=4))
    values = {n.target.id: ast.literal_eval(n.value) for n in ast.parse(source).body}
    assert list(values) == NeedleConfig.names()
    assert NeedleConfig(**values) == NeedleConfig()


FIGURES = ("latency_prefill", "speedup_prefill", "efficiency_prefill", "max_prompt_prefill", "decode_per_token",
           "followup", "accuracy")  # fmt: skip


# slow: a papermill sweep plus its analysis; tests/harness/test_sweep.py runs the sweep and test_analysis_leaves_the_committed_runs_untouched the analysis notebook in the fast tier
@pytest.mark.slow
def test_run_then_analysis(tmp_path: Path):
    runs = tmp_path / "runs"
    run_dir = runs / "nb"
    run_dir.mkdir(parents=True)
    done = papermill(
        str(NOTEBOOKS / "run.ipynb"), str(run_dir / "run.ipynb"),
        "-p", "name", "nb", "-p", "out_dir", str(runs),
        "-y", "world_sizes: [2]", "-y", "seq_lens: [32, 64]", "-y", "phases: [prefill, decode, followup]",
        "-y", "cached_lens: [32]", "-p", "repeats", "1", "-p", "warmup", "0", "-p", "decode_tokens", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # single: 2 prefills, 2 decodes, 2 follow-ups; ring the same and a fresh prefill of 32+64
    # (32+32 is a prefill the grid measures anyway)
    assert len(rows) == 13 and {r["status"] for r in rows} == {"ok"}
    ring_prefills = [int(r["seq_len"]) for r in rows if r["strategy"] == "ring" and r["phase"] == "prefill"]
    assert sorted(ring_prefills) == [32, 64, 96]
    assert (run_dir / "params.json").exists() and any((run_dir / "logs").iterdir())
    executed = nbformat.read(run_dir / "run.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)

    done = papermill(  # as make sweep runs it: the run's figures into its own folder
        str(NOTEBOOKS / "analysis.ipynb"), str(run_dir / "analysis.ipynb"), "-y", f"run_dirs: ['{run_dir}']",
        "-p", "out_dir", str(runs),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = run_dir / "figures"
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (figures / f"{name}.{ext}").exists(), name
    assert not (figures / "memory_prefill.png").exists()  # no memory numbers on CPU: skipped, not failed
    executed = nbformat.read(run_dir / "analysis.ipynb", as_version=4)
    images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURES)  # the figures are displayed in the notebook too
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "exactness against single" in text and "cache_gain" in text


# slow: a second papermill sweep; the sweep's own failure exit is tested in tests/harness/test_sweep.py
@pytest.mark.slow
def test_a_sweep_without_success_fails_the_notebook(tmp_path: Path):
    """make sweep stops at the run notebook when no point succeeded, not at a missing figures folder."""
    runs = tmp_path / "runs"
    (runs / "bad").mkdir(parents=True)
    done = papermill(
        str(NOTEBOOKS / "run.ipynb"), str(runs / "bad" / "run.ipynb"), "-p", "name", "bad", "-p", "out_dir", str(runs),
        "-y", "world_sizes: [1]", "-y", "strategies: [single]", "-y", "seq_lens: [16]", "-y", "phases: [prefill]",
        "-p", "model_path", str(tmp_path / "missing"), "-p", "source", "hf", "-p", "repeats", "1",
    )  # fmt: skip
    assert done.returncode != 0
    assert "no point of the sweep succeeded" in done.stderr


def test_analysis_leaves_the_committed_runs_untouched(tmp_path: Path):
    """The analysis notebook's defaults draw a committed run's figures into runs/local/analysis/
    (git-ignored), never over the run's own tracked figures."""
    run = "2026-11-26_h200x4_llama3-8b_ak"  # a committed run with tracked figures/
    assert subprocess.run(["git", "ls-files", f"runs/{run}/figures"], cwd=ROOT, capture_output=True, text=True).stdout
    status = ["git", "status", "--porcelain", "--untracked-files=all", "runs/"]
    before = subprocess.run(status, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    done = papermill(str(NOTEBOOKS / "analysis.ipynb"), str(tmp_path / "out.ipynb"), "-y", f"run_dirs: [runs/{run}]")
    assert done.returncode == 0, done.stderr[-3000:]
    assert subprocess.run(status, cwd=ROOT, capture_output=True, text=True, check=True).stdout == before
    assert (ROOT / "runs" / "local" / "analysis" / run / "figures" / "latency_prefill.png").exists()
