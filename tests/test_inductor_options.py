"""scripts/inductor_options.py: options reach inductor's config, a name that is not one is refused,
and ``one_row_mm`` rewrites a one-row matmul off the CPU (traced on the meta device, where
inductor's decomposition takes its GPU branch) as a product and a sum, leaving wider ones and the
option itself alone."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._inductor.decomposition import decompositions, fast_random_decomps, select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import inductor_options  # noqa: E402

MM = torch.ops.aten.mm.default


def _ops(rows: int) -> set[str]:
    a = torch.empty(rows, 64, dtype=torch.bfloat16, device="meta")
    b = torch.empty(64, 96, dtype=torch.bfloat16, device="meta")
    gm = make_fx(torch.mm, decomposition_table=select_decomp_table())(a, b)
    return {str(n.target).split(".")[1] for n in gm.graph.nodes if n.op == "call_function"}


@pytest.fixture
def restore_mm():
    saved = decompositions[MM], fast_random_decomps()[MM]
    yield
    decompositions[MM], fast_random_decomps()[MM] = saved


def test_one_row_mm_rewrites_one_row_only(restore_mm):
    assert "mm" in _ops(1)  # inductor's default: the matmul stays a matmul
    inductor_options.one_row_mm()
    one = _ops(1)
    assert "mm" not in one and {"mul", "sum"} <= one, one
    assert "mm" in _ops(2)
    assert inductor_config.coordinate_descent_tuning is False


def test_options_are_set_and_unknown_names_refused(monkeypatch, restore_mm):
    ran = []
    monkeypatch.setenv("FMSRING_INDUCTOR_OPTIONS", "")  # restored after the test, as every row records it
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # main() hands the module its own argv
    monkeypatch.setattr(inductor_options.runpy, "run_module", lambda name, **kw: ran.append((name, sys.argv[:])))
    with inductor_config.patch(combo_kernels=False):
        inductor_options.main(["combo_kernels=True", "one_row_mm", "-m", "fmsring.bench", "--help"])
        assert inductor_config.combo_kernels is True
    assert ran == [("fmsring.bench", ["fmsring.bench", "--help"])]
    assert os.environ["FMSRING_INDUCTOR_OPTIONS"] == "combo_kernels=True,one_row_mm"
    with pytest.raises(SystemExit, match="not_an_option"):
        inductor_options.main(["not_an_option=1", "-m", "x"])
