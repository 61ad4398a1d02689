"""Shared test setup: import this checkout's fmsring, draw figures off-screen,
run Triton kernels through Triton's interpreter where there is no GPU, and seed
every test's randomness, and the tiny checkpoints' weights, from seeds that a
failure prints."""

import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
if not torch.cuda.is_available():
    # read when a kernel is defined, which importing fmsring does: before any test imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")
SEED_ENV = "FMSRING_TEST_SEED"
CHECKPOINT_SEED_ENV = "FMSRING_CHECKPOINT_SEED"  # tests/tiny_checkpoint.py reads it
# one per session: the checkpoints are written once, before any test's own seed is drawn
os.environ.setdefault(CHECKPOINT_SEED_ENV, str(random.SystemRandom().randrange(2**31)))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random LLaMA checkpoints written with ``save_pretrained``: MHA and GQA (read only)."""
    from tests.tiny_checkpoint import write_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {"mha": write_checkpoint(root / "mha", kvheads=4), "gqa": write_checkpoint(root / "gqa", kvheads=2)}


@pytest.fixture(autouse=True)
def test_seed(request: pytest.FixtureRequest) -> int:
    """Inputs are fresh random draws every run (exactness must hold for any input,
    not for one), seeded so that a failure can be replayed: the failure report
    names the seed, and ``FMSRING_TEST_SEED=<seed>`` draws the same inputs again."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**31))
    random.seed(seed)
    torch.manual_seed(seed)
    request.node.fmsring_seed = seed
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    seed = getattr(item, "fmsring_seed", None)
    if report.failed and seed is not None:
        seeds = f"{SEED_ENV}={seed} {CHECKPOINT_SEED_ENV}={os.environ[CHECKPOINT_SEED_ENV]}"
        report.sections.append(("random seed", f"replay with: {seeds} pytest '{item.nodeid}'"))
    return report
