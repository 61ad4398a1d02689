"""The inference CLI under torchrun gives the single-process completions."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--prompt",
    "hello ring",
    "--prompt",
    "a longer prompt, padded left",
    "--max_new_tokens",
    "9",
    "--default_dtype",
    "fp32",
    "--seed",
    "3",
]


def run(cmd: list[str]) -> list[str]:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [line for line in res.stdout.splitlines() if " -> " in line or "first token" in line]


def test_ring_cli_matches_single_process():
    single = run([sys.executable, "-m", "fmsring.inference", "--distributed_strategy", "replicated", *ARGS])
    for extra in ([], ["--no_use_cache", "--ring_layout", "contiguous"]):
        ring = run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "fmsring.inference",
                *ARGS,
                *extra,
            ]
        )
        assert len(ring) == 3 and "time to first token" in ring[-1]
        assert ring[:2] == single[:2]
