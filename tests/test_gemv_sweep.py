"""scripts/gemv_sweep.py's Triton GEMV, the candidate kernel for the decode step's projections,
against fp32 math through Triton's interpreter: every fusion (RMSNorm before, residual or SwiGLU
after), odd sizes, one and several rows. The GPU sweep checks the same in bf16 before timing; this
keeps the kernel it times checked on every CI run."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import ROOT

pytest.importorskip("triton")
sys.path.insert(0, str(ROOT / "scripts"))
import gemv_sweep  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the sweep itself checks every variant")
def test_every_fusion_matches_fp32_math():
    gemv_sweep.check_on_cpu()
