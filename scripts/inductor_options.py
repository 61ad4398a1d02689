"""Run a module with inductor options set first, for settings that have no environment variable.

Run: torchrun ... scripts/inductor_options.py combo_kernels=True [NAME=VALUE ...] -m fmsring.bench ARGS

Each NAME=VALUE sets ``torch._inductor.config.NAME`` to the Python literal VALUE before the module
runs, in every rank. They are also put in FMSRING_INDUCTOR_OPTIONS, which the bench records in a
row's ``env`` column (fmsring.harness.provenance), so the rows say what they ran under.
"""

from __future__ import annotations

import ast
import os
import runpy
import sys

import torch._inductor.config as inductor_config


def main(argv: list[str]) -> None:
    options = []
    while argv and argv[0] != "-m":
        name, sep, value = argv.pop(0).partition("=")
        if not sep or not hasattr(inductor_config, name.split(".")[0]):
            raise SystemExit(f"inductor_options: {name!r} is not NAME=VALUE of an inductor option")
        target = inductor_config
        *path, last = name.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, ast.literal_eval(value))
        options.append(f"{name}={value}")
    if len(argv) < 2:
        raise SystemExit("inductor_options: give the module to run, -m MODULE [ARGS]")
    os.environ["FMSRING_INDUCTOR_OPTIONS"] = ",".join(options)
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
