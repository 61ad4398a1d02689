"""Multi-turn generation that keeps a ring model's sharded KV cache between turns.

Without a kept cache every turn of a chat re-runs the whole conversation so
far. ``Conversation`` keeps the :class:`~fmsring.cache.RingCache` that FMS's
``generate`` leaves behind, still sharded over the ranks, and feeds each new
turn as one cached follow-up step: the previous reply's last token (generated
but never fed to the model) plus the turn's tokens. A turn then costs its own
tokens and its reply, not the history.

Batch 1 only: the turns of a batch differ in length, so they would need
padding masks that grow with every turn, which the follow-up step does not
take. Run one ``Conversation`` per sequence.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fmsring.cache import RingCache
from fmsring.comm import sync_rng
from fmsring.generation import generate
from fmsring.model import LlamaRing


@dataclass(frozen=True)
class Turn:
    """One turn's reply and how long it took.

    tokens: the reply's token ids, 1-D; ttft_s: from the start of generation
    to the first reply token (the turn's follow-up prefill and one sampling
    step); token_s: the latency of each later token.
    """

    tokens: torch.Tensor
    ttft_s: float
    token_s: tuple[float, ...]

    @property
    def per_token_s(self) -> float:
        """Median latency of the tokens after the first; nan for a one-token reply."""
        return statistics.median(self.token_s) if self.token_s else float("nan")


class Conversation:
    """A conversation with a ring model whose sharded KV cache lives between turns.

    Every rank makes the same calls with the same token ids, as for the model
    itself. Greedy by default; ``do_sample`` samples with FMS's ``temperature``
    and ``top_k``, every rank drawing rank 0's tokens.
    """

    def __init__(self, model: LlamaRing, do_sample: bool = False, temperature: float = 1.0, top_k: int = 10):
        if not isinstance(model, LlamaRing):
            raise TypeError(
                f"Conversation keeps a ring model's sharded cache; got {type(model).__name__}. "
                "Load the model with fmsring.get_model(..., distributed_strategy='ring')"
            )
        self.model = model
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_k = top_k
        self.device = next(model.parameters()).device
        # the whole conversation's token ids: every turn and every reply, in order
        self.tokens = torch.empty(0, dtype=torch.long, device=self.device)
        self._cache: RingCache | None = None

    def say(self, ids: torch.Tensor | Sequence[int], max_new_tokens: int, eos_token_id: int | None = None) -> Turn:
        """Append a turn and generate the reply.

        The reply's tokens, its last one included, are the conversation's: the
        next turn's step feeds that last token (generated, never fed) before its own.

        Args:
            ids: the turn's token ids, 1-D or [1, n]. The first turn is the prompt
                (at least one token); a later one may be empty, which continues the
                previous reply.
            max_new_tokens: the most tokens the reply has.
            eos_token_id: the reply stops at this token (an end-of-turn token), which
                it then ends with; None: it has ``max_new_tokens`` tokens.
        """
        ids = self._turn_ids(ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if self.tokens.numel() and self._cache is None:
            raise RuntimeError("an earlier turn failed part way and its cache is lost; start a new Conversation")
        cache, self._cache = self._cache, None  # consumed in place by the turn: lost if it fails
        step = ids if cache is None else torch.cat([self.tokens[-1:], ids])
        kept: dict[str, RingCache] = {}

        def resume(i: int, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
            if i == 0:  # generate starts without a cache; the follow-up step extends ours
                kwargs["past_key_value_states"] = cache
            return input_ids, kwargs

        def keep(pos: int, logits: torch.Tensor, next_val: torch.Tensor, kwargs: dict[str, Any]):
            kept["cache"] = kwargs["past_key_value_states"]
            return next_val, kwargs

        if self.do_sample:  # ranks may have drawn differently between turns; a follow-up has no prefill to align them
            sync_rng(self.model.strategy.model_groups, self.device)
        with torch.no_grad():
            out, times = generate(
                self.model,
                step.unsqueeze(0),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                do_sample=self.do_sample,
                temperature=self.temperature,
                top_k=self.top_k,
                use_cache=True,
                timing="per-token",
                prepare_model_inputs_hook=resume,
                post_iteration_hook=keep,
                extra_kwargs={"last_n_tokens": 1},
            )
        reply = out[0, step.numel() :]
        self._cache = kept["cache"]
        self.tokens = torch.cat([self.tokens, ids, reply])
        return Turn(tokens=reply, ttft_s=times[0], token_s=tuple(times[1:]))

    def _turn_ids(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            ids = list(ids)
            if not all(isinstance(i, int) for i in ids):
                raise TypeError(f"a turn's token ids must be ints; got {ids!r}")
            ids = torch.tensor(ids, dtype=torch.long)
        ids = ids.to(self.device)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(
                    f"Conversation runs one sequence (batch 1); got a batch of {ids.shape[0]}. "
                    "Padded batches are not supported: run one Conversation per sequence"
                )
            ids = ids[0]
        if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"a turn is 1-D or [1, n] integer token ids; got {ids.dtype} {tuple(ids.shape)}")
        if not self.tokens.numel() and not ids.numel():
            raise ValueError("the first turn (the prompt) needs at least one token")
        return ids.long()
