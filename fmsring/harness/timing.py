"""How a call is timed: prefill, greedy decode, and a follow-up prompt on a cache.

Every timed call is preceded by ``warmup`` untimed ones and the ranks are
lined up before each, so a repeat's time is its own and not another rank's
lag. The last call's logits are kept for the exactness check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from fms.modules.attention import get_attention_type
from torch import nn

from fmsring.harness.ranks import DistEnv, Measured, align, sync


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

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, start: Any, end: Any) -> float:
        """Elapsed milliseconds; call after the device has been synchronised."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def _timed(call: Callable[[], torch.Tensor], warmup: int, repeats: int, env: DistEnv, all_ranks: bool) -> Measured:
    """``warmup`` untimed then ``repeats`` timed calls of ``call`` -> last-token logits [b, V]."""
    clock, spans, logits = Clock(env.device), [], None
    for i in range(warmup + repeats):
        logits = None  # the previous call's output is freed before the next one runs
        align(env, all_ranks)
        start = clock.mark()
        logits = call()
        end = clock.mark()
        if i >= warmup:
            spans.append((start, end))
    sync(env.device)
    assert logits is not None
    out = (logits.float().cpu(), logits.argmax(-1).cpu())
    return Measured(latencies=[clock.ms(a, b) for a, b in spans], output=out)


def time_prefill(
    fn: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    warmup: int,
    repeats: int,
    env: DistEnv,
    all_ranks: bool,
) -> Measured:
    """A prompt's prefill, last token's logits only."""
    return _timed(lambda: fn(ids), warmup, repeats, env, all_ranks)


def time_followup(
    fn: Callable[[torch.Tensor, Any, int], torch.Tensor],
    ids: torch.Tensor,
    cache: Any,
    cached_len: int,
    warmup: int,
    repeats: int,
    env: DistEnv,
    all_ranks: bool,
) -> Measured:
    """A follow-up of ``ids`` on the same ``cached_len``-token cache, every repeat.

    ``fn`` must leave ``cache`` a valid cache of those tokens (see
    :func:`fmsring.harness.peers.followup_fn`), so each repeat measures the same call.
    """
    return _timed(lambda: fn(ids, cache, cached_len), warmup, repeats, env, all_ranks)


def next_step_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A padded batch's ``mask`` and ``position_ids`` for the next one-token step, as FMS's
    ``generate`` extends them (its attention op's update, then the next position)."""
    if not kwargs:
        return kwargs
    kwargs = get_attention_type(**kwargs)["update_attn_kwargs"](**kwargs)
    kwargs["position_ids"] = kwargs["position_ids"][:, -1:] + 1
    return kwargs


def greedy_decode(
    model: nn.Module, ids: torch.Tensor, steps: int, clock: Clock, padding: dict[str, Any] | None = None
) -> tuple[list, list, torch.Tensor, torch.Tensor]:
    """Prefill with a cache, then ``steps`` greedy one-token steps, FMS's calling convention
    (which LlamaRing follows); ``padding``: a left-padded batch's ``mask`` and ``position_ids``
    (:func:`fmsring.harness.session.left_pad`), extended every step inside its timed span, as
    ``generate`` does. Returns (prefill span, step spans, logits [1+steps, b, V], tokens).

    The device is drained after every step, as a generator streaming tokens must,
    so a step's time includes its launch overhead instead of hiding it behind the
    previous step's (or the prefill's) GPU work.
    """
    kwargs = dict(padding or {})
    start = clock.mark()
    logits, cache = model(ids, use_cache=True, last_n_tokens=1, **kwargs)
    prefill_span = (start, clock.mark())
    clock.sync()
    rows = [logits[:, -1]]
    next_ids = rows[-1].argmax(-1, keepdim=True)
    tokens, spans = [next_ids], []
    for _ in range(steps):
        start = clock.mark()
        kwargs = next_step_kwargs(kwargs)
        logits, cache = model(next_ids, past_key_value_states=cache, use_cache=True, last_n_tokens=1, **kwargs)
        spans.append((start, clock.mark()))
        clock.sync()
        rows.append(logits[:, -1])
        next_ids = rows[-1].argmax(-1, keepdim=True)
        tokens.append(next_ids)
    return [prefill_span], spans, torch.stack(rows), torch.cat(tokens, dim=1)


def time_decode(
    model: nn.Module,
    ids: torch.Tensor,
    steps: int,
    warmup: int,
    repeats: int,
    env: DistEnv,
    all_ranks: bool,
    padding: dict[str, Any] | None = None,
) -> Measured:
    """Per-token step times of every timed run (flattened) plus each run's cached-prefill time."""
    clock, step_spans, ttfts, out = Clock(env.device), [], [], None
    for i in range(warmup + repeats):
        out = None
        align(env, all_ranks)
        prefill, spans, logits, tokens = greedy_decode(model, ids, steps, clock, padding)
        out = (logits, tokens)
        if i >= warmup:
            ttfts += prefill
            step_spans += spans
    sync(env.device)
    assert out is not None
    return Measured(
        latencies=[clock.ms(a, b) for a, b in step_spans],
        ttfts=[clock.ms(a, b) for a, b in ttfts],
        output=(out[0].float().cpu(), out[1].cpu()),
    )
