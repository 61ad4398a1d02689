"""Which rows a bench launch writes: the ring variants (named sets of ``ring_*`` options,
expanded over TP sizes), the follow-ups' fresh prefills, and the points in measuring
order. The sweep plans a launch's rows with the same functions, without starting one.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any

from fmsring.cache import headroom_for
from fmsring.harness.flops import decode_steps
from fmsring.harness.schema import AS_SHIPPED, COMPILED, Phase, Point, Strategy
from fmsring.loading import get_model


def parse_ring_variants(value: Any) -> dict[str, dict[str, Any]]:
    """``{name: {ring_* kwargs}}`` from a dict or its JSON text; names and options checked."""
    variants = json.loads(value) if isinstance(value, str) else value
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError(f'ring variants must be a JSON object of objects, e.g. {{"": {{}}}}, got {value!r}')
    known = {n for n in inspect.signature(get_model).parameters if n.startswith("ring_")}  # a variant may set any
    for name, kwargs in variants.items():
        if name in (AS_SHIPPED, COMPILED) or name.strip() != name or "," in name:
            raise ValueError(
                f"ring variant name {name!r}: no leading/trailing space or comma, not {AS_SHIPPED!r} or {COMPILED!r}"
            )
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"ring variant {name!r}: unknown option(s) {unknown}; fmsring.get_model takes {sorted(known)}"
            )
    return {str(k): dict(v) for k, v in variants.items()}


def ring_variant_label(name: str, ring_kwargs: dict[str, Any]) -> str:
    """The ``variant`` column of a ring variant: its name, plus the options every ring
    variant shares (``--ring-kwargs``), so its rows are never mistaken for the default's."""
    if not ring_kwargs:
        return name
    shared = json.dumps(ring_kwargs, sort_keys=True)
    return f"{name} {shared}" if name else shared


def with_ring_tp(variants: dict[str, dict[str, Any]], tps: list[int]) -> dict[str, dict[str, Any]]:
    """Every ring variant once per TP size in ``tps`` (``--ring-tp 1,2,4``): one launch covers
    every factorisation cp x tp of its world. tp 1 keeps a variant's name, tp T appends "tpT"."""
    if not tps or list(tps) == [1]:
        return variants
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in tps):
        raise ValueError(f"ring TP sizes are positive integers, got {tps}")
    out: dict[str, dict[str, Any]] = {}
    for name, kwargs in variants.items():
        if "ring_tp" in kwargs:
            raise ValueError(f"ring variant {name!r} sets ring_tp and --ring-tp expands it too: use one")
        for t in dict.fromkeys(tps):
            out[name if t == 1 else f"{name} tp{t}".strip()] = kwargs if t == 1 else {**kwargs, "ring_tp": t}
    return out


def ring_tp_of(ring_kwargs: dict[str, Any]) -> int:
    """The TP size a ring variant's options ask for (1: weights replicated)."""
    return int(ring_kwargs.get("ring_tp", 1))


def fitting_ring_variants(variants: dict[str, dict[str, Any]], world: int) -> dict[str, dict[str, Any]]:
    """The ring variants that exist at ``world`` ranks: those whose ring_tp divides it."""
    return {name: kw for name, kw in variants.items() if world % ring_tp_of(kw) == 0}


def recomputed(seq_lens: list[int], phases: list[str], cached_lens: list[int]) -> dict[int, tuple[int, int]]:
    """Ring's fresh prefills beside the follow-ups: length P+T -> the first (P, T) that sums to it.
    A length the prefill phase measures anyway is left out (its prompt is that phase's)."""
    if Phase.FOLLOWUP not in phases:
        return {}
    measured = set(seq_lens) if Phase.PREFILL in phases else set()
    out: dict[int, tuple[int, int]] = {}
    for c in cached_lens:
        for t in seq_lens:
            if c + t not in measured:
                out.setdefault(c + t, (c, t))
    return out


def planned_points(
    strategy: str, world: int, variants: list[str], seq_lens: list[int], phases: list[str], cached_lens: list[int],
    followup_recompute: bool,
) -> list[Point]:  # fmt: skip
    """Every row a bench launch writes for ``strategy`` at ``world``, in the order it measures them.

    ``followup`` points have seq_len = the new tokens T and cached_len = the cached P.
    With ``followup_recompute`` ring also gets a fresh prefill of P+T tokens (:func:`recomputed`).
    """
    fresh = recomputed(seq_lens, phases, cached_lens) if strategy == Strategy.RING and followup_recompute else {}
    points: list[Point] = []
    for v in variants:
        points += [Point(strategy, v, world, n, 0, p) for n in seq_lens for p in phases if p != Phase.FOLLOWUP]
        if Phase.FOLLOWUP in phases:
            points += [Point(strategy, v, world, t, c, Phase.FOLLOWUP.value) for c in cached_lens for t in seq_lens]
        points += [Point(strategy, v, world, n, 0, Phase.PREFILL.value) for n in fresh]
    return list(dict.fromkeys(points))


def point(
    strategy: str, world: int, seq_len: int, phase: str, *, batch: int, dtype: str, layout: str, variant: str = "",
    cached_len: int = 0, ring_tp: int = 1, padding: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """The columns that say which point a row measures (the sweep's failure rows use them too)."""
    cp, tp = Strategy(strategy).mesh(world, ring_tp)
    return {
        "strategy": strategy,
        "variant": variant,
        "world_size": world,
        "cp_size": cp,
        "tp_size": tp,
        "seq_len": seq_len,
        "cached_len": cached_len,
        "batch": batch,
        "padding": padding,
        "dtype": dtype,
        "layout": layout if strategy == Strategy.RING else "",
        "phase": phase,
    }


def padding_problem(padding: float, batch: int, phases: Any) -> str:
    """Why a padding fraction cannot be measured as asked ("" if it can): it pads a batch's
    prompts to unequal lengths, so it needs two of them, and only decode rows take it."""
    if not 0 <= padding < 1:
        return f"padding is a fraction of the prompt in [0, 1), got {padding}"
    if padding and (batch < 2 or set(phases) != {Phase.DECODE}):
        return "padding needs a batch of >= 2 and the decode phase alone (a padded batch's generation)"
    return ""


@dataclass(frozen=True)
class Variant:
    """One configuration of a strategy: ``label`` is its ``variant`` column."""

    strategy: str
    label: str = ""
    ring_kwargs: dict[str, Any] = field(default_factory=dict)  # ring: fmsring.get_model ring_* options
    tuned: bool = True  # peers: fused elementwise work and the fastest SDPA backend
    compile_mode: str = ""  # peers: the torch.compile mode the whole model is compiled in ("" none)

    @property
    def ring_tp(self) -> int:
        """Ranks each ring replica's weights are sharded over (1 for the peers)."""
        return ring_tp_of(self.ring_kwargs)


def variants(strategy: str, cfg: Any) -> list[Variant]:
    """The variants of ``strategy`` a run measures, in order.

    ``cfg``: a bench or sweep config. The peers: tuned (the default variant); with
    ``cfg.compile_peers`` single and tp also tuned and then compiled whole, FMS's fastest
    decode (``compiled``); with ``cfg.as_shipped`` FMS as shipped. Ring: one per
    ``cfg.ring_variants`` entry, each with ``cfg.ring_kwargs`` merged in. With the followup
    phase ring's cache keeps room for the longest follow-up and the decode steps beyond the
    prompt (unless a variant sets ``ring_cache_headroom``), so a follow-up writes into the
    preallocated slots and leaves the cached prompt valid for the next repeat.
    """
    if strategy != Strategy.RING:  # the peers' strongest configuration, compiled whole, and FMS's own
        compiles = cfg.compile_peers and strategy in (Strategy.SINGLE, Strategy.TP)  # torch_cp has no decode
        compiled = [Variant(strategy, COMPILED, compile_mode=cfg.compile_peers)] if compiles else []
        shipped = [Variant(strategy, AS_SHIPPED, tuned=False)] if cfg.as_shipped else []
        return [Variant(strategy), *compiled, *shipped]
    headroom = {}
    if Phase.FOLLOWUP in cfg.phases:
        # as if every new token landed on one rank: room for any layout, whatever the world size
        headroom = {"ring_cache_headroom": headroom_for(max(cfg.seq_lens) + decode_steps(cfg.decode_tokens), 1)}
    elif Phase.DECODE in cfg.phases:  # every step of a generation in the prefill's cache: none grows it
        headroom = {"ring_cache_headroom": headroom_for(1 + decode_steps(cfg.decode_tokens), 1)}
    out = []
    for name, kwargs in cfg.ring_variants.items():
        clash = sorted(set(kwargs) & set(cfg.ring_kwargs))
        if clash:
            raise ValueError(f"ring variant {name!r} and --ring-kwargs both set {clash}")
        merged = {**headroom, **cfg.ring_kwargs, **kwargs}
        out.append(Variant(Strategy.RING, ring_variant_label(name, cfg.ring_kwargs), merged))
    return out
