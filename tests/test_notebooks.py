"""The notebooks: paired with their .py, outputs stripped, parameters documented, and they run under papermill."""

from __future__ import annotations

import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.mark.parametrize("name", ["run", "analysis"])
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
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(NOTEBOOKS / "run.ipynb")],
                         env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    listed = {line.split(":")[0].strip() for line in out.stdout.splitlines() if line.startswith("  ") and ":" in line}
    assert set(names) <= listed, set(names) - listed
    assert "processes (GPUs) per launch" in out.stdout  # the help comments come through


def test_run_then_analysis(tmp_path: Path):
    runs = tmp_path / "runs"
    run_dir = runs / "nb"
    run_dir.mkdir(parents=True)
    done = papermill(
        str(NOTEBOOKS / "run.ipynb"), str(run_dir / "run.ipynb"),
        "-p", "name", "nb", "-p", "out_dir", str(runs),
        "-y", "world_sizes: [2]", "-y", "seq_lens: [32, 64]", "-y", "phases: [prefill, decode]",
        "-p", "repeats", "1", "-p", "warmup", "0", "-p", "decode_tokens", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert (run_dir / "params.json").exists() and any((run_dir / "logs").iterdir())
    executed = nbformat.read(run_dir / "run.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)

    done = papermill(
        str(NOTEBOOKS / "analysis.ipynb"), str(run_dir / "analysis.ipynb"), "-y", f"run_dirs: ['{run_dir}']"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = run_dir / "figures"
    for name in ("latency_prefill", "speedup_prefill", "efficiency_prefill", "max_prompt_prefill", "decode_per_token"):
        for ext in ("png", "pdf"):
            p = figures / f"{name}.{ext}"
            assert p.exists() and p.stat().st_size > 1000, p
    assert not (figures / "memory_prefill.png").exists()  # no memory numbers on CPU: skipped, not failed
    executed = nbformat.read(run_dir / "analysis.ipynb", as_version=4)
    images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # the figures are displayed in the notebook too
