"""Run settings, declared once.

Each setting is one field of :class:`Settings` (what a run measures) or of a config built
on it: :class:`BenchConfig` (one launch: ``python -m fmsring.bench``) or
:class:`fmsring.harness.grid.SweepConfig` (a grid of launches). Its metadata -- help text,
parser, whether it tells run folders apart -- generates the bench's flags
(``--seq-lens 8K,32K``, ``--no-check``), the bench command line a sweep passes, the
sweep's parameters, the run notebook's parameters cell and the Makefile's variables.
Every parser takes the typed value or its text (``"8K,32K"``, ``"true"``, JSON), so a
CLI flag, a YAML file, a papermill ``-p`` and a ``make VAR=value`` go through the same one.
Stdlib only (dataclasses, argparse): the bench needs no more than torch and ibm-fms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fmsring.harness.plan import padding_problem, parse_ring_variants, with_ring_tp
from fmsring.harness.schema import DTYPES, PHASES, STRATEGIES, Phase
from fmsring.layout import LAYOUTS

# ----------------------------------------------------------------------------- parsers


def _items(value: Any) -> list:
    """A list given as a list, a single value or a "a,b" / "[a, b]" string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip("'\"") for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v.strip("'\"")]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_seq_len(value: Any) -> int:
    """128, "4096", "8K", "128k", "1M" -> tokens (K = 1024), so sweeps read like papers."""
    text = str(value).strip()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"a length is a positive integer with an optional K or M suffix, got {value!r}")
    return int(digits) * scale


def parse_seq_lens(value: Any) -> list[int]:
    return [parse_seq_len(v) for v in _items(value)]


def sizes(value: Any) -> list[int]:
    out = [int(v) for v in _items(value)]
    if any(v < 1 for v in out):
        raise ValueError(f"positive integers, got {value!r}")
    return out


def among(choices: tuple[str, ...]) -> Callable[[Any], list[str]]:
    def parse(value: Any) -> list[str]:
        items = [str(v) for v in _items(value)]
        if not items or any(v not in choices for v in items):
            raise ValueError(f"must be among {', '.join(choices)}, got {value!r}")
        return items

    return parse


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if str(value) not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return parse


def json_object(value: Any) -> dict[str, Any]:
    value = (json.loads(value) if value.strip() else {}) if isinstance(value, str) else value
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {value!r}")
    return dict(value)


def flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def optional(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """None for "", None or "None" (what YAML, papermill and make give for "not set")."""
    return lambda value: None if value in ("", None, "None", "none") else kind(value)


def text(value: Any) -> str:
    return "" if value is None else str(value)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def compile_mode(value: Any) -> str:
    """One of torch.compile's :data:`COMPILE_MODES`, or "" (None too) for none: refused here, at
    parse time, rather than by torch.compile at a launch's first compiled point."""
    mode = text(value)
    if mode and mode not in COMPILE_MODES:
        raise ValueError(f"a torch.compile mode ({', '.join(COMPILE_MODES)}) or empty for none, got {value!r}")
    return mode


# ----------------------------------------------------------------------------- declaration


def setting(default: Any, help: str, parse: Callable[[Any], Any], identity: bool = False) -> Any:
    """A field with its help, its parser, and whether it tells run folders apart (``identity``:
    two values of it are two setups, never one run folder)."""
    meta = {"help": help, "parse": parse, "identity": identity}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def redefault(cls: type, name: str, default: Any) -> Any:
    """``cls``'s setting ``name`` with another default (a subclass that runs more by default)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return setting(default, f.metadata["help"], f.metadata["parse"], f.metadata["identity"])


@dataclass
class Settings:
    """What a run measures: each field is a bench flag and a sweep parameter alike."""

    architecture: str = setting("llama", "FMS architecture", str, identity=True)
    variant: str | None = setting("micro", "FMS variant, e.g. micro or 3-8b (random weights, seeded)",
                                  optional(str), identity=True)  # fmt: skip
    model_path: str | None = setting(None, "checkpoint to load instead of random weights", optional(str), identity=True)
    source: str | None = setting(None, "checkpoint format for model_path, e.g. hf", optional(str), identity=True)
    model_kwargs: dict = setting({}, 'JSON passed to get_model, e.g. {"nlayers": 2}', json_object, identity=True)
    device: str = setting("cpu", "cpu (gloo) or cuda (nccl)", one_of(("cpu", "cuda")), identity=True)
    dtype: str = setting("float32", "float32, bfloat16 or float16", one_of(DTYPES), identity=True)
    strategies: list = setting(["single", "ring"], f"among {', '.join(STRATEGIES)}", among(STRATEGIES))
    phases: list = setting(["prefill"], f"among {', '.join(PHASES)}", among(PHASES))
    seq_lens: list = setting([128, 256], "prompt lengths (followup: new tokens T); K/M suffixes", parse_seq_lens)
    cached_lens: list = setting([], "followup: tokens P already cached, e.g. 32K,128K", parse_seq_lens)
    batch: int = setting(1, "prompts per batch", int, identity=True)
    padding: float = setting(0.0, "decode a batch of unequal prompts: sequence i of b left-padded by F*i/(b-1) "
                             "of the prompt, as FMS's generate pads them", float, identity=True)  # fmt: skip
    layout: str = setting("zigzag", "ring token layout", one_of(tuple(LAYOUTS)), identity=True)
    repeats: int = setting(3, "timed runs per point", int)
    warmup: int = setting(1, "untimed runs per point", int)
    decode_tokens: int = setting(32, "greedy steps timed per decode run", int, identity=True)
    ring_variants: dict = setting({"": {}}, 'JSON {name: {fmsring.get_model ring_* options}}, e.g. '
                                  '{"": {}, "eager": {"ring_cuda_graphs": false}}', json_object)  # fmt: skip
    ring_kwargs: dict = setting({}, "JSON ring_* options merged into every ring variant", json_object)
    ring_tp: list = setting([1], "TP sizes for ring, e.g. 1,2,4: each ring variant once per size (cp: world / tp)",
                            sizes)  # fmt: skip
    as_shipped: bool = setting(False, "also measure single/tp/torch_cp unfused, default SDPA backend", flag)
    compile_peers: str = setting("", "also measure single/tp compiled whole, as FMS's inference script compiles "
                                 f"them, in this torch.compile mode ({', '.join(COMPILE_MODES)}), labelled "
                                 "compiled; empty: not. Their first points compile: leave stall_min_s room for it. "
                                 "Modes with CUDA graphs time prefill only (FMS's growing cache)",
                                 compile_mode)  # fmt: skip
    followup_recompute: bool = setting(True, "with followup: also time ring's fresh prefill of P+T tokens", flag)
    check: bool = setting(True, "compare logits with single's (beyond the dtype's tolerance: mismatch)", flag)
    stall_factor: float = setting(5.0, "a point past this many times its predicted time plus stall_min_s is "
                                  "recorded as timeout and the launch stops; 0 turns it off", float)  # fmt: skip
    stall_min_s: float = setting(180.0, "see stall_factor", float)
    seed: int = setting(0, "seeds weights and prompts (identical on every rank)", int, identity=True)

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, f.metadata["parse"](getattr(self, f.name)))
            except (TypeError, ValueError) as exc:
                problems.append(f"{f.name}: {exc}")
        problems = problems or self.problems()
        if problems:
            raise ValueError(f"bad {type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the values together (each parsed on its own already)."""
        problems = []
        if self.repeats < 1 or self.warmup < 0 or self.batch < 1 or self.decode_tokens < 1:
            problems.append("repeats, batch and decode_tokens must be >= 1 and warmup >= 0")
        if not self.seq_lens:
            problems.append("seq_lens is empty")
        if (Phase.FOLLOWUP in self.phases) != bool(self.cached_lens):
            problems.append("cached_lens and the followup phase go together: give both or neither")
        if not self.variant and not self.model_path:
            problems.append("give a variant or a model_path")
        problems += [p for p in [padding_problem(self.padding, self.batch, self.phases)] if p]
        try:  # ring_tp is folded into ring_variants, so the config reloads as it is
            self.ring_variants = with_ring_tp(parse_ring_variants(self.ring_variants or {"": {}}), self.ring_tp)
            self.ring_tp = [1]
            parse_ring_variants({"": self.ring_kwargs})
        except ValueError as exc:
            problems.append(str(exc))
        return problems

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} setting(s) {unknown}; known: {cls.names()}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that tell run folders apart."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["identity"]}

    def argv(self) -> list[str]:
        """The flags that give this config to ``python -m fmsring.bench``: each setting not at its default."""
        defaults, args = type(self)(), []
        for name in self.names():
            value = getattr(self, name)
            if value == getattr(defaults, name):
                continue
            if isinstance(value, bool):
                args.append(f"--{'' if value else 'no-'}{name.replace('_', '-')}")
            elif value is not None:
                shown = json.dumps(value) if isinstance(value, dict) else value
                shown = ",".join(map(str, value)) if isinstance(value, list) else shown
                args += [f"--{name.replace('_', '-')}", str(shown)]
        return args


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults: bool = True) -> None:
    """One ``--flag-name`` per field of ``cls``; without ``defaults`` an unset flag is None
    (it leaves the value of a file of settings as it is)."""

    def typed(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
        def convert(value: str) -> Any:
            try:
                return parse(value)
            except (TypeError, ValueError) as exc:
                raise argparse.ArgumentTypeError(str(exc)) from exc

        return convert

    for f in dataclasses.fields(cls):
        default = (f.default_factory() if f.default is dataclasses.MISSING else f.default) if defaults else None
        kwargs: dict[str, Any] = {"default": default, "help": f.metadata["help"].replace("%", "%%")}
        if f.metadata["parse"] is flag:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = typed(f.metadata["parse"])
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


@dataclass
class BenchConfig(Settings):
    """One launch of ``python -m fmsring.bench``: the settings, and where its rows go."""

    out: str | None = setting(None, "CSV to append rows to (rank 0 writes); its rates go beside it: "
                              "r.csv -> r.ceilings.json", optional(str))  # fmt: skip
    resume: bool = setting(False, "skip points that already have an ok/skipped/mismatch row in --out", flag)
    timeout_s: float = setting(1800.0, "collective timeout; must exceed one point's run", float)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(
        prog="python -m fmsring.bench",
        description="Benchmark single / ring / tp / torch_cp inference and append CSV rows (torchrun for N>1).",
    )
    add_flags(parser, BenchConfig)
    try:
        return BenchConfig(**vars(parser.parse_args(argv)))
    except ValueError as exc:
        parser.error(str(exc))
