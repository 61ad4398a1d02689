"""fmsring.bench end to end: real processes on CPU/gloo, the micro LLaMA, CSV read back with pandas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fmsring.bench import (
    COLUMNS,
    BenchConfig,
    DistEnv,
    FlopShape,
    environment,
    load_model,
    model_flops,
    parse_args,
    parse_seq_len,
)
from fmsring.fusion import FusedLayerNorm

ROOT = Path(__file__).resolve().parents[1]
SEQ_LENS = (48, 61)  # 61: shards of unequal length
MODEL_ARGS = ["--architecture", "llama", "--variant", "micro", "--model-kwargs", '{"nlayers":2}']


def _bench(out: Path, nproc: int | None, strategies: str, extra: list[str] = ()) -> subprocess.CompletedProcess:
    """Run the CLI as a user would; nproc=None means a plain process, no torchrun."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else [sys.executable]
    )
    cmd = launcher + [
        "-m",
        "fmsring.bench",
        *MODEL_ARGS,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--strategies",
        strategies,
        "--phases",
        "prefill,decode",
        "--seq-lens",
        ",".join(map(str, SEQ_LENS)),
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--decode-tokens",
        "3",
        "--timeout-s",
        "60",
        "--out",
        str(out),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _check_common(df: pd.DataFrame) -> None:
    assert tuple(df.columns) == COLUMNS
    assert (df["status"] == "ok").all(), df[["strategy", "seq_len", "phase", "status", "error"]]
    assert (df["device"] == "cpu").all() and (df["gpu_name"] == "cpu").all()
    assert (df["latency_ms"] > 0).all() and (df["latency_ms_min"] <= df["latency_ms"]).all()
    assert (df["latency_ms"] <= df["latency_ms_max"]).all()
    assert (df["tflops_per_gpu"] > 0).all()
    assert df.loc[df["phase"] == "decode", "ttft_ms"].gt(0).all()
    assert df["timestamp"].notna().all() and df["git_sha"].notna().all()


def _check_exact(df: pd.DataFrame, strategy: str) -> None:
    rows = df[df["strategy"] == strategy]
    assert len(rows) == len(SEQ_LENS) * 2
    assert (rows["max_abs_err"] < 1e-4).all(), rows[["seq_len", "phase", "max_abs_err"]]
    assert (rows["rel_err"] < 1e-5).all()
    assert rows["same_next_token"].astype(str).eq("True").all()


@pytest.fixture(scope="module")
def two_rank_csv(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("bench") / "two.csv"
    _bench(out, 2, "single,ring,tp,torch_cp")
    return pd.read_csv(out)


def test_two_ranks_rows_and_columns(two_rank_csv: pd.DataFrame) -> None:
    df = two_rank_csv
    assert len(df) == 4 * len(SEQ_LENS) * 2
    cp = df[df["strategy"] == "torch_cp"]
    assert (cp["status"] == "skipped").all() and cp["error"].str.contains("CUDA").all()
    done = df[df["strategy"] != "torch_cp"]
    _check_common(done)
    assert set(zip(done["strategy"], done["world_size"])) == {("single", 1), ("ring", 2), ("tp", 2)}
    assert sorted(done["seq_len"].unique()) == sorted(SEQ_LENS)
    assert (df.loc[df["strategy"] == "ring", "layout"] == "zigzag").all()
    assert df.loc[df["strategy"] != "ring", "layout"].isna().all()
    assert df.loc[df["strategy"] == "single", "max_abs_err"].isna().all()


def test_two_ranks_ring_and_tp_match_single(two_rank_csv: pd.DataFrame) -> None:
    _check_exact(two_rank_csv, "ring")
    _check_exact(two_rank_csv, "tp")


def test_one_process_without_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "one.csv"
    _bench(out, None, "ring,tp", ["--layout", "contiguous"])  # no single: reference computed on the side
    df = pd.read_csv(out)
    assert set(df["strategy"]) == {"ring"}  # tp needs world > 1: no row
    assert len(df) == len(SEQ_LENS) * 2 and (df["world_size"] == 1).all()
    _check_common(df)
    _check_exact(df, "ring")
    _bench(out, None, "single", ["--no-check", "--seq-lens", "32"])  # appends: one header, more rows
    again = pd.read_csv(out)
    assert len(again) == len(df) + 2 and list(again.columns) == list(COLUMNS)


def test_cli_parsing() -> None:
    cfg = parse_args(
        ["--seq-lens", "8K,128k,100", "--strategies", "ring,tp", "--no-check", "--model-kwargs", '{"nlayers": 2}']
    )
    assert cfg.seq_lens == (8192, 131072, 100) and cfg.strategies == ("ring", "tp") and not cfg.check
    assert cfg.model_kwargs == {"nlayers": 2} and isinstance(cfg, BenchConfig)
    variant = parse_args(["--ring-kwargs", '{"ring_cuda_graphs": false}'])
    assert variant.ring_kwargs == {"ring_cuda_graphs": False}
    env = DistEnv(rank=0, world=1, device=torch.device("cpu"), ctrl=None, owns_group=False)
    # a ring variant's rows must not pass for the default's
    assert environment(variant, env)["model"] != environment(parse_args([]), env)["model"]
    assert parse_seq_len("1M") == 1 << 20
    with pytest.raises(SystemExit):
        parse_args(["--strategies", "ring,bogus"])


def test_fuse_peers_fuses_the_peers_and_says_so() -> None:
    env = DistEnv(rank=0, world=1, device=torch.device("cpu"), ctrl=None, owns_group=False)
    plain, fused = parse_args(["--model-kwargs", '{"nlayers": 1}']), parse_args(["--fuse-peers"])
    assert fused.fuse_peers and environment(fused, env)["model"].endswith(" fused-peers")
    fused.model_kwargs = plain.model_kwargs

    def norms(cfg: BenchConfig) -> set[type]:
        return {type(m) for m in load_model("single", cfg, env).modules() if "Norm" in type(m).__name__}

    assert norms(plain) != {FusedLayerNorm} and norms(fused) == {FusedLayerNorm}


def test_flops_formula() -> None:
    shape = FlopShape(linear_params=1000, head_params=100, attn_width=8)
    # prefill of 4 tokens: 2*4*1000 linear + 2*100 head + 2*8*(4*5/2) attention
    assert model_flops(shape, batch=1, new_tokens=4) == 8000 + 200 + 160
    # one decode token after 10 cached: sees 11 keys
    assert model_flops(shape, batch=2, new_tokens=1, context=10) == 2 * 2 * (1000 + 100 + 8 * 11)
