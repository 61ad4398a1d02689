"""What a sweep measures and how each group is launched: :class:`SweepConfig`, the
check of the whole grid before anything starts, and the bench command of one
(world size, strategy) group.

The grid is checked up front -- unknown names, ``device=cuda`` with no GPU,
tensor-parallel sizes the model's heads do not divide, prompts shorter than
ring's world size, cached lengths without the followup phase -- so a bad sweep
fails in a second with every problem named, not after an hour of launches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmsring.harness import launch
from fmsring.harness.schema import (
    DTYPES,
    PHASES,
    STRATEGIES,
    ModelSpec,
    Point,
    fitting_ring_variants,
    padding_problem,
    parse_ring_variants,
    parse_seq_lens,
    planned_points,
    ring_tp_of,
    variant_labels,
    with_ring_tp,
)

BENCH_MODULE = "fmsring.bench"
# Fields that change what a point measures: a run folder holds one value of each.
IDENTITY_FIELDS = (
    "architecture", "variant", "model_path", "source", "model_kwargs",
    "device", "dtype", "batch", "padding", "layout", "decode_tokens",
)  # fmt: skip
# bench flags the sweep sets from its own fields: in extra_args they would make the
# bench write other rows than the sweep expects.
OWNED_FLAGS = (
    "--strategies", "--phases", "--seq-lens", "--cached-lens", "--ring-variants", "--ring-kwargs", "--ring-tp",
    "--as-shipped", "--no-as-shipped", "--followup-recompute", "--no-followup-recompute", "--out", "--resume",
    "--device", "--dtype", "--batch", "--padding", "--layout", "--decode-tokens", "--model-kwargs", "--architecture",
    "--variant",
)  # fmt: skip


def _split_list(value: Any, kind: Any) -> list:
    """Lists given as lists, tuples, a single value or a "1,2,4" string."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [kind(v.strip().strip("'\"") if isinstance(v, str) else v) for v in value]


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def _optional(value: Any, kind: Any) -> Any:
    return None if value in ("", None) else kind(value)


@dataclass
class SweepConfig(ModelSpec):
    """What to measure (the model fields come from ModelSpec) and how to launch it.
    Lists also accept "a,b,c" strings."""

    # grid
    world_sizes: list[int] = field(default_factory=lambda: [1, 2])
    strategies: list[str] = field(default_factory=lambda: ["single", "ring"])  # single runs once, at world size 1
    seq_lens: list[int] = field(default_factory=lambda: [128, 256])  # prompt lengths; followup: new tokens T
    phases: list[str] = field(default_factory=lambda: ["prefill", "decode"])
    cached_lens: list[int] = field(default_factory=list)  # followup: tokens P already in the cache
    ring_variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})  # {name: {ring_* options}}
    ring_tp: list[int] = field(default_factory=lambda: [1])  # every ring variant at each TP size (cp = world / tp)
    as_shipped: bool = False  # also measure the peers as FMS/PyTorch ship them (variant as-shipped)
    followup_recompute: bool = True  # ring: a fresh prefill of P+T beside each follow-up
    decode_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    batch: int = 1
    padding: float = 0.0  # decode a left-padded batch of unequal prompts (fmsring.bench --padding)
    layout: str = "zigzag"
    # where and how
    out_dir: str = "runs/local"  # git-ignored; committed runs go directly under runs/ (runs/README.md)
    name: str = ""  # run folder under out_dir; "" = derived from device/model/dtype (see run_name)
    launcher: str = "torchrun"  # torchrun (one node) or srun (inside a Slurm allocation, c10d rendezvous)
    timeout_s: float = 3600.0  # wall-clock limit of one group; past it the group is killed and marked timeout
    bench_timeout_s: float | None = None  # bench's --timeout-s (collective timeout); default: timeout_s
    gpus_per_node: int | None = None  # srun: processes per node; default SLURM_GPUS_ON_NODE, else 8
    rdzv_port: int = 29500  # srun: c10d rendezvous port on the head node
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the launched processes
    check: bool = True  # bench compares every strategy's logits with `single` (a row beyond tolerance: mismatch)
    # extra flags passed to fmsring.bench as they are, e.g. ["--seed", "1"]
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.world_sizes = _split_list(self.world_sizes, int)
        self.strategies = _split_list(self.strategies, str)
        self.phases = _split_list(self.phases, str)
        self.seq_lens = parse_seq_lens(self.seq_lens)
        self.cached_lens = parse_seq_lens(self.cached_lens)
        self.ring_variants = with_ring_tp(
            parse_ring_variants(self.ring_variants or {"": {}}), _split_list(self.ring_tp, int)
        )
        self.ring_tp = [1]  # expanded into ring_variants, so the config reloads as it is
        if isinstance(self.extra_args, str):
            self.extra_args = shlex.split(self.extra_args)
        self.extra_args = [str(a) for a in self.extra_args]
        if isinstance(self.model_kwargs, str):
            self.model_kwargs = json.loads(self.model_kwargs) if self.model_kwargs.strip() else {}
        self.model_kwargs = dict(self.model_kwargs or {})
        self.env = {str(k): str(v) for k, v in (self.env or {}).items()}
        for attr in ("variant", "model_path", "source"):
            if getattr(self, attr) in ("", "None", "none"):
                setattr(self, attr, None)
        for attr in ("decode_tokens", "repeats", "warmup", "batch", "rdzv_port"):
            setattr(self, attr, int(getattr(self, attr)))
        self.timeout_s, self.padding = float(self.timeout_s), float(self.padding)
        self.check, self.as_shipped = _flag(self.check), _flag(self.as_shipped)
        self.followup_recompute = _flag(self.followup_recompute)
        self.bench_timeout_s = _optional(self.bench_timeout_s, float)
        self.gpus_per_node = _optional(self.gpus_per_node, int)
        self.name, self.out_dir = self.name or "", str(self.out_dir)
        problems = self._syntax_problems()
        if problems:
            raise ValueError("bad sweep config: " + "; ".join(problems))

    def _syntax_problems(self) -> list[str]:
        """What is wrong with the parameters themselves (no model, no device needed)."""
        problems = []
        if not self.world_sizes or any(w < 1 for w in self.world_sizes):
            problems.append(f"world_sizes must be positive integers, got {self.world_sizes}")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if not self.strategies or unknown:
            problems.append(f"strategies must be among {STRATEGIES}, got {self.strategies}")
        if not self.seq_lens:
            problems.append("seq_lens is empty")
        if not self.phases or any(p not in PHASES for p in self.phases):
            problems.append(f"phases must be among {PHASES}, got {self.phases}")
        if ("followup" in self.phases) != bool(self.cached_lens):
            problems.append("cached_lens and the followup phase go together: give both or neither")
        if self.device not in ("cpu", "cuda"):
            problems.append(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.launcher not in launch.LAUNCHERS:
            problems.append(f"launcher must be one of {launch.LAUNCHERS}, got {self.launcher!r}")
        if self.timeout_s <= 0:
            problems.append("timeout_s must be > 0")
        if self.repeats < 1 or self.warmup < 0 or self.batch < 1 or self.decode_tokens < 1:
            problems.append("repeats, batch and decode_tokens must be >= 1 and warmup >= 0")
        padding = padding_problem(self.padding, self.batch, self.phases)
        if padding:
            problems.append(padding)
        if not self.variant and not self.model_path:
            problems.append("give a variant or a model_path")
        owned = [a for a in self.extra_args if a.split("=")[0] in OWNED_FLAGS]
        if owned:
            problems.append(f"extra_args {owned} set what the sweep's own parameters set; use those")
        return problems

    # -- construction ----------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sweep parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> SweepConfig:
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of sweep parameters")
        d.update(overrides)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived -----------------------------------------------------------

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
        out: list[tuple[int, str]] = []
        if "single" in self.strategies:
            out.append((1, "single"))
        for w in dict.fromkeys(self.world_sizes):
            for s in dict.fromkeys(self.strategies):
                if s != "single" and not (s == "tp" and w == 1):
                    out.append((w, s))
        return out

    def points(self, world: int, strategy: str) -> list[Point]:
        """The rows the launch of one group writes (see schema.planned_points)."""
        variants = variant_labels(strategy, fitting_ring_variants(self.ring_variants, world), {}, self.as_shipped)
        return planned_points(
            strategy, world, variants, self.seq_lens, self.phases, self.cached_lens, self.followup_recompute
        )

    def grid(self) -> list[Point]:
        return [p for w, s in self.groups() for p in self.points(w, s)]

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}


# ---------------------------------------------------------------------------
# checking the grid before launching it


def validate(cfg: SweepConfig) -> None:
    """Raise ValueError naming every point of the grid that cannot run, before any launch."""
    import torch

    problems = []
    if cfg.device == "cuda" and cfg.launcher == "torchrun":
        if not torch.cuda.is_available():
            problems.append("device=cuda but torch sees no GPU on this machine")
        elif max(cfg.world_sizes) > torch.cuda.device_count():
            problems.append(f"world size {max(cfg.world_sizes)} but this machine has {torch.cuda.device_count()} GPUs")
    if "ring" in cfg.strategies:
        prompts = cfg.seq_lens if set(cfg.phases) & {"prefill", "decode"} else []
        for w in cfg.world_sizes:
            short = sorted({n for n in [*prompts, *cfg.cached_lens] if n < w})
            if short:
                problems.append(f"ring at world size {w} needs prompts (and cached_lens) of >= {w} tokens: {short}")
    tp_worlds = sorted({w for w, s in cfg.groups() if s == "tp"})
    ring_tps = sorted({ring_tp_of(kw) for kw in cfg.ring_variants.values()} - {1}) if "ring" in cfg.strategies else []
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


# ---------------------------------------------------------------------------
# commands


def bench_args(cfg: SweepConfig, strategy: str, out: str | os.PathLike) -> list[str]:
    """``-m fmsring.bench ...`` for one launch; it measures the points ``out`` lacks (--resume)."""
    args = ["-m", BENCH_MODULE, "--architecture", cfg.architecture]
    if cfg.variant:
        args += ["--variant", cfg.variant]
    if cfg.model_path:
        args += ["--model-path", cfg.model_path]
    if cfg.source:
        args += ["--source", cfg.source]
    if cfg.model_kwargs:
        args += ["--model-kwargs", json.dumps(cfg.model_kwargs)]
    args += [
        "--device", cfg.device,
        "--dtype", cfg.dtype,
        "--strategies", strategy,
        "--phases", ",".join(cfg.phases),
        "--seq-lens", ",".join(str(n) for n in cfg.seq_lens),
        "--batch", str(cfg.batch),
        "--padding", launch.num(cfg.padding),
        "--layout", cfg.layout,
        "--repeats", str(cfg.repeats),
        "--warmup", str(cfg.warmup),
        "--decode-tokens", str(cfg.decode_tokens),
        "--out", str(out),
        "--resume",
        "--timeout-s", launch.num(cfg.bench_timeout_s if cfg.bench_timeout_s is not None else cfg.timeout_s),
    ]  # fmt: skip
    if cfg.cached_lens:
        args += ["--cached-lens", ",".join(str(n) for n in cfg.cached_lens)]
    if strategy == "ring" and cfg.ring_variants != {"": {}}:
        args += ["--ring-variants", json.dumps(cfg.ring_variants)]
    if cfg.as_shipped and strategy != "ring":
        args.append("--as-shipped")
    if not cfg.followup_recompute:
        args.append("--no-followup-recompute")
    if not cfg.check:
        args.append("--no-check")
    return args + list(cfg.extra_args)


def launch_command(cfg: SweepConfig, world_size: int, args: list[str], tag: str = "0") -> list[str]:
    """The full command line of one launch, for ``cfg.launcher``."""
    return launch.launch_command(cfg.launcher, world_size, args, tag, cfg.gpus_per_node, cfg.rdzv_port)
