"""What a sweep measures and how each group is launched: :class:`SweepConfig` (the bench's
settings plus the world sizes and the launch), the check of the whole grid before anything
starts -- so a bad sweep fails in a second with every problem named, not after an hour of
launches -- and the surfaces made from its fields: the bench command of one (world size,
strategy) group, ``make sweep``'s variables and the run notebook's parameters."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmsring.harness import launch
from fmsring.harness.plan import fitting_ring_variants, planned_points, ring_tp_of, variants
from fmsring.harness.schema import Point, Strategy
from fmsring.harness.settings import (
    BenchConfig,
    Settings,
    json_object,
    one_of,
    optional,
    redefault,
    setting,
    sizes,
    text,
)


def env_vars(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in json_object(value or {}).items()}


BENCH_MODULE = "fmsring.bench"
# make's names for the settings that are not their field's name upper-cased (README, `make help`)
NOTEBOOK_DEFAULTS = Path(__file__).resolve().parents[2] / "notebooks" / "presets" / "smoke.yaml"
PARAMETERS_CELL = '# %% tags=["parameters"]\n'
MAKE_ALIASES = {"MODEL": "variant", "NPROC": "world_sizes", "ARCH": "architecture", "TIMEOUT": "timeout_s"}


@dataclass
class SweepConfig(Settings):
    """A grid of bench launches: every bench setting, plus the world sizes and the launch."""

    phases: list = redefault(Settings, "phases", ["prefill", "decode"])
    world_sizes: list = setting([1, 2], "processes (GPUs) per launch", sizes)
    out_dir: str = setting("runs/local", "folder of run folders (runs/local is git-ignored)", str)
    name: str = setting("", "run folder under out_dir; empty derives one from device, model and dtype", text)
    launcher: str = setting("torchrun", "torchrun (one node) or srun (a Slurm allocation, c10d rendezvous)",
                            one_of(launch.LAUNCHERS))  # fmt: skip
    timeout_s: float = setting(3600.0, "wall-clock limit of one launch in seconds; then it is killed", float)
    bench_timeout_s: float | None = setting(None, "the bench's collective timeout; empty: timeout_s", optional(float))
    gpus_per_node: int | None = setting(None, "srun: processes per node; empty: SLURM_GPUS_ON_NODE, else 8",
                                        optional(int))  # fmt: skip
    rdzv_port: int = setting(29500, "srun: c10d rendezvous port on the head node", int)
    env: dict = setting({}, "extra environment variables of the launched processes", env_vars)

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.timeout_s <= 0 or not self.world_sizes:
            problems.append("timeout_s must be > 0 and world_sizes not empty")
        return problems

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> SweepConfig:
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of sweep settings")
        return cls.from_dict({**d, **overrides})

    @property
    def run_name(self) -> str:
        """``name``, or ``<device>-<model>-<dtype>``."""
        if self.name:
            return self.name
        model = Path(self.model_path).name if self.model_path else f"{self.architecture}-{self.variant}"
        return f"{self.device}-{model}-{self.dtype}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name

    def groups(self) -> list[tuple[int, str]]:
        """(world size, strategy) launches, in order: ``single`` once at world size 1, then the rest.

        ``tp`` at world size 1 would be ``single`` again (the bench skips it), so it is left out.
        """
        out: list[tuple[int, str]] = [(1, Strategy.SINGLE.value)] if Strategy.SINGLE in self.strategies else []
        for w in dict.fromkeys(self.world_sizes):
            for s in dict.fromkeys(self.strategies):
                if s != Strategy.SINGLE and not (s == Strategy.TP and w == 1):
                    out.append((w, s))
        return out

    def points(self, world: int, strategy: str) -> list[Point]:
        """The rows the launch of one group writes (see plan.planned_points)."""
        fitting = dataclasses.replace(self, ring_variants=fitting_ring_variants(self.ring_variants, world))
        labels = [v.label for v in variants(strategy, fitting)]
        return planned_points(
            strategy, world, labels, self.seq_lens, self.phases, self.cached_lens, self.followup_recompute
        )

    def grid(self) -> list[Point]:
        return [p for w, s in self.groups() for p in self.points(w, s)]

    def bench_args(self, strategy: str, out: str | os.PathLike) -> list[str]:
        """``-m fmsring.bench ...`` for one group; it measures the points ``out`` lacks (--resume)."""
        shared = {name: getattr(self, name) for name in Settings.names()}
        timeout = self.timeout_s if self.bench_timeout_s is None else self.bench_timeout_s
        bench = BenchConfig(**{**shared, "strategies": [strategy]}, out=str(out), resume=True, timeout_s=timeout)
        return ["-m", BENCH_MODULE, *bench.argv()]

    def launch_command(self, world_size: int, args: list[str], tag: str = "0") -> list[str]:
        """The full command line of one launch, for ``launcher``."""
        return launch.launch_command(self.launcher, world_size, args, tag, self.gpus_per_node, self.rdzv_port)


def from_make(words: list[str], params: str | None = None) -> dict[str, Any]:
    """The settings of ``make sweep VAR=value ...``: each VAR is the field of that name lower-cased
    (or a :data:`MAKE_ALIASES` name), PARAMS a YAML file of them beneath; an unknown name is an error.
    A model named without MODEL_KWARGS drops the run notebook's smoke-test ``{"nlayers": 2}``."""
    import yaml

    given: dict[str, Any] = {}
    for word in words:
        var, _, value = word.partition("=")
        given[MAKE_ALIASES.get(var, var.lower())] = value
    unknown = sorted(set(given) - set(SweepConfig.names()))
    if unknown:
        aliases = ", ".join(f"{k} ({v})" for k, v in MAKE_ALIASES.items())
        raise ValueError(f"unknown sweep setting(s) {unknown}: a make variable is a SweepConfig field upper-cased "
                         f"({', '.join(n.upper() for n in SweepConfig.names())}) or {aliases}")  # fmt: skip
    settings = dict(yaml.safe_load(open(params)) or {}) if params else {}
    if {"variant", "model_path"} & set(given) and "model_kwargs" not in given:
        given["model_kwargs"] = {}
    return {**settings, **given}


def notebook_parameters(defaults: str | os.PathLike = NOTEBOOK_DEFAULTS) -> str:
    """The run notebook's parameters cell: every SweepConfig field, its value in ``defaults``, its help.
    "Not set" is written "" (papermill's parameter parser reads plain type names, not ``str | None``)."""
    cfg, lines = SweepConfig.from_yaml(defaults), []
    for f in dataclasses.fields(SweepConfig):
        value = "" if getattr(cfg, f.name) is None else getattr(cfg, f.name)
        lines.append(f"{f.name}: {type(value).__name__} = {value!r}  # {f.metadata['help']}")
    return "\n".join(lines)


def notebook_config(values: dict[str, Any], root: Path | None = None) -> SweepConfig:
    """The run notebook's config from its parameters: the smoke test's cached_lens belong to its
    followup phase (a run without that phase drops them), out_dir is relative to ``root``."""
    cfg = SweepConfig.from_dict(values if "followup" in str(values["phases"]) else {**values, "cached_lens": []})
    if root is not None and not Path(cfg.out_dir).is_absolute():
        cfg.out_dir = str(root / cfg.out_dir)
    return cfg


def update_notebook(path: str | os.PathLike = "notebooks/run.py") -> None:
    """Write :func:`notebook_parameters` into the run notebook's parameters cell (then
    ``jupytext --update --to ipynb notebooks/run.py`` pairs the .ipynb)."""
    text = Path(path).read_text()
    start = text.index(PARAMETERS_CELL) + len(PARAMETERS_CELL)
    end = text.index("\n# %%", start)
    Path(path).write_text(text[:start] + notebook_parameters() + "\n" + text[end:])


def validate(cfg: SweepConfig) -> None:
    """Raise ValueError naming every point of the grid that cannot run, before any launch."""
    import torch

    problems = []
    if cfg.device == "cuda" and cfg.launcher == "torchrun":
        if not torch.cuda.is_available():
            problems.append("device=cuda but torch sees no GPU on this machine")
        elif max(cfg.world_sizes) > torch.cuda.device_count():
            problems.append(f"world size {max(cfg.world_sizes)} but this machine has {torch.cuda.device_count()} GPUs")
    if Strategy.RING in cfg.strategies:
        prompts = cfg.seq_lens if set(cfg.phases) & {"prefill", "decode"} else []
        for w in cfg.world_sizes:
            short = sorted({n for n in [*prompts, *cfg.cached_lens] if n < w})
            if short:
                problems.append(f"ring at world size {w} needs prompts (and cached_lens) of >= {w} tokens: {short}")
    tp_worlds = sorted({w for w, s in cfg.groups() if s == Strategy.TP})
    ring_tps = (
        sorted({ring_tp_of(kw) for kw in cfg.ring_variants.values()} - {1}) if Strategy.RING in cfg.strategies else []
    )
    unused = [t for t in ring_tps if all(w % t for w in cfg.world_sizes)]
    if unused:
        problems.append(f"ring_tp {unused} divides none of the world sizes {cfg.world_sizes}")
        ring_tps = [t for t in ring_tps if t not in unused]
    if tp_worlds or ring_tps:
        problems += _tp_problems(cfg, tp_worlds, ring_tps)
    if problems:
        raise ValueError("bad sweep grid: " + "; ".join(problems))


def _tp_problems(cfg: SweepConfig, worlds: list[int], ring_tps: list[int]) -> list[str]:
    """Tensor parallel splits the heads: FMS needs nheads % W == 0, and kvheads a multiple or divisor of W,
    for tp at each of ``worlds`` and for ring x TP at each of ``ring_tps``.

    The heads are read from the model built on the meta device without weights, as the bench
    counts FLOPs; where FMS cannot build it that way (a checkpoint-only architecture) the check
    is left to the bench, with a note.
    """
    import fms.models
    from fms.modules.attention import MultiHeadAttention

    try:
        meta = fms.models.get_model(
            cfg.architecture, cfg.variant, device_type="meta", distributed_strategy="none", **cfg.model_kwargs
        )
        attn = next(m for m in meta.modules() if isinstance(m, MultiHeadAttention))
    except Exception as exc:  # noqa: BLE001
        print(
            f"fmsring.sweep: tp's heads not checked (no meta model here: {type(exc).__name__}: {exc})", file=sys.stderr
        )
        return []

    def splits(w: int) -> bool:
        return attn.nheads % w == 0 and (attn.kvheads % w == 0 if attn.kvheads >= w else w % attn.kvheads == 0)

    heads = f"{attn.nheads} heads / {attn.kvheads} kv-heads do not split over them"
    problems = []
    bad = [w for w in worlds if not splits(w)]
    if bad:
        problems.append(f"tp at world sizes {bad}: {heads}")
    bad = [t for t in ring_tps if not splits(t)]
    if bad:
        problems.append(f"ring_tp {bad}: {heads}")
    return problems
