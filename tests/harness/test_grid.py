"""fmsring.harness.grid: the sweep's config, its groups and points, the grid's check, the commands."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from fmsring.harness import launch, sweep
from fmsring.harness.grid import SweepConfig
from fmsring.harness.settings import parse_args
from fmsring.harness.sweep import run_sweep
from tests.conftest import ROOT

TINY = dict(model_kwargs={"nlayers": 2}, repeats=1, warmup=0, decode_tokens=2, timeout_s=240)


def test_config_parsing_and_groups(tmp_path: Path):
    cfg = SweepConfig(world_sizes="1, 2,4", strategies="single,ring,tp", seq_lens="128,8K", phases="prefill",
                      model_kwargs='{"nlayers": 2}', out_dir=str(tmp_path))  # fmt: skip
    assert cfg.world_sizes == [1, 2, 4] and cfg.seq_lens == [128, 8192]
    assert cfg.model_kwargs == {"nlayers": 2}
    assert cfg.groups() == [(1, "single"), (1, "ring"), (2, "ring"), (2, "tp"), (4, "ring"), (4, "tp")]  # no tp x1
    assert cfg.run_name == "cpu-llama-micro-float32" and SweepConfig().out_dir == "runs/local"
    assert SweepConfig(device="cuda", variant="3-8b", dtype="bfloat16").run_name == "cuda-llama-3-8b-bfloat16"
    with pytest.raises(ValueError, match="unknown SweepConfig setting"):
        SweepConfig.from_dict({"world_size": [2]})
    params = tmp_path / "p.yaml"
    params.write_text("world_sizes: [2]\nstrategies: ring\nseq_lens: [64]\nname: x\nas_shipped: true\n"
                      "ring_variants: {'': {}, eager: {ring_cuda_graphs: false}}\n")  # fmt: skip
    cfg, _ = sweep.config_from_args(["--params", str(params), "--seq-lens", "32,64", "--out-dir", str(tmp_path),
                                     "--phases", "prefill,followup", "--cached-lens", "1K"])  # fmt: skip
    assert cfg.world_sizes == [2] and cfg.strategies == ["ring"] and cfg.seq_lens == [32, 64] and cfg.name == "x"
    assert cfg.cached_lens == [1024] and cfg.as_shipped and cfg.ring_variants["eager"] == {"ring_cuda_graphs": False}
    assert sweep.main(["--params", str(params), "--print-run-dir", "--out-dir", str(tmp_path)]) == 0
    # the rows one group writes: both ring variants' prefills, follow-ups, and fresh prefills of P+T
    pts = cfg.points(2, "ring")
    assert len(pts) == 2 * (2 + 2 + 2) and {p.variant for p in pts} == {"", "eager"}
    args = cfg.bench_args("ring", tmp_path / "r.csv")
    assert args[:2] == ["-m", "fmsring.bench"] and args[args.index("--seq-lens") + 1] == "32,64"
    bench_cfg = parse_args(args[2:])  # the bench accepts every flag the sweep passes
    assert bench_cfg.strategies == ["ring"] and bench_cfg.seq_lens == [32, 64] and bench_cfg.resume
    assert bench_cfg.out == str(tmp_path / "r.csv") and bench_cfg.cached_lens == [1024]
    assert bench_cfg.ring_variants == cfg.ring_variants and bench_cfg.as_shipped


def test_ring_tp_sweeps_every_factorisation_that_exists():
    """ring_tp expands every ring variant once per TP size; a world size gets the ones that divide it,
    and the bench gets the expanded variants (its rows' cp_size x tp_size say which is which)."""
    cfg = SweepConfig(world_sizes=[1, 2, 4], strategies=["ring"], ring_tp="1,2,4",
                      ring_variants={"": {}, "eager": {"ring_cuda_graphs": False}})  # fmt: skip
    assert cfg.ring_variants["eager tp2"] == {"ring_cuda_graphs": False, "ring_tp": 2}
    assert {p.variant for p in cfg.points(1, "ring")} == {"", "eager"}
    assert {p.variant for p in cfg.points(2, "ring")} == {"", "eager", "tp2", "eager tp2"}
    assert len({p.variant for p in cfg.points(4, "ring")}) == 6
    assert (
        SweepConfig.from_dict({**cfg.identity(), "ring_variants": cfg.ring_variants}).ring_variants == cfg.ring_variants
    )
    bench_cfg = parse_args(cfg.bench_args("ring", "r.csv")[2:])
    assert bench_cfg.ring_variants == cfg.ring_variants
    assert parse_args(["--ring-tp", "1,2"]).ring_variants == {"": {}, "tp2": {"ring_tp": 2}}
    with pytest.raises(SystemExit):
        parse_args(["--ring-tp", "0"])


def _no_launch(*_args, **_kwargs):
    raise AssertionError("a launch started before the grid was checked")


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(strategies=["single", "bogus"]), "strategies: must be among"),
        (dict(phases=["train"]), "phases: must be among"),
        (dict(cached_lens=[64]), "cached_lens and the followup phase"),
        (dict(phases=["followup"]), "cached_lens and the followup phase"),
        (dict(ring_variants={"x": {"ring_bogus": 1}}), "unknown option"),
        (dict(world_sizes=[]), "world_sizes not empty"),
        (dict(launcher="mpirun"), "launcher: must be one of torchrun, srun"),
        (dict(padding=0.5, phases=["decode"]), "padding needs a batch of >= 2"),
        (dict(padding=-0.1), "padding is a fraction"),
        (dict(device="cuda"), "torch sees no GPU"),
        (dict(world_sizes=[3], strategies=["single", "tp"]), "tp at world sizes [3]: 4 heads"),
        (dict(world_sizes=[3], ring_tp=[1, 3]), "ring_tp [3]: 4 heads"),
        (dict(world_sizes=[2], ring_tp=[1, 4]), "ring_tp [4] divides none of the world sizes [2]"),
        (dict(world_sizes=[4], seq_lens=[2, 64]), "ring at world size 4 needs prompts"),
        (dict(world_sizes=[4], phases=["followup"], cached_lens=[3], seq_lens=[1]), "ring at world size 4"),
    ],
)
def test_bad_grids_fail_before_any_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: dict, message: str):
    monkeypatch.setattr(launch, "run_launch", _no_launch)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_sweep(SweepConfig(**{"out_dir": str(tmp_path), "name": "bad", **TINY, **bad}), progress=False)
    assert not (tmp_path / "bad").exists()


def test_srun_command_matches_sbatch(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("FMSRING_RDZV_HOST", "node001")
    cfg = SweepConfig(launcher="srun", gpus_per_node=4, world_sizes=[8], strategies=["ring"])
    cmd = cfg.launch_command(8, cfg.bench_args("ring", "/r.csv"), tag="g0")
    assert cmd[:2] == ["srun", "--nodes=2"] and "--ntasks-per-node=1" in cmd
    tr = cmd[cmd.index("torch.distributed.run") - 2 :]
    for flag in (
        "--nnodes=2",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node001:29500",
        "--rdzv_id=777-g0",
        "--nproc_per_node=4",
    ):
        assert flag in tr
    assert tr[tr.index("-m", 2) : tr.index("-m", 2) + 2] == ["-m", "fmsring.bench"]
    # a world that fits one node stays on one node
    one = cfg.launch_command(2, [], tag="g1")
    assert "--nodes=1" in one and "--nproc_per_node=2" in one
    # the Slurm template launches the same way
    sbatch = (ROOT / "scripts" / "slurm_ring.sbatch").read_text()
    for piece in ("srun", "torch.distributed.run", "--nnodes=\"$SLURM_NNODES\"", "--rdzv_backend=c10d",
                  "--rdzv_endpoint=\"$head:", "-m fmsring.bench", "--ntasks-per-node=1"):  # fmt: skip
        assert piece in sbatch, piece
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm_ring.sbatch")]).returncode == 0
