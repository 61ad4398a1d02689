"""fmsring.harness.needle and needle_plots: the config's checks, launches that fail or stall (killed,
their cases marked, finished rows kept), the table and heatmaps on synthetic rows, and the notebook
end to end on the demo model (`make model`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from fmsring.harness import launch, needle, needle_plots
from fmsring.harness.needle import COLUMNS, CSV, NeedleConfig, run_needle
from fmsring.harness.schema import append_rows, read_rows
from tests.harness.synthetic_runs import write_needle_run
from tests.test_notebooks import NOTEBOOKS, nbformat, papermill  # skipped where the notebook tools are missing


def checkpoint(tmp_path: Path, context: int = 1024) -> str:
    """A folder that passes for an HF checkpoint as far as the config's checks read it."""
    path = tmp_path / "ckpt"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": context}))
    return str(path)


def test_a_bad_config_names_every_problem_and_launches_nothing(tmp_path: Path):
    cfg = NeedleConfig(model_path=checkpoint(tmp_path), lengths=[512, "1K"], depths=[0, 120],
                       strategies=["single", "tp"], world_sizes=[0], max_new_tokens=8)  # fmt: skip
    assert cfg.lengths == [512, 1024]
    problems = "\n".join(cfg.problems())
    for said in ("unknown strategy 'tp'", "a depth is 0 to 100 (percent), got 120", "a world size is a positive integer",
                 "lengths [1024] plus 8 new tokens pass the model's context (1024)"):  # fmt: skip
        assert said in problems
    with pytest.raises(ValueError, match="cannot start"):
        run_needle(cfg, tmp_path)
    assert not (tmp_path / "runs").exists()
    assert "no HF checkpoint" in NeedleConfig(model_path=str(tmp_path / "none")).problems()[-1]
    assert "the grid is empty" in NeedleConfig(model_path=checkpoint(tmp_path), depths=[]).problems()[0]
    with pytest.raises(ValueError, match="positive integer"):
        NeedleConfig(lengths=["8Q"])


def test_the_reference_runs_first():
    cfg = NeedleConfig(strategies=["ring", "hf", "single"], world_sizes=[4, 1, 4])
    assert cfg.groups() == [("single", 1), ("hf", 1), ("ring", 4), ("ring", 1)]
    assert NeedleConfig(strategies=["ring"], world_sizes=[2]).groups() == [("ring", 2)]


def test_a_run_folder_holds_one_model_setting(tmp_path: Path):
    """Resuming into a folder answered with another seed (model, dtype, ...) would mix two runs' rows."""
    cfg = NeedleConfig(lengths=[256], depths=[50], out_dir=str(tmp_path), name="r")
    (tmp_path / "r").mkdir()
    config = {**vars(cfg), "model_path": str(cfg.checkpoint), "seed": 1}
    (tmp_path / "r" / "params.json").write_text(json.dumps({"config": config, "sessions": []}))
    with pytest.raises(ValueError, match="another seed"):
        run_needle(cfg)
    assert not (tmp_path / "r" / "logs").exists()


def test_the_run_folder_is_printed_for_make(tmp_path: Path, capsys):
    params = tmp_path / "grid.yaml"
    params.write_text(f"model_path: {tmp_path / 'Some-Model'}\nout_dir: {tmp_path}\n")
    needle.main(["--print-run-dir", "--params", str(params)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "needle-cpu-Some-Model")


@pytest.mark.parametrize("fault", ["dies", "stalls"])
def test_a_failed_launch_keeps_its_finished_case_and_marks_the_rest(tmp_path: Path, monkeypatch, fault: str):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    row = {"strategy": "ring", "world_size": 2, "length": 256, "depth": 0, "answer": "x", "retrieved": True,
           "prefill_s": 0.1, "status": "ok"}  # fmt: skip
    append_rows(tmp_path / "row.csv", [row], COLUMNS)
    # a launch that finishes one case (its row appended, as the worker's rank 0 does), then dies or hangs
    then = "raise SystemExit(3)" if fault == "dies" else "time.sleep(600)"
    code = f"import sys, time; open(sys.argv[1], 'a').write(open(sys.argv[2]).read()); {then}"
    monkeypatch.setattr(launch, "launch_command", lambda *a: [sys.executable, "-c", code, str(run_dir / CSV),
                                                               str(tmp_path / "row.csv")])  # fmt: skip
    cfg = NeedleConfig(model_path=checkpoint(tmp_path), timeout_s=3.0)
    t0 = time.monotonic()
    record = needle._launch(cfg, run_dir, "ring", 2, [(256, 0), (256, 100), (512, 0)], "t")
    assert time.monotonic() - t0 < 60  # a stalled launch is killed, never waited for
    rows = read_rows(run_dir / CSV)
    assert [(r["length"], r["depth"], r["status"]) for r in rows] == [
        ("256", "0", "ok"), ("256", "100", "error" if fault == "dies" else "timeout"),
        ("512", "0", "error" if fault == "dies" else "timeout"),
    ]  # fmt: skip
    assert ("exit code 3" if fault == "dies" else "timeout") in rows[-1]["error"] and record["failed"] == 2
    assert needle.finished(run_dir) == {("ring", 2, 256, 0.0)}  # what a resumed run skips


def test_the_table_and_heatmaps_of_a_run(tmp_path: Path):
    write_needle_run(tmp_path)
    df = needle_plots.load(tmp_path)
    assert len(df) == 12 and list(dict.fromkeys(df["panel"])) == ["FMS unsharded", "ring, 2 ranks", "ring, 4 ranks"]
    failed = df[df["status"] != "ok"]
    assert [(r.world_size, r.length, r.depth) for r in failed.itertuples()] == [(4, 2048, 0)]  # the retried one kept ok
    table = needle_plots.summary(df).set_index("strategy")
    assert table.loc["FMS unsharded", ["found", "identical tokens", "failed"]].tolist() == ["4/4", "-", 0]
    assert table.loc["ring, 2 ranks", ["found", "identical tokens"]].tolist() == ["3/4", "3/4"]
    assert table.loc["ring, 4 ranks", ["cases", "found", "identical tokens", "failed"]].tolist() == [4, "3/3", "3/3", 1]
    assert table.loc["ring, 2 ranks", "max logit diff"] == pytest.approx(2e-5)
    figs = needle_plots.figures(df, tmp_path / "figures")
    assert set(figs) == {"retrieval", "identical"}
    for name in figs:
        for ext in ("png", "pdf"):
            assert (tmp_path / "figures" / f"{name}.{ext}").stat().st_size > 1000
    assert len(figs["retrieval"].axes) == 3 and len(figs["identical"].axes) == 2  # the reference is not compared
    texts = {t.get_text() for t in figs["retrieval"].axes[2].texts}
    assert {"found", "error"} <= texts and "missed" in {t.get_text() for t in figs["retrieval"].axes[1].texts}

    alone = tmp_path / "no_single"
    alone.mkdir()
    write_needle_run(alone, with_single=False)
    df = needle_plots.load(alone)
    df["identical_tokens"] = None  # nothing to compare with
    assert set(needle_plots.figures(df)) == {"retrieval"}


# slow: three launches (FMS, HF, ring at 2 ranks) of the demo model, minutes on 2 shared cores
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_notebook_end_to_end(tmp_path: Path):
    run_dir = tmp_path / "runs" / "nb"
    run_dir.mkdir(parents=True)
    done = papermill(
        str(NOTEBOOKS / "needle.ipynb"), str(run_dir / "needle.ipynb"), "-p", "out_dir", str(tmp_path / "runs"),
        "-p", "name", "nb", "-y", "lengths: [200, 400]", "-y", "depths: [0, 100]",
        "-y", "strategies: [single, ring, hf]", "-y", "world_sizes: [2]", "-p", "max_new_tokens", "24",
        timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(run_dir / CSV)
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert {r["identical_tokens"] for r in rows if r["strategy"] != "single"} == {"True"}  # the ring is exact
    assert all(float(r["logits_max_abs_diff"]) < 1e-3 for r in rows if r["strategy"] != "single")
    assert sum(r["retrieved"] == "True" for r in rows) >= 6  # the demo model finds most needles this short
    assert all(int(r["prompt_tokens"]) <= int(r["length"]) and r["git_sha"] for r in rows)
    for name in ("retrieval", "identical"):
        assert (run_dir / "figures" / f"{name}.png").exists() and (run_dir / "figures" / f"{name}.pdf").exists()
    executed = nbformat.read(run_dir / "needle.ipynb", as_version=4)
    images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
    params = json.loads((run_dir / "params.json").read_text())
    assert params["config"]["lengths"] == [200, 400] and len(params["sessions"][-1]["launches"]) == 3

    # the same notebook again: every case has its row, so nothing is launched and nothing is added
    again = papermill(str(NOTEBOOKS / "needle.ipynb"), str(tmp_path / "again.ipynb"), "-p", "out_dir",
                      str(tmp_path / "runs"), "-p", "name", "nb", "-y", "lengths: [200, 400]", "-y", "depths: [0, 100]",
                      "-y", "strategies: [single, ring, hf]", "-y", "world_sizes: [2]", "-p", "max_new_tokens", "24")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_rows(run_dir / CSV)) == 12
    assert json.loads((run_dir / "params.json").read_text())["sessions"][-1]["launches"] == []
