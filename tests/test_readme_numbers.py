"""Every measurement the README quotes comes from the committed run it names.

The README is read as blocks -- a paragraph, or one row of a table -- each quoting the run folder
named last in its section (``runs/<folder>``) up to and including it. In every block outside code:

* each time ("N ms", both ends of "A-B ms") is, at the precision written, a value of a time column
  of that folder's CSVs (``latency_ms``, ``ttft_ms``, ``floor_ms``, ...); each "N GiB" a
  ``peak_mem_gib``. So a table's peers are rows of the same run, and a number typed by hand, or left
  behind when its run changed, fails here;
* each ratio ("1.98x", with its decimals) is the ratio of two times quoted in the same block, at the precision written;
* each figure is a committed PNG of that folder's ``figures/``.

Each folder quoted is named with its card as its rows give it ("2x H200") in the same section, and
the README names runs by folder, never by the letter at the end of one.
"""

from __future__ import annotations

import json
import re

import pandas as pd

from tests.conftest import ROOT

TIME = re.compile(r"(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))? ?ms\b")
GIB = re.compile(r"(\d+(?:\.\d+)?) ?GiB\b")
RATIO = re.compile(r"(\d+\.\d+)x\b")  # "2x H200" is a card count, not a ratio
FOLDER = re.compile(r"runs/(\d{4}-\d\d-\d\d_[A-Za-z0-9_-]+)")
# A decimal in a table of times that is not a ratio, a share, a size or a rate, nor marked derived.
CELL = re.compile(r"(?<![\w.~+-])(\d+\.\d+)(?![\w.%]| ?(?:GiB|GB|TB|TFLOP))")
FIGURE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


def readme() -> str:
    return re.sub(r"^```.*?^```$", "", (ROOT / "README.md").read_text(), flags=re.MULTILINE | re.DOTALL)


def sections() -> list[str]:
    return readme().split("\n## ")


def blocks() -> list[tuple[str, str | None]]:
    """(block, the run folder it quotes) for every paragraph and table row of the README."""
    out = []
    for section in sections():
        folder = None
        for para in section.split("\n\n"):
            rows = para.splitlines() if para.lstrip().startswith("|") else [para]
            for block in rows:
                folder = ([folder] + FOLDER.findall(block))[-1]
                out.append((block, folder))
    return out


def places(s: str) -> int:
    return len(s.partition(".")[2])


def known(values) -> set[tuple[float, int]]:
    return {(round(v, d), d) for v in values for d in range(5)}


def run_values(folder: str) -> tuple[set, set, pd.DataFrame]:
    """The times and memory of every row in the folder's CSVs, and its rows."""
    frames = [pd.read_csv(p) for p in sorted((ROOT / "runs" / folder).glob("*.csv"))]
    assert frames, f"runs/{folder} has no CSV"
    times, gib = [], []
    for df in frames:
        for col in df.columns:
            if col.endswith("_ms") or "_ms_" in col:
                times += pd.to_numeric(df[col], errors="coerce").dropna().tolist()
        if "peak_mem_gib" in df.columns:
            gib += pd.to_numeric(df["peak_mem_gib"], errors="coerce").dropna().tolist()
    return known(times), known(gib), pd.concat(frames)


def quoted(pattern: re.Pattern, block: str) -> list[str]:
    return [s for m in pattern.finditer(block) for s in m.groups() if s]


def test_every_number_comes_from_the_run_it_names():
    missing, count = [], 0
    for block, folder in blocks():
        times, gib = quoted(TIME, block), quoted(GIB, block)
        if not times and not gib:
            continue
        assert folder, f"numbers quoted with no run folder named before them: {block!r}"
        run_times, run_gib, _ = run_values(folder)
        missing += [f"{s} ms ({folder})" for s in times if (round(float(s), places(s)), places(s)) not in run_times]
        missing += [f"{s} GiB ({folder})" for s in gib if (round(float(s), places(s)), places(s)) not in run_gib]
        count += len(times) + len(gib)
    assert count > 50  # the tables are read, not skipped
    assert not missing, f"README numbers found in no CSV of the run folder they quote: {missing}"


def test_every_ratio_is_one_of_its_times_over_another():
    wrong = []
    for block, _ in blocks():
        times = [float(s) for s in quoted(TIME, block)]
        for r in quoted(RATIO, block):
            if not any(round(a / b, places(r)) == float(r) for a in times for b in times if b):
                wrong.append(f"{r}x in {block!r}")
    assert not wrong, f"ratios that are no ratio of two times beside them: {wrong}"


def test_figures_are_committed_plots_of_the_run_they_illustrate():
    figures = 0
    for block, folder in blocks():
        for path in FIGURE.findall(block):
            figures += 1
            assert (ROOT / path).is_file(), f"{path} is not committed"
            assert re.fullmatch(rf"runs/{re.escape(folder or '')}/figures/\w+\.png", path), (
                f"{path} is not a figure of the run its section quotes ({folder})"
            )
    assert figures >= 3  # one per phase


def test_each_run_is_named_with_its_card():
    for section in sections():
        for folder in set(FOLDER.findall(section)):
            rows = run_values(folder)[2]
            if "gpu_name" not in rows:  # a CPU run (the needle's rows name the device only)
                assert set(rows["device"]) == {"cpu"} and "CPU" in section, f"runs/{folder} is quoted without CPU"
                continue
            card = rows["gpu_name"].iloc[0].removeprefix("NVIDIA ").split()[0]
            named = f"{int(rows['gpu_count'].iloc[0])}x {card}"
            assert named in section, f"runs/{folder} is quoted without its card ({named})"


def test_runs_are_named_by_folder_not_by_letter():
    text = readme()
    letters = re.findall(r"`_[a-z]{1,2}`|\bruns? _[a-z]{1,2}\b", text)
    assert not letters, f"run letters in the README: {letters}"
    for folder in FOLDER.findall(text):
        assert (ROOT / "runs" / folder).is_dir(), f"runs/{folder} does not exist"


def _times(obj, timed: bool = False) -> list[float]:
    """The numbers of a JSON file that sit under a key naming milliseconds (``wall_ms``, ``ms``, ...)."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _times(v, timed or bool(re.search(r"(^|_)ms($|_)", str(k))))]
    if isinstance(obj, list):
        return [x for v in obj for x in _times(v, timed)]
    return [float(obj)] if timed and isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def folder_times(folder: str) -> set[tuple[float, int]]:
    """Every time in the folder's CSVs and JSON files (profiles)."""
    values = []
    for path in (ROOT / "runs" / folder).rglob("*.csv"):
        df = pd.read_csv(path)
        for col in df.columns:
            if col == "ms" or col.endswith("_ms") or "_ms_" in col:  # "ms": a kernel sweep's rows
                values += pd.to_numeric(df[col], errors="coerce").dropna().tolist()
    for path in (ROOT / "runs" / folder).rglob("*.json"):
        values += _times(json.loads(path.read_text()))
    return known(values)


def test_performance_numbers_come_from_the_runs_their_sections_name():
    """docs/performance.md: every time not marked derived (``~``, ``+``, ``-`` before it), and every
    bare decimal in a table row that quotes times, is in a CSV or JSON file (a profile) of a run
    folder its section names; no run letters; every folder
    named exists. Looser than the README's check (a section names several runs, and a profile
    holds many numbers), but a number with no run behind it fails."""
    text = (ROOT / "docs" / "performance.md").read_text()
    assert not re.findall(r"`_[a-z]{1,2}`|\bruns? _[a-z]{1,2}\b", text), "run letters in performance.md"
    missing, count = [], 0
    for folder in set(FOLDER.findall(text)):
        assert (ROOT / "runs" / folder).is_dir(), f"runs/{folder} does not exist"
    for section in text.split("\n## "):
        folders: list[str] = []
        for para in section.split("\n\n"):
            folders = FOLDER.findall(para) or folders  # a table quotes the runs named just before it
            runs = set().union(*map(folder_times, folders))
            for line in para.splitlines():
                if line.startswith("|") and "ms" in line:  # a table of times: its bare decimals are times too
                    quoted = CELL.findall(line)
                else:
                    quoted = [
                        s
                        for m in TIME.finditer(line)
                        if line[max(m.start() - 1, 0)] not in "~+-"
                        for s in m.groups()
                        if s
                    ]
                count += len(quoted)
                missing += [
                    f"{s} ms in {line!r}" for s in quoted if (round(float(s), places(s)), places(s)) not in runs
                ]
    assert count > 50
    assert not missing, f"performance.md times found in no run named before them: {missing}"


def test_runs_index_lists_every_committed_run():
    """runs/README.md's index has one row per committed run folder, and no row without one."""
    rows = re.findall(r"^\| `([^`]+)` \|", (ROOT / "runs" / "README.md").read_text(), re.MULTILINE)
    folders = sorted(p.name for p in (ROOT / "runs").iterdir() if p.is_dir() and p.name != "local")
    assert sorted(rows) == folders
