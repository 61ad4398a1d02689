"""Benchmark sweeps: one ``torchrun -m fmsring.bench`` per (world size, strategy).

A sweep writes one run folder, ``<out_dir>/<name>/``::

    results.csv             one row per point (see fmsring.harness.schema.Point)
    results.ceilings.json   the device's measured rates, which the rows' floor_ms divide by
    params.json             the config, the environment, and what each group did
    logs/                   stdout/stderr of every launch (nothing goes to the notebook), and
                            torchrun's error file of each failed one (<launch>.error.json)

The whole grid is checked before anything is launched (unknown names, a GPU
that is not there, tensor-parallel sizes the model's heads do not divide, ...),
so a bad sweep fails in a second, not after an hour. Faults stay inside their
group: a group that fails, is killed or hangs past ``timeout_s`` gets an
``error``/``oom``/``timeout`` row for each point it did not finish, and the
sweep goes on. Re-running the same sweep (same folder) measures only the points
without a finished (ok, skipped or mismatch) row, so rows are never duplicated.
At the end it prints how many points ended in each status; ``main`` exits
non-zero when none succeeded.

From Python::

    from fmsring.harness.sweep import SweepConfig, run_sweep
    run_dir = run_sweep(SweepConfig(world_sizes=[1, 2], strategies=["single", "ring"], seq_lens=[128, 256]))

From a shell: ``python -m fmsring.sweep --params params.yaml`` or flags
(``python -m fmsring.sweep --help``, one per setting); flags override the file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from fmsring.harness import launch
from fmsring.harness.grid import NOTEBOOK_DEFAULTS, SweepConfig, from_make, notebook_config, validate
from fmsring.harness.plan import point, ring_tp_of
from fmsring.harness.provenance import environment, now, row_provenance, write_json
from fmsring.harness.schema import STATUSES, Point, Strategy, append_rows, check_header, done_points, read_rows, row_key
from fmsring.harness.settings import add_flags

__all__ = ["SweepConfig", "grid_status", "main", "repo_root", "run_sweep"]


def repo_root() -> Path:
    """The checkout the caller runs in (Jupyter starts notebooks in notebooks/, make at the root)."""
    for p in (Path.cwd(), *Path.cwd().parents):
        if (p / "pyproject.toml").exists() and (p / "fmsring").is_dir():
            return p
    return Path.cwd()


# ---------------------------------------------------------------------------
# the sweep


def _check_identity(run_dir: Path, cfg: SweepConfig) -> dict[str, Any] | None:
    params = run_dir / "params.json"
    if not params.exists():
        return None
    old = json.loads(params.read_text())
    before = old.get("config", {})
    diff = {k: (before.get(k), v) for k, v in cfg.identity().items() if k in before and before.get(k) != v}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{run_dir} holds a sweep of another setup ({changes}); pick another name (or out_dir) for this one"
        )
    return old


def run_sweep(cfg: SweepConfig, progress: bool = True) -> Path:
    """Check the grid, then run (or resume) it; print its statuses; return its run folder."""
    try:  # a widget in Jupyter when ipywidgets is there, else a text bar (papermill, shells)
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm

    validate(cfg)
    run_dir = cfg.run_dir.resolve()
    results = run_dir / "results.csv"
    check_header(results)
    old = _check_identity(run_dir, cfg)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = environment()
    session = {"started": now(), "finished": None, "interrupted": False, "config": cfg.to_dict(),
               "environment": env, "groups": []}  # fmt: skip
    params = old or {"name": run_dir.name, "created": session["started"], "environment": env, "sessions": []}
    params["config"] = cfg.to_dict()
    params["sessions"].append(session)
    write_json(run_dir / "params.json", params)
    append_rows(results, [])  # header, or a newline after a torn last line

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bar = tqdm(cfg.groups(), desc=f"sweep {run_dir.name}", unit="group", disable=not progress, dynamic_ncols=True)
    try:
        for gi, (world, strategy) in enumerate(bar):
            bar.set_postfix_str(f"{strategy} x{world}")
            session["groups"].append(_run_group(cfg, world, strategy, results, logs, f"{stamp}-{gi}", bar))
            write_json(run_dir / "params.json", params)
    except BaseException:
        session["interrupted"] = True
        raise
    finally:
        bar.close()
        session["finished"] = now()
        write_json(run_dir / "params.json", params)
    counts = grid_status(cfg)
    session["statuses"] = dict(counts)
    write_json(run_dir / "params.json", params)
    print(f"sweep {run_dir.name}: {describe(counts)}", flush=True)
    return run_dir


def grid_status(cfg: SweepConfig) -> Counter:
    """How many of the grid's points ended in each status (a point's latest row counts)."""
    latest = {row_key(r): r["status"] for r in read_rows(cfg.run_dir / "results.csv")}
    return Counter(latest.get(p, "missing") for p in cfg.grid())


def describe(counts: Counter) -> str:
    """``12 points: 10 ok, 1 mismatch, 1 oom`` in status order."""
    order = [*STATUSES, "missing"]
    parts = [f"{counts[s]} {s}" for s in sorted(counts, key=order.index) if counts[s]]
    return f"{sum(counts.values())} points: " + ", ".join(parts)


def _run_group(cfg: SweepConfig, world: int, strategy: str, results: Path, logs: Path, tag: str, bar) -> dict:
    done = done_points(results)
    wanted = cfg.points(world, strategy)
    todo = [p for p in wanted if p not in done]
    record: dict[str, Any] = {"world_size": world, "strategy": strategy, "points": len(wanted), "todo": len(todo)}
    if not todo:
        record["status"] = "done before"
        return record
    name = f"{tag}-w{world}-{strategy}"
    cmd = cfg.launch_command(world, cfg.bench_args(strategy, results), tag=name)
    out_log, err_log = logs / f"{name}.stdout.log", logs / f"{name}.stderr.log"
    error_file = logs / f"{name}.error.json"  # torchrun copies the first failed rank's error file here
    offset = results.stat().st_size

    def poll() -> None:
        bar.set_postfix_str(f"{strategy} x{world}: {len(read_rows(results, offset))}/{len(todo)} points")

    grace = 30.0 if cfg.launcher == "srun" else 5.0  # srun needs time to pass SIGTERM on to its remote tasks
    env = launch.child_env({**cfg.env, "TORCHELASTIC_ERROR_FILE": str(error_file)})
    outcome = launch.run_launch(cmd, env, out_log, err_log, cfg.timeout_s, grace, poll)
    new = read_rows(results, offset)
    got = {row_key(r) for r in new}
    unfinished = [p for p in todo if p not in got]
    statuses = Counter(r["status"] for r in new)
    if unfinished:
        status, error = launch.failure_reason(error_file, outcome.returncode, outcome.timed_out, cfg.timeout_s)
        append_rows(results, [_failure_row(cfg, p, status, error) for p in unfinished])
        statuses[status] += len(unfinished)
    record.update(
        command=shlex.join(cmd), returncode=outcome.returncode, timed_out=outcome.timed_out, seconds=outcome.seconds,
        statuses=dict(statuses), status="ok" if set(statuses) <= {"ok", "skipped"} else "failed",
        stdout=str(out_log.relative_to(results.parent)), stderr=str(err_log.relative_to(results.parent)),
    )
    return record


def _failure_row(cfg: SweepConfig, p: Point, status: str, error: str) -> dict[str, Any]:
    ring_tp = ring_tp_of(cfg.ring_variants.get(p.variant, {})) if p.strategy == Strategy.RING else 1
    row = point(p.strategy, p.world_size, p.seq_len, p.phase, batch=cfg.batch, dtype=cfg.dtype, layout=cfg.layout,
                variant=p.variant, cached_len=p.cached_len, ring_tp=ring_tp, padding=cfg.padding)  # fmt: skip
    return {**row, "status": status, "error": error, **row_provenance(cfg, cfg.repeats), "timestamp": now()}


# ---------------------------------------------------------------------------
# CLI


def config_from_args(argv: list[str] | None = None) -> tuple[SweepConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m fmsring.sweep",
        description="Run (or resume) a benchmark sweep of fmsring.bench; flags override --params.",
    )
    p.add_argument("--params", help="YAML file of SweepConfig fields")
    p.add_argument("--print-run-dir", action="store_true", help="print the run folder this config resolves to and exit")
    p.add_argument("--print-name", action="store_true", help="print the run name this config resolves to and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--notebook-settings", nargs="*", metavar="VAR=value",
                   help="make sweep's variables: write the run notebook's parameters into the run folder, print it")  # fmt: skip
    add_flags(p, SweepConfig, defaults=False)
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in SweepConfig.names() and v is not None}
    cfg = SweepConfig.from_yaml(args.params, **overrides) if args.params else SweepConfig.from_dict(overrides)
    return cfg, args


def notebook_settings(words: list[str]) -> Path:
    """For ``make sweep VAR=value ...``: the run notebook's parameters (the settings given, over
    PARAMS's) written to ``<run folder>/notebook.yaml`` for papermill's ``-f``; the run folder."""
    params = next((w.partition("=")[2] for w in words if w.startswith("PARAMS=")), None)
    given = from_make([w for w in words if not w.startswith("PARAMS=")], params)
    cfg = notebook_config({**yaml.safe_load(NOTEBOOK_DEFAULTS.read_text()), **given})
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "notebook.yaml").write_text(yaml.safe_dump({**given, "name": cfg.run_name}))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 some point succeeded, 1 none did, 2 a bad config or grid, 130 interrupted."""
    try:
        cfg, args = config_from_args(argv)
        if args.notebook_settings is not None:
            print(notebook_settings(args.notebook_settings))
            return 0
        if args.print_name or args.print_run_dir:
            print(cfg.run_name if args.print_name else cfg.run_dir)
            return 0
        run_dir = run_sweep(cfg, progress=not args.no_progress)
    except ValueError as exc:
        print(f"fmsring.sweep: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(run_dir)
    if not grid_status(cfg)["ok"]:
        print(f"fmsring.sweep: no point succeeded; see {run_dir / 'logs'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
