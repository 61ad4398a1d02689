"""Run a module with inductor options set first, for settings that have no environment variable.

Run: torchrun ... scripts/inductor_options.py combo_kernels=True [NAME=VALUE ...] -m fmsring.bench ARGS

Each NAME=VALUE sets ``torch._inductor.config.NAME`` to the Python literal VALUE before the module
runs, in every rank. The word ``one_row_mm`` asks for inductor's rewrite of a one-row matmul (a
batch-1 decode step's projections) as a product and a sum, without the coordinate descent tuning
that turns it on: the rewritten projections fuse with the RMSNorm before them and the SiLU or
residual add around them, and run inductor's default launch configurations, where the tuning
re-tunes every kernel at its first run in every process (docs/performance.md, Decode). All are
also put in FMSRING_INDUCTOR_OPTIONS, which the bench records in a row's ``env`` column
(fmsring.harness.provenance), so the rows say what they ran under.
"""

from __future__ import annotations

import ast
import os
import runpy
import sys

import torch
import torch._inductor.config as inductor_config
from torch._inductor import decomposition

ONE_ROW_MM = "one_row_mm"


def one_row_mm() -> None:
    """Make inductor's ``aten.mm`` decomposition take its one-row branch, which it takes only under
    ``coordinate_descent_tuning``: the option is set while a matmul is traced, not while its
    kernels are generated, so no kernel is tuned at run time."""
    mm = torch.ops.aten.mm.default
    original = decomposition.decompositions[mm]

    def rewritten(*args, **kwargs):
        with inductor_config.patch(coordinate_descent_tuning=True):
            return original(*args, **kwargs)

    # select_decomp_table() hands out this table, or a cached copy of it with random ops added
    for table in (decomposition.decompositions, decomposition.fast_random_decomps()):
        table[mm] = rewritten


def main(argv: list[str]) -> None:
    options = []
    while argv and argv[0] != "-m":
        item = argv.pop(0)
        options.append(item)
        if item == ONE_ROW_MM:
            one_row_mm()
            continue
        name, sep, value = item.partition("=")
        if not sep or not hasattr(inductor_config, name.split(".")[0]):
            raise SystemExit(f"inductor_options: {name!r} is neither {ONE_ROW_MM} nor NAME=VALUE of an inductor option")
        target = inductor_config
        *path, last = name.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, ast.literal_eval(value))
    if len(argv) < 2:
        raise SystemExit("inductor_options: give the module to run, -m MODULE [ARGS]")
    os.environ["FMSRING_INDUCTOR_OPTIONS"] = ",".join(options)
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
