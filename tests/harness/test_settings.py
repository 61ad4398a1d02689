"""fmsring.harness.settings: one declaration of every setting, and the surfaces generated from it --
the bench's flags, the sweep's parameters and the bench command it builds, the run notebook's
parameters cell, the Makefile's variables."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from fmsring.harness import grid, sweep
from fmsring.harness.grid import SweepConfig, from_make, notebook_parameters
from fmsring.harness.plan import variants
from fmsring.harness.schema import AS_SHIPPED, COMPILED
from fmsring.harness.settings import BenchConfig, Settings, parse_args, parse_seq_len, parse_seq_lens
from tests.conftest import ROOT

jupytext = pytest.importorskip("jupytext", reason="the notebook tools (dev extra); the GPU machine has none")

# a value other than the default for every setting both configs share, each valid with the others
OTHER = dict(architecture="gpt_bigcode", variant="ibm.20b", model_path="/ckpt", source="hf",
             model_kwargs={"nlayers": 3}, device="cuda", dtype="bfloat16", strategies=["ring", "tp"],
             phases=["decode"], seq_lens=[8192, 100], cached_lens=[], batch=4, padding=0.5, layout="contiguous",
             repeats=5, warmup=0, decode_tokens=7, ring_variants={"x": {"ring_cuda_graphs": False}},
             ring_kwargs={"ring_fuse": False}, ring_tp=[1], as_shipped=True, compile_peers="reduce-overhead",
             followup_recompute=False,
             check=False, stall_factor=2.5, stall_min_s=7.0, seed=3)  # fmt: skip


def test_every_shared_setting_has_a_different_value_here():
    assert set(OTHER) == set(Settings.names())
    assert all(OTHER[n] != getattr(Settings(), n) for n in OTHER if n not in ("cached_lens", "ring_tp"))


def test_cli_parsing() -> None:
    cfg = parse_args(
        ["--seq-lens", "8K,128k,100", "--strategies", "ring,tp", "--no-check", "--model-kwargs", '{"nlayers": 2}']
    )
    assert cfg.seq_lens == [8192, 131072, 100] and cfg.strategies == ["ring", "tp"] and not cfg.check
    assert cfg.model_kwargs == {"nlayers": 2} and isinstance(cfg, BenchConfig) and cfg.ring_variants == {"": {}}
    cfg = parse_args(["--ring-variants", '{"": {}, "eager": {"ring_cuda_graphs": false}}',
                      "--ring-kwargs", '{"ring_fuse": false}', "--phases", "prefill,followup", "--cached-lens", "1K",
                      "--seq-lens", "64,512"])  # fmt: skip
    ring = variants("ring", cfg)
    # --ring-kwargs merge into every variant and show in its label; followup keeps room in the cache
    assert [v.label for v in ring] == ['{"ring_fuse": false}', 'eager {"ring_fuse": false}']
    assert ring[1].ring_kwargs == {"ring_cache_headroom": 512 + 2 * 32 + 2, "ring_fuse": False, "ring_cuda_graphs": False}
    assert [v.label for v in variants("tp", cfg)] == [""]
    assert [v.label for v in variants("tp", parse_args(["--as-shipped"]))] == ["", AS_SHIPPED]
    assert parse_args([]).compile_peers == "" and parse_args(["--compile-peers", ""]).compile_peers == ""
    compiled = variants("single", parse_args(["--compile-peers", "max-autotune-no-cudagraphs"]))
    assert [(v.label, v.compile_mode) for v in compiled] == [("", ""), (COMPILED, "max-autotune-no-cudagraphs")]
    for bad in (["--strategies", "ring,bogus"], ["--cached-lens", "64"], ["--phases", "followup"],
                ["--ring-variants", '{"x": {"ring_bogus": 1}}'], ["--seq-lens", "0"],
                ["--padding", "0.5", "--phases", "decode"], ["--padding", "0.5", "--batch", "2"],
                ["--padding", "1", "--batch", "2", "--phases", "decode"], ["--device", "tpu"],
                ["--compile-peers", "fast"], ["--compile-peers", "none"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_every_setting_is_a_bench_flag_and_a_sweep_flag():
    bench_help = subprocess.run([".venv/bin/python", "-m", "fmsring.bench", "--help"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
    for name in BenchConfig.names():
        assert f"--{name.replace('_', '-')}" in bench_help, name
    for name in ("--seq-lens", "--cached-lens", "--ring-variants", "--ring-tp", "--padding", "--as-shipped",
                 "--compile-peers", "--no-check", "--no-followup-recompute", "--resume",
                 "--out"):  # fmt: skip  # scripts and README use these
        assert name in bench_help
    cfg, _ = sweep.config_from_args([f"--{n.replace('_', '-')}={v}" if not isinstance(v, bool) else
                                     f"--{'' if v else 'no-'}{n.replace('_', '-')}" for n, v in OTHER.items()
                                     if n not in ("cached_lens", "ring_tp", "model_kwargs", "ring_variants",
                                                  "ring_kwargs", "strategies", "seq_lens")])  # fmt: skip
    assert cfg.seed == 3 and cfg.padding == 0.5 and not cfg.check and cfg.device == "cuda"


def test_the_sweep_passes_every_setting_to_the_bench():
    """A sweep's group command gives the bench every shared setting: parsed back, it is the sweep's."""
    cfg = SweepConfig(**OTHER, timeout_s=99, bench_timeout_s=77)
    bench = parse_args(cfg.bench_args("tp", "/r.csv")[2:])
    for name in Settings.names():
        want = ["tp"] if name == "strategies" else getattr(cfg, name)
        assert getattr(bench, name) == want, name
    assert bench.out == "/r.csv" and bench.resume and bench.timeout_s == 77


def test_the_run_notebook_parameters_are_every_sweep_setting():
    cell = next(c.source for c in jupytext.read(ROOT / "notebooks" / "run.py").cells
                if "parameters" in c.metadata.get("tags", []))  # fmt: skip
    assert cell == notebook_parameters(), (
        "regenerate: .venv/bin/python -c 'from fmsring.harness.grid import update_notebook; update_notebook()' "
        "&& .venv/bin/python -m jupytext --update --to ipynb notebooks/run.py"
    )
    assert [line.split(":")[0] for line in cell.splitlines()] == SweepConfig.names()


def test_every_setting_is_a_make_variable(tmp_path: Path):
    words = [f"{n.upper()}=x" for n in SweepConfig.names()] + ["MODEL=3-8b", "NPROC=2,4", "TIMEOUT=5", "ARCH=a"]
    got = from_make(words)
    assert set(got) == set(SweepConfig.names())
    assert (got["variant"], got["world_sizes"], got["timeout_s"], got["architecture"]) == ("3-8b", "2,4", "5", "a")
    with pytest.raises(ValueError, match=r"unknown sweep setting\(s\) \['bogus'\]"):
        from_make(["BOGUS=1"])
    params = tmp_path / "p.yaml"
    params.write_text("seq_lens: [1K]\nvariant: micro\nmodel_kwargs: {nlayers: 1}\n")
    assert from_make(["SEQ_LENS=8K,32K"], str(params)) == {"seq_lens": "8K,32K", "variant": "micro",
                                                            "model_kwargs": {"nlayers": 1}}  # fmt: skip
    assert from_make(["MODEL=3-8b"])["model_kwargs"] == {}  # a model named drops the smoke test's 2 layers


def test_make_sweep_writes_the_notebook_settings(tmp_path: Path):
    """make sweep's first step: its command-line variables, through make itself, as the notebook's parameters."""
    out = subprocess.run(["make", "-n", "sweep", "DEVICE=cuda", "MODEL=3-8b", "NPROC=2,4", "PADDING=0.5", "BATCH=2",
                          "PHASES=decode", "COMPILE_PEERS=reduce-overhead", f"OUT_DIR={tmp_path}",
                          'RING_VARIANTS={"": {}, "e": {"ring_fuse": false}}'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if "--notebook-settings" in x)
    words = line.split("--notebook-settings", 1)[1].split(")", 1)[0]
    run = subprocess.run(f".venv/bin/python -m fmsring.sweep --notebook-settings {words}", shell=True, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert run == str(tmp_path / "cuda-llama-3-8b-float32")
    import yaml

    settings = yaml.safe_load((Path(run) / "notebook.yaml").read_text())
    assert settings["padding"] == "0.5" and settings["world_sizes"] == "2,4" and settings["model_kwargs"] == {}
    cfg = SweepConfig.from_dict(settings)
    assert cfg.ring_variants == {"": {}, "e": {"ring_fuse": False}} and cfg.compile_peers == "reduce-overhead"


def test_identity_settings_tell_run_folders_apart():
    ids = {f.name for f in dataclasses.fields(SweepConfig) if f.metadata["identity"]}
    assert {"variant", "dtype", "batch", "padding", "layout", "decode_tokens", "seed"} <= ids
    assert not ids & {"repeats", "strategies", "world_sizes", "seq_lens"}
    assert grid.SweepConfig(seed=4).identity()["seed"] == 4


def test_seq_lens_parse_like_papers():
    assert parse_seq_lens("8K, 128k,100") == [8192, 131072, 100]
    assert parse_seq_lens([64, "1M"]) == [64, 1 << 20] and parse_seq_lens("") == []
    for bad in ("0", "-4", "8G", "x"):
        with pytest.raises(ValueError, match="positive integer"):
            parse_seq_len(bad)
