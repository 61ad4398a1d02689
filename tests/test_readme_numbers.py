"""Every time the README quotes was measured: each "N ms" (both ends of "A-B ms") appears,
at the precision written, in a committed run's CSV or JSON under runs/, or is the earlier
project's own report (fmsring.harness.seed.REPORTED). A number typed by hand, or left behind
when the runs it came from changed, fails here -- surely for the tables' four- and five-digit
figures; a small one at one decimal can match some unrelated value by chance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from fmsring.harness.seed import REPORTED

ROOT = Path(__file__).resolve().parents[1]
TIME = re.compile(r"(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))? ?ms\b")


def _numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def measured_values() -> list[float]:
    values: list[float] = [r["latency_ms"] for r in REPORTED]
    for path in (ROOT / "runs").rglob("*.csv"):
        df = pd.read_csv(path)
        for col in df.columns:
            if col.endswith("ms") or "_ms_" in col:  # latency_ms, ttft_ms, latency_ms_max, ...
                values += pd.to_numeric(df[col], errors="coerce").dropna().tolist()
    for path in (ROOT / "runs").rglob("*.json"):
        values += _numbers(json.loads(path.read_text()))
    return values


def test_every_time_in_the_readme_comes_from_a_committed_run():
    known = {(round(v, d), d) for v in measured_values() for d in range(4)}
    quoted = []
    for m in TIME.finditer((ROOT / "README.md").read_text()):
        quoted += [s for s in m.groups() if s]
    assert len(quoted) > 50  # the README's tables are read, not skipped
    places = lambda s: len(s.partition(".")[2])  # noqa: E731
    missing = [s for s in quoted if (round(float(s), places(s)), places(s)) not in known]
    assert not missing, f"README times found in no file under runs/: {missing}"
