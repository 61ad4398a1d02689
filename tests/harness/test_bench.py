"""fmsring.bench end to end: real processes on CPU/gloo, the micro LLaMA, CSV read back with pandas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fms.models
import pandas as pd
import pytest

from fmsring.harness import ceilings
from fmsring.harness.flops import Rates, floor_ms, flop_shape
from fmsring.harness.schema import AS_SHIPPED, COLUMNS, COMPILED, TOLERANCES
from tests.conftest import ROOT

SEQ_LENS = (48, 61)  # 61: shards of unequal length


MODEL_ARGS = ["--architecture", "llama", "--variant", "micro", "--model-kwargs", '{"nlayers":2}']


FP32 = TOLERANCES["float32"].rel_err


def _bench(out: Path, nproc: int | None, strategies: str, extra: list[str] = (), rc: int = 0):
    """Run the CLI as a user would; nproc=None means a plain process, no torchrun."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else [sys.executable]
    )
    lens = ",".join(map(str, SEQ_LENS))
    cmd = launcher + ["-m", "fmsring.bench", *MODEL_ARGS, "--device", "cpu", "--dtype", "float32",
                      "--strategies", strategies, "--phases", "prefill,decode", "--seq-lens", lens,
                      "--repeats", "2", "--warmup", "1", "--decode-tokens", "3", "--timeout-s", "60",
                      "--out", str(out), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "TORCH_NCCL_HIGH_PRIORITY": "1"}  # fmt: skip  # no effect on gloo; the rows must record it
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == rc, f"bench exit {proc.returncode} != {rc}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _read(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"variant": str, "error": str})
    return df.assign(variant=df["variant"].fillna(""))


def _check_common(df: pd.DataFrame) -> None:
    assert (df["status"] == "ok").all(), df[["strategy", "seq_len", "phase", "status", "error"]]
    assert (df["device"] == "cpu").all() and (df["gpu_name"] == "cpu").all()
    assert (df["latency_ms"] > 0).all() and (df["latency_ms_min"] <= df["latency_ms"]).all()
    assert (df["latency_ms"] <= df["latency_ms_max"]).all()
    assert (df["tflops_per_gpu"] > 0).all()
    decode = df["phase"] == "decode"
    assert df.loc[decode, "ttft_ms"].gt(0).all()
    assert df["first_step_ms"].gt(0).all()
    assert df["timestamp"].notna().all() and df["git_sha"].notna().all()
    assert (df["model"] == 'llama/micro {"nlayers": 2}').all()


def _check_exact(rows: pd.DataFrame, n: int) -> None:
    assert len(rows) == n
    assert (rows["status"] == "ok").all(), rows[["seq_len", "phase", "status", "error"]]
    assert (rows["rel_err"] <= FP32).all() and (rows["max_abs_err"] < 1e-4).all()
    assert (rows["ref_norm"] > 1).all()  # a real reference, not a near-zero one
    assert rows["same_next_token"].astype(str).eq("True").all()


@pytest.fixture(scope="module")
def two_rank_csv(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("bench") / "two.csv"
    _bench(out, 2, "single,ring,tp,torch_cp", ["--as-shipped"])
    return _read(out)


def test_two_ranks_rows_and_columns(two_rank_csv: pd.DataFrame) -> None:
    df = two_rank_csv
    assert tuple(df.columns) == COLUMNS
    per = len(SEQ_LENS) * 2
    assert len(df) == (2 + 1 + 2 + 2) * per  # single, tp, torch_cp twice (default, as-shipped); ring once
    cp = df[df["strategy"] == "torch_cp"]
    assert (cp["status"] == "skipped").all() and cp["error"].str.contains("CUDA|KV cache").all()
    done = df[df["strategy"] != "torch_cp"]
    _check_common(done)
    assert set(zip(done["strategy"], done["variant"], done["world_size"], strict=True)) == {
        ("single", "", 1), ("single", AS_SHIPPED, 1), ("ring", "", 2), ("tp", "", 2), ("tp", AS_SHIPPED, 2),
    }  # fmt: skip
    assert (df["cached_len"] == 0).all() and df["floor_ms"].isna().all()  # no floor on a CPU
    assert df["env"].str.contains("TORCH_NCCL_HIGH_PRIORITY=1", regex=False).all()
    assert (df.loc[df["strategy"] == "ring", "layout"] == "zigzag").all()
    assert df.loc[df["strategy"] != "ring", "layout"].isna().all()
    ref = df[(df["strategy"] == "single") & (df["variant"] == "")]
    assert ref["max_abs_err"].isna().all() and ref["error"].isna().all()


def test_two_ranks_match_single(two_rank_csv: pd.DataFrame) -> None:
    df = two_rank_csv
    per = len(SEQ_LENS) * 2
    _check_exact(df[df["strategy"] == "ring"], per)
    _check_exact(df[(df["strategy"] == "tp") & (df["variant"] == "")], per)
    _check_exact(df[df["variant"] == AS_SHIPPED].query("strategy != 'torch_cp'"), 2 * per)


def test_followup_on_two_ranks(tmp_path: Path) -> None:
    """Follow-ups of T new tokens on caches of P, T below the world size and not divisible by it;
    floors from rates given in the ceilings file; ring's fresh prefill of P+T beside them."""
    out = tmp_path / "f.csv"
    key = ceilings.rates_key("cpu", "float32", 4, 48)
    rates = Rates(matmul_tflops=0.01, attention_tflops=0.005, memory_gbps=10.0)
    ceilings.ceilings_path(out).write_text(json.dumps({key: rates.__dict__}))
    cached, new = (24, 37), (1, 5)
    extra = ["--phases", "followup", "--cached-lens", ",".join(map(str, cached)), "--seq-lens", "1,5"]
    proc = _bench(out, 2, "single,ring,tp,torch_cp", extra)
    assert "ceilings from" in proc.stdout
    df = _read(out)
    fol = df[df["phase"] == "followup"]
    assert len(fol) == 4 * len(cached) * len(new)
    assert sorted(set(zip(fol["cached_len"], fol["seq_len"], strict=True))) == [(c, t) for c in cached for t in new]
    assert (fol.loc[fol["strategy"] == "torch_cp", "error"] == "torch_cp has no KV cache").all()
    single = fol[fol["strategy"] == "single"]
    assert (single["status"] == "ok").all() and single["max_abs_err"].isna().all()
    _check_exact(fol[fol["strategy"] == "ring"], 4)
    _check_exact(fol[fol["strategy"] == "tp"], 4)
    fresh = df[df["phase"] == "prefill"]  # ring's recompute of P+T, checked against single's follow-up
    assert sorted(fresh["seq_len"]) == sorted(c + t for c in cached for t in new)
    assert (fresh["strategy"] == "ring").all() and (fresh["cached_len"] == 0).all()
    _check_exact(fresh, 4)
    # the floor of every timed row is the formula's, from the rates in the file
    meta = fms.models.get_model("llama", "micro", device_type="meta", distributed_strategy="none", nlayers=2)
    shape = flop_shape(meta, 4)
    timed = df[df["status"] == "ok"]
    expected = [
        floor_ms(shape, rates, r.cp_size, r.tp_size, r.phase, 1, r.seq_len, r.cached_len, 3) for r in timed.itertuples()
    ]
    assert timed["floor_ms"].tolist() == pytest.approx(expected)
    ring = timed[(timed["strategy"] == "ring") & (timed["phase"] == "followup")]
    tp = timed[(timed["strategy"] == "tp")]
    # both shard the work; ring also reads all the weights (it replicates them), tp its share
    assert (ring["floor_ms"].to_numpy() >= tp["floor_ms"].to_numpy()).all()


def test_one_process_without_torchrun_resume_and_compiled_peers(tmp_path: Path) -> None:
    """One process: ring checked against a reference computed on the side; a resumed launch
    measures nothing; a launch appended to the file with --compile-peers adds `single` compiled
    beside its default, checked against it, its first step (the compile) slower than its others."""
    out = tmp_path / "one.csv"
    _bench(out, None, "ring,tp", ["--layout", "contiguous"])  # no single: reference computed on the side
    df = _read(out)
    assert set(df["strategy"]) == {"ring"}  # tp needs world > 1: no row
    assert (df["world_size"] == 1).all() and (df["layout"] == "contiguous").all()
    _check_common(df)
    _check_exact(df, len(SEQ_LENS) * 2)
    before = out.read_bytes()
    _bench(out, None, "ring", ["--layout", "contiguous", "--resume"])  # every point done: nothing measured
    assert out.read_bytes() == before
    _bench(out, None, "single", ["--compile-peers", "default", "--phases", "decode", "--seq-lens", "32"])  # appends
    again = _read(out)
    assert len(again) == len(df) + 2 and list(again.columns) == list(COLUMNS)  # one header, more rows
    single = again[again["strategy"] == "single"]
    _check_common(single)
    assert list(single["variant"]) == ["", COMPILED] and single["max_abs_err"].isna().tolist() == [True, False]
    _check_exact(single[single["variant"] == COMPILED], 1)
    compiled = single.iloc[1]
    assert compiled["first_step_ms"] > compiled["latency_ms_max"]  # the compile: what the first token pays


def test_failed_points_make_the_exit_code(tmp_path: Path) -> None:
    out = tmp_path / "bad.csv"
    proc = _bench(
        out, None, "single", ["--model-path", str(tmp_path / "missing"), "--source", "hf", "--phases", "prefill"], rc=1
    )
    df = _read(out)
    assert (df["status"] == "error").all() and df["error"].str.startswith("loading: ").all()
    assert "not every point succeeded" in proc.stderr


def test_a_stalled_point_is_recorded_and_stops_the_launch(tmp_path: Path) -> None:
    """A point far past its predicted time (here: a budget of a millisecond) becomes a timeout row
    saying it stalled, and the bench exits at once with its own code instead of hanging."""
    from fmsring.harness.watchdog import STALL_EXIT

    out, alone = tmp_path / "stall.csv", tmp_path / "alone.csv"
    rates = Rates(matmul_tflops=1.0, attention_tflops=1.0, memory_gbps=10.0)  # the floors need rates: given
    for csv in (out, alone):
        ceilings.ceilings_path(csv).write_text(
            json.dumps({ceilings.rates_key("cpu", "float32", 4, 48): rates.__dict__})
        )
    flags = ["--no-check", "--stall-factor", "0.001", "--stall-min-s", "0.001", "--repeats", "50"]
    proc = _bench(out, 2, "ring", flags, rc=1)  # torchrun reports the stopped rank as a failure
    df = _read(out)
    assert len(df) == 1 and df["status"].iloc[0] == "timeout"
    assert df["error"].iloc[0].startswith("stalled: no result after"), df["error"].iloc[0]
    assert f"exitcode: {STALL_EXIT}" in proc.stderr or f"exit code {STALL_EXIT}" in proc.stderr, proc.stderr[-2000:]
    _bench(alone, None, "ring", flags, rc=STALL_EXIT)  # a plain process: the code itself
    assert _read(alone)["status"].tolist() == ["timeout"]


@pytest.mark.slow  # fast: test_session's padded batch against each prompt alone
def test_padded_batch_decodes_on_two_ranks_as_on_one(tmp_path: Path) -> None:
    """--padding: a left-padded batch of unequal prompts decodes on the ring and with TP as
    `single` decodes it (the check), at an odd and an even length; the rows say the fraction."""
    out = tmp_path / "padded.csv"
    flags = ["--phases", "decode", "--batch", "3", "--padding", "0.5", "--seq-lens", "13,40"]
    _bench(out, 2, "single,ring,tp", flags)
    df = _read(out)
    _check_common(df)
    assert len(df) == 6 and (df["padding"] == 0.5).all() and (df["batch"] == 3).all()
    _check_exact(df[df["strategy"] == "ring"], 2)
    _check_exact(df[df["strategy"] == "tp"], 2)
