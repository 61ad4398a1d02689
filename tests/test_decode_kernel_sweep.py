"""scripts/decode_kernel_sweep.py's one-kernel merge of the decode kernel's chunks, the candidate for
one kernel fewer a decoder layer, against the merge the compiled step runs, through Triton's
interpreter: odd chunk counts, several query tokens, chunks and rows that saw no slot. The GPU sweep
checks the same in bf16 before timing; this keeps the kernel it times checked on every CI run."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import ROOT

pytest.importorskip("triton")
sys.path.insert(0, str(ROOT / "scripts"))
import decode_kernel_sweep  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the sweep itself checks every variant")
def test_one_combine_kernel_merges_as_the_step_does():
    decode_kernel_sweep.check_on_cpu()
