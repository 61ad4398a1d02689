"""How a point's calls are timed: one loop for every phase.

Every timed run is preceded by ``warmup`` untimed ones and the ranks are lined up
before each, so a repeat's time is its own and not another rank's lag. The last
run's logits are kept for the exactness check, and of a generation the first
run's first one-token step: what a user's first token after the prefill costs,
a compile or a CUDA graph's capture included. Not torch.utils.benchmark's Timer: it
times a statement in a loop of its own, where a run here must line the ranks up first
and record every decode step's span without stalling the host mid-run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from fms.modules.attention import get_attention_type
from fms.utils.generation import _make_cache_dynamic
from torch import nn

from fmsring.harness.ranks import DistEnv, Measured, align, sync

Span = tuple[Any, Any]
# a run: (timed spans, time-to-first-token spans, last logits, greedy tokens or None)
Run = Callable[["Clock"], tuple[list[Span], list[Span], torch.Tensor, torch.Tensor | None]]


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
    of a generation (a run with a first token) the first run's first step, warm-up or not."""
    clock, spans, firsts, first_step, out = Clock(env.device), [], [], [], None
    for i in range(warmup + repeats):
        out = None  # the previous run's output is freed before the next one runs
        align(env, all_ranks)
        timed, first, *out = run(clock)
        if i == 0 and first:  # a generation: it has a first token, then steps
            first_step = timed[:1]
        if i >= warmup:
            spans += timed
            firsts += first
    sync(env.device)
    assert out is not None
    logits, tokens = out
    tokens = logits.argmax(-1) if tokens is None else tokens
    return Measured(latencies=[clock.ms(s) for s in spans], ttfts=[clock.ms(s) for s in firsts],
                    first_step_ms=clock.ms(first_step[0]) if first_step else math.nan,
                    output=(logits.float().cpu(), tokens.cpu()))  # fmt: skip


def one_call(call: Callable[[], torch.Tensor]) -> Run:
    """A run of one call returning last-token logits [b, V] (a prefill, a follow-up)."""

    def run(clock: Clock):
        start = clock.mark()
        logits = call()
        return [(start, clock.mark())], [], logits, None

    return run


def greedy_decode(
    model: nn.Module, ids: torch.Tensor, steps: int, padding: dict[str, Any] | None = None, dynamic_cache: bool = False
) -> Run:
    """A run of a prefill with a cache, then ``steps`` greedy one-token steps, FMS's calling
    convention (which LlamaRing follows); ``padding``: a left-padded batch's ``mask`` and
    ``position_ids`` (:func:`fmsring.harness.session.left_pad`), extended every step inside
    its timed span, as ``generate`` does. Logits [1+steps, b, V], tokens [b, 1+steps].

    The device is drained after every step, as a generator streaming tokens must,
    so a step's time includes its launch overhead instead of hiding it behind the
    previous step's (or the prefill's) GPU work.

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
        tokens, spans = [next_ids], []
        for _ in range(steps):
            start = clock.mark()
            if kwargs:  # a padded batch's mask and positions, extended as FMS's generate extends them
                kwargs = get_attention_type(**kwargs)["update_attn_kwargs"](**kwargs)
                kwargs["position_ids"] = kwargs["position_ids"][:, -1:] + 1
            logits, cache = model(next_ids, past_key_value_states=cache, use_cache=True, last_n_tokens=1, **kwargs)
            spans.append((start, clock.mark()))
            if dynamic_cache:
                _make_cache_dynamic(cache)
            sync(clock.device)
            rows.append(logits[:, -1])
            next_ids = rows[-1].argmax(-1, keepdim=True)
            tokens.append(next_ids)
        return spans, [prefill], torch.stack(rows), torch.cat(tokens, dim=1)

    return run
