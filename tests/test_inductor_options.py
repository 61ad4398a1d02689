"""scripts/inductor_options.py: options reach inductor's config and the rows' record of them, the
module runs with its own argv, and a name that is not an option is refused."""

from __future__ import annotations

import os
import sys

import pytest
import torch._inductor.config as inductor_config

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import inductor_options  # noqa: E402


def test_options_are_set_and_unknown_names_refused(monkeypatch):
    ran = []
    monkeypatch.setenv("FMSRING_INDUCTOR_OPTIONS", "")  # restored after the test, as every row records it
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # main() hands the module its own argv
    monkeypatch.setattr(inductor_options.runpy, "run_module", lambda name, **kw: ran.append((name, sys.argv[:])))
    with inductor_config.patch(combo_kernels=False, max_autotune=False):
        inductor_options.main(["combo_kernels=True", "max_autotune=True", "-m", "fmsring.bench", "--help"])
        assert inductor_config.combo_kernels is True and inductor_config.max_autotune is True
    assert ran == [("fmsring.bench", ["fmsring.bench", "--help"])]
    assert os.environ["FMSRING_INDUCTOR_OPTIONS"] == "combo_kernels=True,max_autotune=True"
    with pytest.raises(SystemExit, match="not_an_option"):
        inductor_options.main(["not_an_option=1", "-m", "x"])
