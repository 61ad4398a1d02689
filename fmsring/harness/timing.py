"""How a point's calls are timed: one loop for every phase.

Every timed run is preceded by ``warmup`` untimed ones and the ranks are lined up
before each, so a repeat's time is its own and not another rank's lag. The last
run's logits are kept for the exactness check, and of a generation the first
run's first one-token step: what a user's first token after the prefill costs,
a compile or a CUDA graph's capture included. Not torch.utils.benchmark's Timer: it
times a statement in a loop of its own, where a run here must line the ranks up first
and record every decode step's span without stalling the host mid-run.

A generation's steps are timed two ways. Drained: the device idles before each step, so a step's
time includes the host's work to launch it (a generator that hands out each token before it
queues the next). Streamed: the next steps follow with the host running ahead, the device never
waiting for it, and a step's time is the interval between consecutive steps' ends (what a generator
that queues step t+1 before reading token t gets, and what gpt-fast's tokens per second measure).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from fms.modules.attention import get_attention_type
from fms.utils.generation import _make_cache_dynamic
from torch import nn

from fmsring.harness.flops import decode_steps
from fmsring.harness.ranks import DistEnv, Measured, align, sync

Span = tuple[Any, Any]


class Timed(NamedTuple):
    """What one run recorded."""

    spans: list[Span]  # the timed calls; a generation's drained one-token steps
    firsts: list[Span]  # a generation's time to first token (its prefill)
    streamed: list[Span]  # a generation's streamed steps: consecutive ends
    logits: torch.Tensor  # the last logits (a generation's, every step's)
    tokens: torch.Tensor | None  # a generation's greedy tokens


Run = Callable[["Clock"], Timed]


class Clock:
    """Marks on a timeline: CUDA events on GPU (read only after the run, so the
    host never stalls mid-run), perf_counter on CPU (where ops are synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, span: Span) -> float:
        """Elapsed milliseconds; call after the device has been synchronised."""
        start, end = span
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def repeat(run: Run, warmup: int, repeats: int, env: DistEnv, all_ranks: bool) -> Measured:
    """``warmup`` untimed then ``repeats`` timed runs; the last run's (logits, tokens) kept, and
    the first run's first step, warm-up or not: a generation's first one-token step (after its
    prefill), a one-call run's call. What a shape compiles on its first call shows there."""
    clock, spans, firsts, streamed, first_step, out = Clock(env.device), [], [], [], [], None
    for i in range(warmup + repeats):
        out = None  # the previous run's output is freed before the next one runs
        align(env, all_ranks)
        out = run(clock)
        if i == 0:
            first_step = out.spans[:1]
        if i >= warmup:
            spans += out.spans
            firsts += out.firsts
            streamed += out.streamed
    sync(env.device)
    assert out is not None
    tokens = out.logits.argmax(-1) if out.tokens is None else out.tokens
    return Measured(latencies=[clock.ms(s) for s in spans], ttfts=[clock.ms(s) for s in firsts],
                    streamed=[clock.ms(s) for s in streamed],
                    first_step_ms=clock.ms(first_step[0]) if first_step else math.nan,
                    output=(out.logits.float().cpu(), tokens.cpu()))  # fmt: skip


def one_call(call: Callable[[], torch.Tensor]) -> Run:
    """A run of one call returning last-token logits [b, V] (a prefill, a follow-up)."""

    def run(clock: Clock):
        start = clock.mark()
        logits = call()
        return Timed([(start, clock.mark())], [], [], logits, None)

    return run


def padding_for_next_step(padding: dict[str, Any]) -> dict[str, Any]:
    """A padded batch's ``mask`` and ``position_ids`` for its next one-token step, extended as
    FMS's ``generate`` extends them (nothing for an unpadded batch's empty dict)."""
    if not padding:
        return padding
    padding = get_attention_type(**padding)["update_attn_kwargs"](**padding)
    padding["position_ids"] = padding["position_ids"][:, -1:] + 1
    return padding


def greedy_decode(
    model: nn.Module, ids: torch.Tensor, steps: int, padding: dict[str, Any] | None = None, dynamic_cache: bool = False
) -> Run:
    """A run of a prefill with a cache, then ``steps`` greedy one-token steps drained and
    ``steps`` more streamed (the module's docstring), FMS's calling convention (which
    LlamaRing follows); ``padding``: a left-padded batch's ``mask`` and ``position_ids``
    (:func:`fmsring.harness.session.left_pad`), extended every step inside its timed span,
    as ``generate`` does. Logits [1 + 2 steps, b, V], tokens [b, 1 + 2 steps].

    A streamed step's interval includes choosing its token (the argmax), which a drained
    step's span leaves out; the first streamed step follows a drained one, so only the
    intervals after it are kept (``steps`` - 1).

    ``dynamic_cache``: after every call the returned FMS cache's length is marked dynamic,
    outside the timed spans, as ``generate`` marks it (a padded batch's mask FMS marks
    itself), so a compiled model compiles one step for every cache length, not one per length.
    """

    def run(clock: Clock):
        kwargs = dict(padding or {})
        start = clock.mark()
        logits, cache = model(ids, use_cache=True, last_n_tokens=1, **kwargs)
        prefill = (start, clock.mark())
        if dynamic_cache:
            _make_cache_dynamic(cache)
        sync(clock.device)
        rows = [logits[:, -1]]
        next_ids = rows[-1].argmax(-1, keepdim=True)
        tokens, spans, streamed, end = [next_ids], [], [], None
        for i in range(decode_steps(steps)):
            drained = i < steps
            start = clock.mark() if drained else None
            kwargs = padding_for_next_step(kwargs)
            logits, cache = model(next_ids, past_key_value_states=cache, use_cache=True, last_n_tokens=1, **kwargs)
            done = clock.mark()
            if drained:
                spans.append((start, done))
            elif i > steps:
                streamed.append((end, done))
            end = done
            if dynamic_cache:
                _make_cache_dynamic(cache)
            if drained:
                sync(clock.device)
            rows.append(logits[:, -1])
            next_ids = rows[-1].argmax(-1, keepdim=True)
            tokens.append(next_ids)
        return Timed(spans, [prefill], streamed, torch.stack(rows), torch.cat(tokens, dim=1))

    return run
