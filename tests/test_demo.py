"""``make demo`` as a user runs it: SmolLM2-135M-Instruct on two CPU ranks through the command
line's ``--chat``, every reply HF transformers' token for token.

It needs the demo checkpoint (``make model``; ``make test`` fetches it first): where it is
missing the test fails with the command that fetches it, never skips. The run itself (~40 s on two
cores) is in the slow tier (``make test-all``): ``make test`` already holds the same model on two
ranks to HF (tests/test_real_weights.py) and ``--chat`` to HF (tests/test_inference.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fmsring.checkpoints import demo_checkpoint
from fmsring.demo import QUESTIONS
from tests.conftest import ROOT


def test_make_demo_runs_the_demo_module():
    recipe = re.search(r"^demo: model ##.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe and recipe.group(1) == "$(PY) -m fmsring.demo"


@pytest.mark.slow
def test_demo_chats_on_two_ranks_and_every_reply_is_hf_token_for_token():
    demo_checkpoint()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "fmsring.demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    cli = [line for line in res.stdout.splitlines() if " -> " in line]  # what fmsring.inference --chat printed
    assert [line.split(" -> ")[0] for line in cli] == [repr(q) for q in QUESTIONS]
    assert "--nproc_per_node=2 -m fmsring.inference" in res.stdout and "--chat" in res.stdout
    assert res.stdout.count("  the same tokens\n") == len(QUESTIONS)
    assert res.stdout.rstrip().endswith(f"token for token, in all {len(QUESTIONS)} turns")
    assert not res.stderr.strip(), res.stderr
