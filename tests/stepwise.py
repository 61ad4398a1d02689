"""The two loops the exactness tests share: greedy steps beside a reference, and a prompt fed in
pieces on one kept cache. Each returns the errors; the asserts stay with the tests. And how many
graphs dynamo holds for a ring's decoder block, which the tests of layers compiled whole bound."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list


@torch.no_grad()
def greedy_step_errors(
    ring: nn.Module, ref: nn.Module, want: torch.Tensor, ref_cache, cache, n_new: int
) -> list[float]:
    """``n_new`` one-token steps of ``ring`` (on ``cache``) and ``ref`` (on ``ref_cache``), both fed
    the reference's greedy token from its logits ``want``: each step's largest logit error."""
    errs = []
    for _ in range(n_new):
        nxt = want[:, -1:].argmax(-1)
        got, cache = ring(nxt, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
        want, ref_cache = ref(nxt, past_key_value_states=ref_cache, use_cache=True)
        errs.append((got[:, -1] - want[:, -1]).abs().max().item())
    return errs


@torch.no_grad()
def piece_errors(
    make_ring: Callable[..., nn.Module], ids: torch.Tensor, cuts: list[int], want: torch.Tensor, modes: dict
) -> dict[str, float]:
    """For each ``modes`` entry (name -> ring options): a ring made with those options, fed ``ids``
    in pieces ending at ``cuts`` on one kept cache (or, for options with ``ring_prefill_chunk``,
    whole: the chunks are its own), against ``want``, the reference's logits of the whole."""
    errs = {}
    for name, options in modes.items():
        ring = make_ring(**options)
        if "ring_prefill_chunk" in options:
            errs[name] = (ring(ids) - want).abs().max().item()
            continue
        got, cache, start = [], None, 0
        for stop in [*cuts, ids.shape[1]]:
            step, cache = ring(ids[:, start:stop], past_key_value_states=cache, use_cache=True)
            got.append(step)
            start = stop
        errs[name] = (torch.cat(got, dim=1) - want).abs().max().item()
    return errs


def graphs(fn: Callable) -> int:
    """How many graphs dynamo holds for ``fn``'s code (one code object, whatever module calls it)."""
    return len(_debug_get_cache_entry_list(fn.__code__))


def block_graphs(ring: nn.Module) -> int:
    """How many graphs dynamo holds for the FMS decoder block class of ``ring``'s layers (its own
    forward, which a layer compiled whole traces: one code object for every layer)."""
    layer = ring.model.base_model.layers[0]
    fms_block = next(c for c in type(layer).__mro__ if c.__module__.startswith("fms."))
    return graphs(fms_block.forward)
