"""fmsring.sweep end to end: real torchrun launches of the bench on CPU/gloo, faults injected into
the launched ranks (a killed rank, a hung group, Ctrl-C), every point accounted for once."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fmsring.harness import launch, schema, sweep
from fmsring.harness.schema import COLUMNS
from fmsring.harness.sweep import SweepConfig, run_sweep
from tests.conftest import ROOT

TINY = dict(
    model_kwargs={"nlayers": 2},
    repeats=1,
    warmup=0,
    decode_tokens=2,
    timeout_s=240,
)


HOOK = r"""
import json, os, signal, sys

_spec = json.loads(os.environ.get("FMSRING_TEST_FAULT") or "null")


def _mine():
    if not _spec or "RANK" not in os.environ:
        return False
    if int(os.environ["RANK"]) != _spec["rank"] or int(os.environ["WORLD_SIZE"]) != _spec["world_size"]:
        return False
    argv = sys.argv
    return "--strategies" in argv and argv[argv.index("--strategies") + 1] == _spec["strategy"]


def _act():
    sys.stderr.write(f"[fault hook] {_spec['action']} rank {os.environ['RANK']}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL if _spec["action"] == "kill" else signal.SIGSTOP)


if _spec:
    import csv

    _writerow, _calls = csv.DictWriter.writerow, {"rows": 0, "gathers": 0}

    def writerow(self, row):
        # rank 0 writes each point's row: act before the (after_rows + 1)-th one
        if row.get("phase") in ("prefill", "decode") and _spec.get("after_rows") is not None and _mine():
            if _calls["rows"] == _spec["after_rows"]:
                _act()
            _calls["rows"] += 1
        return _writerow(self, row)

    csv.DictWriter.writerow = writerow

    if _spec.get("after_gathers") is not None:
        import torch.distributed as dist

        _gather = dist.all_gather_object

        def all_gather_object(*args, **kwargs):
            # every rank gathers once per point to agree on its status
            if _mine():
                if _calls["gathers"] == _spec["after_gathers"]:
                    _act()
                _calls["gathers"] += 1
            return _gather(*args, **kwargs)

        dist.all_gather_object = all_gather_object
"""


def fault_env(tmp_path: Path, **spec) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    return {"PYTHONPATH": str(hook), "FMSRING_TEST_FAULT": json.dumps(spec)}


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def keys(rows: list[dict[str, str]]) -> Counter:
    return Counter(schema.row_key(r) for r in rows)


def points(cfg: SweepConfig) -> Counter:
    return Counter(cfg.grid())


def stray_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (a run folder)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found.append(cmd)
    return found


def test_tiny_sweep_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture):
    cfg = SweepConfig(out_dir=str(tmp_path), name="tiny", world_sizes=[2], strategies=["single", "ring"],
                      seq_lens=[32, 64], phases=["prefill", "decode", "followup"], cached_lens=[24], as_shipped=True,
                      **TINY)  # fmt: skip
    run_dir = run_sweep(cfg, progress=False)
    assert run_dir == (tmp_path / "tiny").resolve()
    assert "sweep tiny: 20 points: 20 ok" in capsys.readouterr().out

    header, rows = read_csv(run_dir / "results.csv")
    assert tuple(header) == COLUMNS
    assert keys(rows) == points(cfg) and len(rows) == 6 + 6 + 8  # single twice (as shipped too); ring: +2 P+T
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows]
    for r in rows:
        assert float(r["latency_ms"]) > 0
        assert r["device"] == "cpu" and r["model"] == 'llama/micro {"nlayers": 2}'
    checked = [r for r in rows if r["strategy"] == "ring" or r["variant"] == "as-shipped"]
    assert all(float(r["rel_err"]) <= 1e-4 and r["same_next_token"] == "True" for r in checked)

    params = json.loads((run_dir / "params.json").read_text())
    assert params["config"]["world_sizes"] == [2] and params["config"]["model_kwargs"] == {"nlayers": 2}
    env = params["environment"]
    assert env["torch"] and env["host"] and "ibm_fms" in env and "git_sha" in env and "gpus" in env
    (session,) = params["sessions"]
    assert [(g["world_size"], g["strategy"], g["status"]) for g in session["groups"]] == [
        (1, "single", "ok"),
        (2, "ring", "ok"),
    ]

    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert any(n.endswith("w1-single.stdout.log") for n in logs) and any(n.endswith("w2-ring.stderr.log") for n in logs)
    ring_out = next((run_dir / "logs").glob("*w2-ring.stdout.log")).read_text()
    assert "torch.distributed.run" in ring_out and "--nproc_per_node=2" in ring_out and "[bench]" in ring_out

    # the same sweep again: nothing left to do, nothing launched, nothing added
    before = (run_dir / "results.csv").read_bytes()
    run_sweep(cfg, progress=False)
    assert (run_dir / "results.csv").read_bytes() == before
    params = json.loads((run_dir / "params.json").read_text())
    assert [g["status"] for g in params["sessions"][-1]["groups"]] == ["done before", "done before"]

    # another setup in the same folder is refused
    with pytest.raises(ValueError, match="another setup"):
        run_sweep(SweepConfig(**{**cfg.to_dict(), "dtype": "bfloat16"}), progress=False)


def test_exit_code_when_no_point_succeeds(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Only failures: the summary says so, and the exit code is not 0 (make sweep stops there)."""
    argv = ["--out-dir", str(tmp_path), "--name", "none", "--world-sizes", "1", "--strategies", "single",
            "--seq-lens", "16,32", "--phases", "prefill", "--model-path", str(tmp_path / "missing"),
            "--source", "hf", "--repeats", "1", "--warmup", "0", "--no-progress"]  # fmt: skip
    assert sweep.main(argv) == 1
    out, err = capsys.readouterr()
    assert "sweep none: 2 points: 2 error" in out and "no point succeeded" in err
    _, rows = read_csv(tmp_path / "none" / "results.csv")
    assert [r["status"] for r in rows] == ["error", "error"] and all("loading" in r["error"] for r in rows)
    with pytest.raises(SystemExit) as bad:  # a bad config: 2, before anything runs
        sweep.main([*argv, "--world-sizes", "0"])
    assert bad.value.code == 2
    assert sweep.main([*argv, "--padding", "0.5"]) == 2


@pytest.mark.slow  # fast: test_launch's failure_reason without an error file
def test_killed_rank_is_recorded_and_sweep_goes_on(tmp_path: Path):
    # rank 1 of ring x2 is SIGKILLed mid-way (after two points); ring x1 runs next
    env = fault_env(tmp_path, world_size=2, rank=1, strategy="ring", after_gathers=3, action="kill")
    cfg = SweepConfig(out_dir=str(tmp_path), name="kill", world_sizes=[2, 1], strategies=["ring"],
                      seq_lens=[16, 32, 48], phases=["prefill"], env=env, **TINY)  # fmt: skip
    run_dir = run_sweep(cfg, progress=False)
    _, rows = read_csv(run_dir / "results.csv")
    assert keys(rows) == points(cfg)  # every point exactly once, failed ones included
    killed = {int(r["seq_len"]): r for r in rows if r["world_size"] == "2"}
    assert killed[16]["status"] == "ok" and killed[32]["status"] == "ok"
    assert killed[48]["status"] == "error"
    assert killed[48]["error"], killed[48]
    assert all(r["status"] == "ok" for r in rows if r["world_size"] == "1")
    group = json.loads((run_dir / "params.json").read_text())["sessions"][0]["groups"][0]
    assert group["status"] == "failed" and group["returncode"] != 0
    assert "[fault hook] kill rank 1" in (run_dir / group["stderr"]).read_text()
    assert not stray_processes(str(run_dir))


@pytest.mark.slow  # fast: test_launch's run_launch timeout and kill_tree
def test_hung_group_times_out_and_sweep_goes_on(tmp_path: Path):
    # single stops itself (SIGSTOP) before writing its second row: the launch hangs
    env = fault_env(tmp_path, world_size=1, rank=0, strategy="single", after_rows=1, action="stop")
    cfg = SweepConfig(out_dir=str(tmp_path), name="hang", world_sizes=[1], strategies=["single", "ring"],
                      seq_lens=[32, 64], phases=["prefill"], env=env, **{**TINY, "timeout_s": 30})  # fmt: skip
    t0 = time.monotonic()
    run_dir = run_sweep(cfg, progress=False)
    _, rows = read_csv(run_dir / "results.csv")
    assert keys(rows) == points(cfg)
    single = {int(r["seq_len"]): r for r in rows if r["strategy"] == "single"}
    assert single[32]["status"] == "ok"
    assert single[64]["status"] == "timeout" and "timeout" in single[64]["error"]
    assert all(r["status"] == "ok" for r in rows if r["strategy"] == "ring")
    group = json.loads((run_dir / "params.json").read_text())["sessions"][0]["groups"][0]
    assert group["timed_out"] and 30 <= group["seconds"] < 60
    assert time.monotonic() - t0 < 120
    assert not stray_processes(str(run_dir))  # the stopped worker was killed too


@pytest.mark.slow  # fast: test_launch's kill_tree, test_bench's --resume, the tiny sweep's rerun
def test_interrupt_and_resume(tmp_path: Path):
    run_dir = tmp_path / "resume"
    cmd = [sys.executable, "-m", "fmsring.sweep", "--out-dir", str(tmp_path), "--name", "resume",
           "--world-sizes", "2", "--strategies", "single,ring", "--seq-lens", "16,32,48", "--phases", "prefill,decode",
           "--model-kwargs", '{"nlayers": 2}', "--repeats", "1", "--warmup", "0", "--decode-tokens", "2",
           "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a shell's background job (`make test &`) ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - the test starts no threads
    )
    results = run_dir / "results.csv"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and len(schema.read_rows(results)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)  # Ctrl-C (or a notebook's interrupt) mid-way
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "resume" in err
    assert not stray_processes(str(run_dir))
    _, first = read_csv(results)
    assert 3 <= len(first) < 12 and all(r["status"] == "ok" for r in first)

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _, rows = read_csv(results)
    cfg = SweepConfig(world_sizes=[2], strategies=["single", "ring"], seq_lens=[16, 32, 48])
    assert keys(rows) == points(cfg)  # nothing lost, nothing twice
    assert rows[: len(first)] == first  # the first run's rows are kept as they were
    assert all(r["status"] == "ok" for r in rows)
    params = json.loads((run_dir / "params.json").read_text())
    assert [s["interrupted"] for s in params["sessions"]] == [True, False]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # fast: test_grid's srun command and test_mesh's two torchrun nodes
def test_two_nodes_c10d_rendezvous(tmp_path: Path):
    """Two torchrun "nodes" on this machine meet through c10d and run a ring bench."""
    out = tmp_path / "results.csv"
    cfg = SweepConfig(world_sizes=[2], strategies=["ring"], seq_lens=[32, 48], phases=["prefill", "decode"], **TINY)
    args = cfg.bench_args("ring", out)
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for node in (0, 1):
        cmd = launch.torchrun_command(1, nnodes=2, rdzv_endpoint=endpoint, rdzv_id="two-nodes", node_rank=node) + args
        assert "--rdzv_backend=c10d" in cmd and "--nnodes=2" in cmd
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(
            (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log)
        )
    try:
        for p, _ in procs:
            p.wait(timeout=180)
    finally:
        for p, log in procs:
            if p.poll() is None:
                launch.kill_tree(p)
            log.close()
    logs = "\n".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert [p.returncode for p, _ in procs] == [0, 0], logs
    _, rows = read_csv(out)
    assert keys(rows) == Counter(schema.Point("ring", "", 2, n, 0, p) for n in (32, 48) for p in ("prefill", "decode"))
    assert all(r["status"] == "ok" and float(r["max_abs_err"]) < 1e-3 for r in rows), rows
