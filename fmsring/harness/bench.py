"""Time single-GPU, ring, tensor-parallel and torch context-parallel inference side by side.

Run it under ``torchrun --nproc_per_node=N -m fmsring.bench ...`` (or as one plain
process). Every strategy runs on the same machine, with the same seeded random
weights and prompts, and each point (strategy, variant, seq_len, cached_len,
phase) becomes one CSV row, appended by rank 0 as soon as it is measured, so a
crash keeps finished rows. A point that runs out of memory or raises becomes an
``oom``/``error`` row and the run goes on; all ranks agree on every point's
status first, so no rank waits in a collective another rank skipped. A row
whose logits differ from the one-GPU model's beyond the dtype's tolerance is
``mismatch``. The exit code is 0 only when every row is ``ok`` or ``skipped``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fms.models
import torch
from fms.modules.attention import MultiHeadAttention
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record as record_errors

from fmsring.allocator import ALLOC_CONF
from fmsring.harness import ceilings
from fmsring.harness.exactness import NOT_COMPARED, compare, judge
from fmsring.harness.flops import FlopShape, Rates, decode_steps, floor_ms, flop_shape, phase_flops
from fmsring.harness.peers import make_peer, model_args
from fmsring.harness.plan import Variant, planned_points, point, recomputed, variants
from fmsring.harness.provenance import now, row_provenance
from fmsring.harness.ranks import DistEnv, Measured, agree, barrier, broadcast, free_memory, setup_dist
from fmsring.harness.schema import Phase, Point, Strategy, append_rows, check_header, done_points
from fmsring.harness.session import Session
from fmsring.harness.settings import BenchConfig, parse_args
from fmsring.harness.watchdog import STALL_EXIT, StallGuard, predicted_s

# ----------------------------------------------------------------------------- model facts


def meta_model(cfg: BenchConfig) -> nn.Module | None:
    """The unsharded model on the meta device (no memory, no weights); None if FMS can't build it."""
    try:
        meta_cfg = dataclasses.replace(cfg, model_path=None, source=None)
        return fms.models.get_model(**model_args(meta_cfg, device="meta"), distributed_strategy="none")
    except Exception as exc:  # noqa: BLE001 - FLOPs and floors are optional, the benchmark is not
        print(f"[bench] no FLOP count or floor: cannot build a meta model ({exc})", file=sys.stderr)
        return None


def fit_rope_table(cfg: BenchConfig, meta: nn.Module | None) -> BenchConfig:
    """Raise max_expected_seq_len to the longest context: FMS's plain models never regrow
    their RoPE table, so single/tp/torch_cp would index past it on long prompts."""
    if meta is None or "max_expected_seq_len" in cfg.model_kwargs:
        return cfg
    needed = max(cfg.seq_lens) + 1 + (decode_steps(cfg.decode_tokens) if Phase.DECODE in cfg.phases else 0)
    if Phase.FOLLOWUP in cfg.phases:
        needed = max(needed, max(cfg.cached_lens) + max(cfg.seq_lens) + 1)
    have = getattr(getattr(meta, "config", None), "max_expected_seq_len", None)
    if have is None or have >= needed:
        return cfg
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[bench] max_expected_seq_len {have} -> {needed}: the RoPE table must cover the longest context",
              file=sys.stderr)  # fmt: skip
    return dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, "max_expected_seq_len": needed})


def _rates(cfg: BenchConfig, env: DistEnv, meta: nn.Module | None) -> Rates | None:
    """Rank 0 measures (or reads) the device's ceilings; a failure costs the floor, not the run."""
    attn = next((m for m in meta.modules() if isinstance(m, MultiHeadAttention)), None) if meta is not None else None
    rates = None
    if env.rank == 0 and attn is not None:
        path = ceilings.ceilings_path(cfg.out) if cfg.out else None
        try:
            rates = ceilings.load_or_measure(path, env.device, cfg.dtype, attn.nheads, attn.emb_kq_per_head)
        except Exception as exc:  # noqa: BLE001
            print(f"[bench] no floor: measuring the device's rates failed ({exc})", file=sys.stderr)
    barrier(env)
    return rates


# ----------------------------------------------------------------------------- rows


@dataclass
class Run:
    """State shared by the points of one run."""

    cfg: BenchConfig
    env: DistEnv
    info: dict[str, Any]
    shape: FlopShape | None
    rates: Rates | None
    recompute: dict[int, tuple[int, int]]  # ring prefill length -> the (P, T) follow-up it recomputes
    refs: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # rank 0
    tried: set[tuple[int, int, str]] = field(default_factory=set)  # reference points run, on every rank
    rows: list[dict[str, Any]] = field(default_factory=list)

    def ref_key(self, pt: Point) -> tuple[int, int, str]:
        """Which `single` output a point is checked against: a recompute of P+T against the follow-up."""
        if pt.strategy == Strategy.RING and pt.phase == Phase.PREFILL and pt.seq_len in self.recompute:
            cached, new = self.recompute[pt.seq_len]
            return new, cached, Phase.FOLLOWUP.value
        return pt.seq_len, pt.cached_len, pt.phase


def summarize(result: Measured, flops: float, gpus: int) -> dict[str, Any]:
    """Median and spread of the latencies, TTFT median, the first step (a generation's first
    one-token step, a prefill's or follow-up's first call: its compile and capture beside the
    steady state) and streamed step median, FLOP rate per GPU."""
    lat = result.latencies
    if result.status not in ("ok", "mismatch") or not lat:
        return dict.fromkeys(("latency_ms", "latency_ms_min", "latency_ms_max", "ttft_ms", "first_step_ms",
                              "stream_ms", "tflops_per_gpu"), math.nan)  # fmt: skip
    median = statistics.median(lat)
    return {"latency_ms": median, "latency_ms_min": min(lat), "latency_ms_max": max(lat),
            "ttft_ms": statistics.median(result.ttfts) if result.ttfts else math.nan,
            "first_step_ms": result.first_step_ms,
            "stream_ms": statistics.median(result.streamed) if result.streamed else math.nan,
            "tflops_per_gpu": flops / (median / 1e3) / max(gpus, 1) / 1e12 if median > 0 else math.nan}  # fmt: skip


def record(pt: Point, variant: Variant, result: Measured, run: Run) -> dict[str, Any]:
    """Rank 0 turns a merged result into a row, judges it against `single`, appends it."""
    cfg = run.cfg
    key = run.ref_key(pt)
    is_ref = pt.strategy == Strategy.SINGLE and pt.variant == ""
    if is_ref and result.status == "ok" and result.output is not None:
        run.refs.setdefault(key, result.output)
    status, error, errors = result.status, result.error, dict(NOT_COMPARED)
    if cfg.check and not is_ref and status == "ok":
        ref = run.refs.get(key)
        if ref is None:
            error = "not checked: no ok `single` row to compare with"
        else:
            errors = compare(result.output, ref)
            verdict = judge(cfg.dtype, errors)
            if verdict:
                status, error = "mismatch", verdict
    errors.pop("top2_gap", None)
    flops = phase_flops(run.shape, pt.phase, cfg.batch, pt.seq_len, pt.cached_len, cfg.decode_tokens)
    ident = point(pt.strategy, pt.world_size, pt.seq_len, pt.phase, batch=cfg.batch, dtype=cfg.dtype,
                  layout=cfg.layout, variant=pt.variant, cached_len=pt.cached_len, ring_tp=variant.ring_tp,
                  padding=cfg.padding)  # fmt: skip
    floor = floor_ms(
        run.shape, run.rates, ident["cp_size"], ident["tp_size"], pt.phase, cfg.batch, pt.seq_len, pt.cached_len,
        cfg.decode_tokens,
    )  # fmt: skip
    row = {**ident, **summarize(result, flops, pt.world_size), "floor_ms": floor, "peak_mem_gib": result.peak_gib,
           **errors, "status": status, "error": error, **run.info,
           "timestamp": now()}  # fmt: skip
    run.rows.append(row)
    if cfg.out:
        append_rows(cfg.out, [row])
    err = "" if math.isnan(row["max_abs_err"]) else f" err={row['max_abs_err']:.2e}"
    label = f"{pt.strategy}{'/' + pt.variant if pt.variant else ''}"
    cached = f"P={pt.cached_len} " if pt.phase == Phase.FOLLOWUP else ""
    latency = row["latency_ms"]
    vs_floor = f"  floor {floor:.3f} ms ({latency / floor:.2f}x)" if floor > 0 and math.isfinite(latency) else ""
    if math.isfinite(row["stream_ms"]):
        vs_floor += f", streamed {row['stream_ms']:.3f} ms"
    print(f"[bench] {label:<14} {ident['cp_size']}x{ident['tp_size']} {cached}L={pt.seq_len:<7} {pt.phase:<8} "
          f"{latency:10.3f} ms{vs_floor}  {status}{err} {error}", flush=True)  # fmt: skip
    return row


# ----------------------------------------------------------------------------- driver


def run_variant(variant: Variant, points: list[Point], run: Run, reference: bool = False) -> None:
    """Load once, then every point; a peer that runs on rank 0 alone has the others wait.

    With ``reference`` the points are measured once, untimed in effect, only to fill
    ``run.refs`` (when `single` itself is not benchmarked but the check is on).
    """
    env, cfg = run.env, run.cfg
    peer = make_peer(variant, cfg, env)
    warmup, repeats = (0, 1) if reference else (cfg.warmup, cfg.repeats)
    session = Session(peer, run.recompute, warmup, repeats)
    runnable = any(not session.skip_reason(pt) for pt in points)
    if runnable and (peer.everywhere or env.rank == 0):
        session.load()
    if runnable and peer.everywhere:
        session.agree_load()
    if variant == Variant(Strategy.SINGLE):
        run.tried.update(run.ref_key(pt) for pt in points)
    for pt in points:
        with _stall_guard(pt, variant, run, warmup + repeats):
            if peer.everywhere:
                result = agree(session.measure(pt), env)
            else:
                result = session.measure(pt) if env.rank == 0 else None
                barrier(env)
        if env.rank == 0 and result is not None:
            if reference:
                if result.status == "ok" and result.output is not None:
                    run.refs[run.ref_key(pt)] = result.output
            else:
                record(pt, variant, result, run)
    session.close()
    free_memory()


def _stall_guard(pt: Point, variant: Variant, run: Run, calls: int) -> StallGuard:
    """Rank 0's guard around one point (see :mod:`fmsring.harness.watchdog`); a no-op elsewhere,
    without rates, or with ``--stall-factor 0``."""
    cfg = run.cfg
    if run.env.rank != 0 or cfg.stall_factor <= 0:
        return StallGuard(math.nan, lambda _s: None)
    cp, tp = Strategy(pt.strategy).mesh(pt.world_size, variant.ring_tp)
    predicted = predicted_s(
        run.shape, run.rates, cp, tp, pt.phase, cfg.batch, pt.seq_len, pt.cached_len, cfg.decode_tokens, calls
    )

    def stalled(budget_s: float) -> None:
        error = (f"stalled: no result after {budget_s:.0f} s, {cfg.stall_factor:g}x the predicted {predicted:.1f} s "
                 f"plus {cfg.stall_min_s:g} s; the launch stopped here (near the memory limit, check "
                 f"{ALLOC_CONF}={os.environ.get(ALLOC_CONF, '')!r})")  # fmt: skip
        record(pt, variant, Measured(status="timeout", error=error), run)
        print(f"[bench] {error}", file=sys.stderr, flush=True)
        os._exit(STALL_EXIT)

    return StallGuard(cfg.stall_factor * predicted + cfg.stall_min_s, stalled)


def _reference_pass(plan: list[tuple[Variant, list[Point]]], run: Run) -> None:
    """Compute the `single` outputs that the planned points are checked against and that no
    `single` row of this launch provides (it is not benchmarked, or resumed past)."""
    needed = dict.fromkeys(run.ref_key(p) for v, pts in plan if v != Variant(Strategy.SINGLE) for p in pts)
    missing = [k for k in needed if k not in run.tried]
    if missing:
        run.tried.update(missing)
        single = [Point(Strategy.SINGLE.value, "", 1, n, c, ph) for n, c, ph in missing]
        run_variant(Variant(Strategy.SINGLE), single, run, reference=True)


def run(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Benchmark every strategy and variant of ``cfg``; rank 0 returns (and appends) the rows, others []."""
    if int(os.environ.get("RANK", "0")) == 0:
        check_header(cfg.out)
    env = setup_dist(cfg.device, cfg.timeout_s)
    if env.rank == 0 and cfg.device == "cuda":
        print(f"[bench] {ALLOC_CONF}={os.environ.get(ALLOC_CONF, '')}", file=sys.stderr)
    try:
        link = ceilings.measure_ring_shift_gbps() if cfg.device == "cuda" else math.nan  # every rank takes part
        info = row_provenance(cfg, cfg.repeats, env.device.index or 0) if env.rank == 0 else {}
        info["link_gbps"] = link
        if env.rank == 0 and math.isfinite(link):
            kind = info["interconnect"] or "interconnect unknown"
            print(f"[bench] ring shift {link:.0f} GB/s per direction ({kind})")
        meta = meta_model(cfg)
        shape = flop_shape(meta, getattr(torch, cfg.dtype).itemsize) if meta is not None else None
        cfg = fit_rope_table(cfg, meta)
        done = broadcast(done_points(cfg.out) if cfg.resume and cfg.out and env.rank == 0 else set(), env)
        plan: list[tuple[Variant, list[Point]]] = []
        strategies = [s for s in cfg.strategies if not (s == Strategy.TP and env.world == 1)]
        strategies.sort(key=lambda s: s != Strategy.SINGLE)
        for s in strategies:
            world = 1 if s == Strategy.SINGLE else env.world
            for v in variants(s, cfg):
                if world % v.ring_tp:
                    if env.rank == 0:
                        print(f"[bench] ring variant {v.label!r}: ring_tp={v.ring_tp} does not divide {world} ranks")
                    continue
                pts = planned_points(s, world, [v.label], cfg.seq_lens, cfg.phases, cfg.cached_lens,
                                     cfg.followup_recompute)  # fmt: skip
                todo = [p for p in pts if p not in done]
                if todo:
                    plan.append((v, todo))
        recompute = recomputed(cfg.seq_lens, cfg.phases, cfg.cached_lens)
        recompute = recompute if cfg.followup_recompute else {}
        if env.rank == 0 and {Phase.DECODE, Phase.FOLLOWUP} <= set(cfg.phases) and Strategy.RING in cfg.strategies:
            print("[bench] ring keeps cache room for the longest follow-up, so its decode rows' caches (and peak "
                  "memory) include it too; run the followup phase in a launch of its own to measure decode memory",
                  file=sys.stderr)  # fmt: skip
        rates = _rates(cfg, env, meta) if plan else None
        del meta
        state = Run(cfg, env, info, shape, rates, recompute)
        # Every length runs the graphs a process's first generation at that length compiles
        # (static shapes), not the dynamic one a process reaches after decoding at another length,
        # which is slower per step (docs/performance.md): rows stay one user's first prompt.
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            for variant, points in plan:
                if variant != Variant(Strategy.SINGLE) and cfg.check:
                    _reference_pass(plan, state)
                run_variant(variant, points, state)
        return state.rows
    finally:
        if env.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


@record_errors  # an exception becomes this rank's torchrun error file, which the sweep reads
def main(argv: list[str] | None = None) -> int:
    rows = run(parse_args(argv))
    counts = Counter(r["status"] for r in rows)
    if rows and set(counts) - {"ok", "skipped"}:
        print(f"[bench] not every point succeeded: {dict(counts)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
