"""Benchmark rows as tables: ``load_runs`` reads run folders' CSVs into one DataFrame tagged by run;
the tables say statuses, latency, scaling against the strongest one-GPU row, exactness, longest
prompts, follow-ups, factorisations, links and a profiled decode step (:mod:`.plots` draws them)."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from fmsring.harness.schema import AS_SHIPPED, STATUSES, TOLERANCES, judge, mesh_sizes

TEXT = ("strategy", "variant", "dtype", "layout", "phase", "same_next_token", "status", "error", "model", "device",
        "gpu_name", "interconnect", "git_sha", "torch_version", "cuda_version", "nccl_version", "env",
        "timestamp")  # fmt: skip
NUMERIC = ("world_size", "cp_size", "tp_size", "seq_len", "cached_len", "batch", "padding", "latency_ms", "floor_ms",
           "peak_mem_gib", "max_abs_err", "rel_err", "ref_norm", "ttft_ms", "first_step_ms",
           "stream_ms", "gpu_memory_gib")  # fmt: skip  # read even where absent
KEY = ("run", "strategy", "variant", "world_size", "seq_len", "cached_len", "batch", "padding", "phase", "interconnect")
FAILED = ("oom", "timeout", "error")  # no timings: shown as markers with their status


def find_runs(root: str | os.PathLike = "runs") -> list[Path]:
    """Run folders (those holding a results.csv) at or anywhere under ``root``, sorted."""
    root = Path(root)
    return [root] if (root / "results.csv").exists() else sorted(p.parent for p in root.rglob("results.csv"))


def _csvs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The CSV files to read: a file as given (``results_fp32.csv`` too), a run folder's ``results.csv``."""
    out: list[Path] = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"no run folder or results.csv at {p}")
        out += [Path(p)] if Path(p).is_file() else [run / "results.csv" for run in find_runs(p)]
    return list(dict.fromkeys(p.resolve() for p in out))


def _legacy_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Rows written before the ``variant`` column: the variant was spelled in the model label
    (`` ring{...}`` for a ring variant, `` fused-peers``), and the peers ran as shipped unless fused."""
    model = df["model"].fillna("")
    ring_kwargs = model.str.extract(r" ring(\{.*\})", expand=False).fillna("")
    fused = np.where(model.str.contains(" fused-peers", regex=False), "fused", AS_SHIPPED)
    df["variant"] = np.where(df["strategy"] != "ring", fused, ring_kwargs)
    df["model"] = model.str.replace(r" ring\{.*\}", "", regex=True).str.replace(" fused-peers", "", regex=False)
    return df


def _rejudge(df: pd.DataFrame) -> pd.DataFrame:
    """Judge ok rows by today's tolerances, so a row written before ``mismatch`` existed (or by
    an older bench) cannot pass as ok with logits beyond them."""
    compared = (df["status"] == "ok") & df["rel_err"].notna()
    for i in df.index[compared]:
        verdict = judge(df.at[i, "dtype"], df.loc[i, ["max_abs_err", "rel_err", "ref_norm"]].to_dict())
        if verdict:
            df.at[i, "status"], df.at[i, "error"] = "mismatch", f"judged on load: {verdict}"
    return df


def load_runs(paths: str | os.PathLike | Iterable[str | os.PathLike] = "runs", dedupe: bool = True) -> pd.DataFrame:
    """All rows of the given run folders (their ``results.csv``), CSV files (any name:
    ``results_fp32.csv``), or folders of runs, with ``run`` (the folder's name: a folder's CSVs are
    one run, so a ``single`` row in one is the baseline of the others) and ``run_dir``; the columns
    older CSVs lack are filled. With ``dedupe`` a point measured more than once (a failed point
    retried on resume) keeps its ``ok`` row, or else its latest row."""
    frames = []
    for csv in _csvs(paths):
        try:
            df = pd.read_csv(csv, dtype=str, keep_default_na=False, on_bad_lines="skip")
        except pd.errors.EmptyDataError:
            continue
        df = df.assign(run=csv.parent.name, run_dir=str(csv.parent))
        frames.append(_legacy_variants(df) if "variant" not in df.columns else df)
    if not any(len(f) for f in frames):
        return pd.DataFrame(columns=list(dict.fromkeys(["run", "run_dir", *KEY, "status", *NUMERIC])))
    df = pd.concat(frames, ignore_index=True)
    for col, fill in (("cached_len", "0"), ("padding", "0"), ("variant", ""), ("dtype", ""), ("interconnect", "")):
        df[col] = df[col].fillna(fill).replace("", fill) if col in df.columns else fill
    for col in {*NUMERIC, *df.columns} - {*TEXT, "run", "run_dir"}:  # a column the bench added: numeric if it parses
        raw = df[col].replace(["", "nan"], np.nan) if col in df.columns else pd.Series(np.nan, index=df.index)
        try:
            df[col] = pd.to_numeric(raw)
        except (ValueError, TypeError):
            df[col] = pd.to_numeric(raw, errors="coerce") if col in NUMERIC else df[col]
    df = df[df["status"].isin(STATUSES)].copy()
    legacy = df["cp_size"].isna() & df["world_size"].notna()  # rows from before ring x TP: ring was cp = world
    for i in df.index[legacy]:
        df.loc[i, ["cp_size", "tp_size"]] = mesh_sizes(df.at[i, "strategy"], int(df.at[i, "world_size"]))
    if "same_next_token" in df.columns:
        df["same_next_token"] = df["same_next_token"].str.lower().map({"true": True, "false": False})
    df = _rejudge(df)
    if dedupe and not df.empty:
        order = pd.Series(np.arange(len(df)), index=df.index)
        keep = df.assign(_ok=df["status"].eq("ok"), _o=order).sort_values(["_ok", "_o"])
        df = df.loc[sorted(keep.groupby(list(KEY), dropna=False, sort=False).tail(1).index, key=order.get)]
    return df.reset_index(drop=True)


def config_label(strategy: str, variant: str) -> str:
    """``ring``, ``single/as-shipped``: a strategy and its variant, as legends and tables name them."""
    return f"{strategy}/{variant}" if variant else strategy


def unit(df: pd.DataFrame) -> str:
    """What a world size counts: "GPUs" for a run on GPUs, "ranks" for CPU processes."""
    return "GPUs" if "device" in df.columns and (df["device"] == "cuda").any() else "ranks"


def status_table(df: pd.DataFrame) -> pd.DataFrame:
    """Points per status, per (run, strategy, variant, world size)."""
    if df.empty:
        return pd.DataFrame()
    t = df.pivot_table(index=["run", "strategy", "variant", "world_size"], columns="status", values="seq_len",
                       aggfunc="count")  # fmt: skip
    return t.reindex(columns=[s for s in STATUSES if s in t.columns]).fillna(0).astype(int)


def summary(df: pd.DataFrame, phase: str = "prefill", value: str = "latency_ms") -> pd.DataFrame:
    """``value`` per (run, strategy, variant, world size[, cached]) x length; failed points show their status."""
    d = df[df["phase"] == phase] if "phase" in df.columns else df
    if d.empty or value not in d.columns:
        return pd.DataFrame()
    shown = d[value].round(2).astype(object).where(d["status"] == "ok", d["status"])
    index = ["run", "strategy", "variant", "world_size"] + (["cached_len"] if phase == "followup" else [])
    return d.assign(_v=shown).pivot_table(index=index, columns="seq_len", values="_v", aggfunc="last")


def _ok(df: pd.DataFrame, phase: str, column: str) -> pd.DataFrame:
    d = df[(df["status"] == "ok") & (df["phase"] == phase)] if len(df) and column in df.columns else df.iloc[0:0]
    return d.dropna(subset=[column, "seq_len", "world_size"])


def scaling_table(df: pd.DataFrame, phase: str = "prefill", warn: bool = True) -> pd.DataFrame:
    """Speedup and parallel efficiency of every ok multi-rank point against the fastest ``single`` row
    of its run and point (any variant: never a handicapped baseline). A point no single GPU ran is
    measured against its configuration's smallest world size W0 that ran it, counted as a speedup
    of W0 (ideal up to W0; ``reference`` says so). A speedup above the world size (``superlinear``)
    is physically suspect -- usually a weak baseline -- and is warned about by name."""
    d = _ok(df, phase, "latency_ms")
    cols = ["reference", "baseline_ms", "baseline_world_size", "speedup", "efficiency", "superlinear"]
    rows = d[d["strategy"] != "single"].copy()
    if rows.empty:
        return rows.assign(**{c: [] for c in cols})
    point = ["run", "seq_len", "cached_len", "batch", "padding"]
    singles = d[(d["strategy"] == "single") & (d["world_size"] == 1)].sort_values("latency_ms")
    best = singles.groupby(point, dropna=False).head(1).set_index(point)
    own = ["run", "strategy", "variant", "seq_len", "cached_len", "batch", "padding"]
    smallest = rows.sort_values("world_size").groupby(own, dropna=False).head(1).set_index(own)

    def reference(r: pd.Series) -> tuple[str, float, float]:
        at = tuple(r[point])
        if at in best.index:
            s = best.loc[at]
            return f"{config_label('single', s['variant'])} x1 (fastest)", float(s["latency_ms"]), 1.0
        s = smallest.loc[tuple(r[own])]
        w0 = int(s["world_size"])
        label = config_label(r["strategy"], r["variant"])
        return (f"{label} x1" if w0 == 1 else f"{label} x{w0} (ideal up to {w0} assumed)"), float(s["latency_ms"]), w0

    rows[cols[:3]] = pd.DataFrame([reference(r) for _, r in rows.iterrows()], index=rows.index).astype({2: float})
    rows["speedup"] = rows["baseline_world_size"] * rows["baseline_ms"] / rows["latency_ms"]
    rows["efficiency"] = rows["speedup"] / rows["world_size"]
    rows["superlinear"] = rows["speedup"] > rows["world_size"] * (1 + 1e-9)
    # a prompt whose only point is its own assumed-ideal reference says nothing
    anchor_only = (rows["world_size"] == rows["baseline_world_size"]) & (rows["baseline_world_size"] > 1)
    measured = (~anchor_only).groupby([rows[c] for c in own]).transform("any")
    rows = rows[measured]
    if warn and rows["superlinear"].any():
        warnings.warn("super-linear speedup (check the baseline): " + "; ".join(superlinear_points(rows)), stacklevel=2)
    return rows


def superlinear_points(table: pd.DataFrame) -> list[str]:
    """Names of the scaling table's points whose speedup exceeds their world size."""
    return [f"{r.run}: {config_label(r.strategy, r.variant)} x{int(r.world_size)} {r.phase} at {tokens(r.seq_len)}"
            f"{f' after {tokens(r.cached_len)}' if r.cached_len else ''}: {r.speedup:.2f}x vs {r.reference}"
            for r in table[table["superlinear"]].itertuples()]  # fmt: skip


def accuracy_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every row compared with `single` (or judged a mismatch): its errors, tolerance and status."""
    if df.empty or "rel_err" not in df.columns:
        return pd.DataFrame()
    judged = df["status"].isin(("ok", "mismatch"))
    d = df[judged & (df["rel_err"].notna() | (df["status"] == "mismatch"))].copy()
    if d.empty:
        return pd.DataFrame()
    d["tolerance"] = d["dtype"].map(lambda t: TOLERANCES[t].rel_err if t in TOLERANCES else np.nan)
    cols = ["run", "strategy", "variant", "world_size", "phase", "seq_len", "cached_len", "dtype", "max_abs_err",
            "rel_err", "tolerance", "ref_norm", "same_next_token", "status", "error"]  # fmt: skip
    d["error"] = d["error"].where(d["status"] == "mismatch", "")
    return d[cols].sort_values(cols[:7]).reset_index(drop=True)


def max_prompt_table(df: pd.DataFrame, phase: str = "prefill") -> pd.DataFrame:
    """Per (run, strategy, variant, world size): longest ok prompt, and the shortest that ran out of memory."""
    d = df[df["phase"] == phase].dropna(subset=["seq_len", "world_size"]) if len(df) else df
    if d.empty or not (d["status"] == "ok").any():
        return pd.DataFrame()
    at = d.assign(ok=d["seq_len"].where(d["status"] == "ok"), oom=d["seq_len"].where(d["status"] == "oom"))
    t = at.groupby(["run", "strategy", "variant", "world_size"], as_index=False).agg(
        max_ok_seq_len=("ok", "max"), first_oom_seq_len=("oom", "min"), max_tested_seq_len=("seq_len", "max")
    )
    return t.astype({"world_size": int})


def followup_table(df: pd.DataFrame) -> pd.DataFrame:
    """ok follow-up rows with the fresh ring prefill of the same P+T tokens beside them.

    ``recompute_ms`` is that prefill (same run, variant and world size), and
    ``cache_gain`` = recompute_ms / latency_ms: above 1 the cache is worth keeping.
    """
    d = _ok(df, "followup", "latency_ms")
    d = d.assign(recompute_ms=fresh_prefill_ms(df, d), cache_gain=lambda t: t.recompute_ms / t.latency_ms)
    cols = ["run", "strategy", "variant", "world_size", "cached_len", "seq_len", "latency_ms", "floor_ms",
            "recompute_ms", "cache_gain", "status"]  # fmt: skip
    return d[cols].sort_values(cols[:6]).reset_index(drop=True)


def fresh_prefill_ms(df: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Per ring follow-up row of ``rows``, the ring's fresh prefill of the same P+T tokens in ``df`` (same
    run, variant and world size); NaN for the other peers and where none was measured."""
    at = ["run", "variant", "world_size", "seq_len"]
    pre = _ok(df, "prefill", "latency_ms").query("strategy == 'ring'").drop_duplicates(at).set_index(at)["latency_ms"]
    keys = [rows.run, rows.variant, rows.world_size, rows.seq_len + rows.cached_len]
    return np.where(rows["strategy"] == "ring", pre.reindex(pd.MultiIndex.from_arrays(keys)).to_numpy(), np.nan)


def mesh_label(strategy: str, variant: str, cp: float, tp: float) -> str:
    """``ring 2x2``, ``tp 1x4``: a configuration with how it splits tokens (cp) and weights (tp)."""
    return f"{config_label(strategy, variant)} {int(cp)}x{int(tp)}"


def tradeoff_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (run, world size, prompt length) and configuration: prefill time, decode ms/token and
    their floors, and the longest prompt the configuration ran in the run (``max_ok_seq_len``),
    so every factorisation cp x tp of one world can be weighed against the others."""
    ok = df[(df["status"] == "ok") & (df["cached_len"] == 0)] if len(df) else df
    ok = ok.dropna(subset=["seq_len", "world_size", "latency_ms"])
    if ok.empty or not {"prefill", "decode"} & set(ok["phase"]):
        return pd.DataFrame()
    keys = ["run", "world_size", "seq_len", "strategy", "variant", "cp_size", "tp_size"]
    wide = ok.pivot_table(index=keys, columns="phase", values=["latency_ms", "floor_ms"], aggfunc="first")
    wide.columns = [f"{phase}_{'ms' if v == 'latency_ms' else 'floor_ms'}" for v, phase in wide.columns]
    wide = wide.reindex(columns=["prefill_ms", "prefill_floor_ms", "decode_ms", "decode_floor_ms"]).reset_index()
    longest = ok.groupby(["run", "strategy", "variant", "world_size"])["seq_len"].max().rename("max_ok_seq_len")
    wide = wide.join(longest, on=["run", "strategy", "variant", "world_size"])
    wide.insert(3, "config", [mesh_label(*k) for k in zip(wide.strategy, wide.variant, wide.cp_size, wide.tp_size)])
    return wide.sort_values(["run", "world_size", "seq_len", "tp_size", "config"]).reset_index(drop=True)


def interconnect_table(df: pd.DataFrame) -> pd.DataFrame:
    """Prefill speedup over the run's one-GPU ``single`` per peer, world size and length, over NVLink and
    over the PCIe-like link (NCCL through host memory), and the share of its NVLink speedup each keeps."""
    cols = ["run", "strategy", "variant", "world_size", "seq_len", "single_ms", "nvlink_ms", "pcie_like_ms",
            "speedup_nvlink", "speedup_pcie_like", "kept", "link_gbps_pcie_like"]  # fmt: skip
    d = _ok(df, "prefill", "latency_ms")
    d = d[d["interconnect"].isin(["nvlink", "pcie-like"])]
    single = d[(d["strategy"] == "single") & (d["world_size"] == 1)].groupby(["run", "seq_len"])["latency_ms"].min()
    wide = d[d["world_size"] > 1].pivot_table(index=cols[:5], columns="interconnect", aggfunc={
        "latency_ms": "min", "link_gbps": "median"})  # fmt: skip
    wide.columns = [f"{v}_{link}" for v, link in wide.columns]
    if single.empty or not {"latency_ms_nvlink", "latency_ms_pcie-like"} <= set(wide.columns):
        return pd.DataFrame(columns=cols)
    names = {"latency_ms_nvlink": "nvlink_ms", "latency_ms_pcie-like": "pcie_like_ms",
             "link_gbps_pcie-like": "link_gbps_pcie_like"}  # fmt: skip
    t = wide.rename(columns=names).dropna(subset=["nvlink_ms", "pcie_like_ms"])
    t = t.reset_index()
    t["single_ms"] = single.reindex(pd.MultiIndex.from_frame(t[["run", "seq_len"]])).to_numpy()
    t = t.assign(speedup_nvlink=t.single_ms / t.nvlink_ms, speedup_pcie_like=t.single_ms / t.pcie_like_ms)
    t["kept"] = t["speedup_pcie_like"] / t["speedup_nvlink"]
    return t.reindex(columns=cols).sort_values(["run", "world_size", "seq_len", "strategy"]).reset_index(drop=True)


PROFILE_KERNELS = ("matmul", "attention", "elementwise and other")


def decode_profile_table(run_dir: str | os.PathLike, config: str = "whole_layer") -> pd.DataFrame:
    """Where a profiled decode step's time goes (``scripts/profile_decode.py``'s ``decode_profile_rank*.json``),
    per rank and part: its time (``ms``), what its bytes take at the copy bandwidth measured in the same
    process (``at_bandwidth_ms``: weights for the matmuls, the cache shard for attention) and the excess.
    Kernel times come from one eager step, where a rank waits inside a collective for slower peers: a
    collective's own time is the least any rank spent in it, and where that exceeds what the captured
    step leaves (every rank waited), ``communication`` and ``gaps`` cannot be told apart (NaN)."""
    cols = ["rank", "gpu", "part", "ms", "at_bandwidth_ms", "over_ms"]
    found = [(f, r) for f in sorted(Path(run_dir).glob("decode_profile_rank*.json"))
             if config in (r := json.loads(f.read_text()))]  # fmt: skip
    if not found:
        return pd.DataFrame(columns=cols)
    comm = min(r[config]["eager_kernel_ms"].get("communication", 0.0) for _, r in found)
    rows = []
    for f, r in found:
        res, gbps = r[config], r["hbm_gbps"]
        kernels = {part: res["eager_kernel_ms"].get(part, 0.0) for part in PROFILE_KERNELS}
        step = res["graph_step_ms_median"]
        rest = step - sum(kernels.values())
        apart = comm <= rest  # else every rank waited in the collective: its own time is unknown
        needed = {"matmul": res["weight_bytes"] / gbps / 1e6, "attention": res["cache_shard_bytes"] / gbps / 1e6}
        parts = [*kernels.items(), ("communication and gaps", rest), ("communication", comm if apart else math.nan),
                 ("gaps", rest - comm if apart else math.nan), ("step", step)]  # fmt: skip
        for part, ms in parts:
            at_bw = res["floor_ms"] if part == "step" else needed.get(part, 0.0)
            rows.append({"rank": int(f.stem.removeprefix("decode_profile_rank")), "gpu": r["gpu"], "part": part,
                         "ms": ms, "at_bandwidth_ms": at_bw, "over_ms": ms - at_bw})  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def tokens(n: float, _pos=None) -> str:
    """8192 -> "8k", 100 -> "100" (a tick formatter too)."""
    n = round(n) if math.isfinite(n) else None
    return "" if n is None else f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
