"""One loaded peer and the points measured on it: which prompt each point gets, why a
point cannot run, and the follow-up phase's cached prompt, built once per cached
length and reused by every follow-up on it.

Any exception in a point becomes that point's status, never the run's end.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fmsring.harness.peers import Peer
from fmsring.harness.ranks import Measured, agree, classify, free_memory
from fmsring.harness.schema import Phase, Point, Strategy
from fmsring.harness.timing import greedy_decode, one_call, repeat


def make_input_ids(seed: int, batch: int, seq_len: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Random prompt drawn on the CPU from a seeded generator: identical on every rank and strategy."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + seq_len)
    return torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)


def followup_ids(seed: int, batch: int, cached_len: int, new: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The T new tokens of a follow-up on a P-token prompt, drawn apart from every prompt's stream."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + cached_len) * 1_000_033 + new + (1 << 40))
    return torch.randint(0, vocab, (batch, new), generator=gen).to(device)


def left_pad(ids: torch.Tensor, fraction: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ids`` [b, n] as b prompts of unequal length, padded as FMS's ``generate`` users pad them:
    sequence i keeps its last ``n - round(fraction * n * i / (b - 1))`` tokens, left-padded back
    to n by FMS's ``pad_input_ids``, which also gives the ``mask`` and ``position_ids`` to pass."""
    from fms.utils.generation import pad_input_ids

    b, n = ids.shape
    prompts = [ids[i, round(fraction * n * i / (b - 1)) :] for i in range(b)]
    padded, kwargs = pad_input_ids(prompts, min_pad_length=n)
    return padded, dict(kwargs)


class Session:
    """The points of one peer, measured on one model load (on the ranks that run it)."""

    def __init__(self, peer: Peer, recompute: dict[int, tuple[int, int]], warmup: int, repeats: int):
        self.peer, self.cfg, self.env = peer, peer.cfg, peer.env
        self.recompute, self.warmup, self.repeats = recompute, warmup, repeats
        self.load_error: Measured | None = None
        self.cache: Any = None
        self.cache_len: int | None = None
        self.cache_error: Measured | None = None

    def load(self) -> None:
        """Load the model; a failure becomes every point's status."""
        try:
            self.peer.load()
        except Exception as exc:  # noqa: BLE001
            free_memory()
            self.load_error = classify(exc, "loading: ")

    def agree_load(self) -> None:
        """If any rank failed to load, every rank reports that failure for every point."""
        merged = agree(self.load_error or Measured(), self.env)
        self.load_error = None if merged.status == "ok" else merged

    def close(self) -> None:
        self.cache = self.peer.model = None
        free_memory()

    def skip_reason(self, pt: Point) -> str:
        """Why a point cannot run at all (decided identically on every rank), or ''."""
        if pt.phase != Phase.PREFILL and not self.peer.cached:
            return f"{self.peer.strategy} has no KV cache"
        return self.peer.unavailable(pt.phase)

    def _prompt(self, pt: Point, vocab: int) -> torch.Tensor:
        """A prefill's prompt; a ring recompute of P+T is the P-token prompt and its T follow-up tokens."""
        cfg, device = self.cfg, self.env.device
        if pt.phase == Phase.PREFILL and self.peer.strategy == Strategy.RING and pt.seq_len in self.recompute:
            cached, new = self.recompute[pt.seq_len]
            return torch.cat([make_input_ids(cfg.seed, cfg.batch, cached, vocab, device),
                              followup_ids(cfg.seed, cfg.batch, cached, new, vocab, device)], dim=1)  # fmt: skip
        return make_input_ids(cfg.seed, cfg.batch, pt.seq_len, vocab, device)

    def _cached(self, cached_len: int, vocab: int) -> Measured | None:
        """Make the cache hold the ``cached_len``-token prompt (untimed); the failure, if any rank's."""
        if self.cache_len == cached_len:
            return self.cache_error
        self.cache = None
        free_memory()
        self.cache_len, self.cache_error = cached_len, None
        try:
            ids = make_input_ids(self.cfg.seed, self.cfg.batch, cached_len, vocab, self.env.device)
            self.cache = self.peer.cached_prefill(ids)
            status = Measured()
        except Exception as exc:  # noqa: BLE001
            status = classify(exc, f"prefill of the {cached_len}-token cache: ")
        if self.peer.everywhere:
            status = agree(status, self.env)
        if status.status != "ok":
            self.cache, self.cache_error = None, dataclasses.replace(status, output=None)
        return self.cache_error

    @torch.no_grad()
    def measure(self, pt: Point) -> Measured:
        """Run one point on this rank; any exception becomes a status instead of ending the run."""
        skip = self.skip_reason(pt)
        if skip:
            return Measured(status="skipped", error=skip)
        if self.load_error is not None:
            return dataclasses.replace(self.load_error)
        peer, env, cfg = self.peer, self.env, self.cfg
        vocab = peer.model.config.src_vocab_size  # FMS's models and LlamaRing alike
        with peer.context():
            if pt.phase == Phase.FOLLOWUP:  # the cached prompt is built before the peak is reset: it is not timed
                failed = self._cached(pt.cached_len, vocab)
                if failed is not None:
                    return dataclasses.replace(failed)
            elif self.cache is not None:
                self.cache, self.cache_len = None, None  # a prefill or decode needs the memory
            free_memory()
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(env.device)
            try:
                if pt.phase == Phase.FOLLOWUP:
                    ids = followup_ids(cfg.seed, cfg.batch, pt.cached_len, pt.seq_len, vocab, env.device)
                    run = one_call(lambda: peer.followup(ids, self.cache, pt.cached_len))
                elif pt.phase == Phase.PREFILL:
                    ids = self._prompt(pt, vocab)
                    run = one_call(lambda: peer.prefill(ids))
                else:
                    ids, padding = self._prompt(pt, vocab), {}
                    if cfg.padding:
                        ids, padding = left_pad(ids, cfg.padding)
                    run = greedy_decode(peer.model, ids, cfg.decode_tokens, padding, bool(peer.variant.compile_mode))
                result = repeat(run, self.warmup, self.repeats, env, peer.everywhere)
                timed = peer.timed_length(pt.seq_len) if pt.phase == Phase.PREFILL else pt.seq_len
                if timed != pt.seq_len:  # an ok row that says what it timed
                    result.error = f"timed at {timed} tokens, padded on the right (torch_cp.torch_cp_length)"
            except Exception as exc:  # noqa: BLE001 - one point's failure must not end the run
                result = classify(exc)
        free_memory()
        if env.device.type == "cuda":
            result.peak_gib = torch.cuda.max_memory_allocated(env.device) / 2**30
        return result
