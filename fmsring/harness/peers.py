"""The strategies a run compares, each one :class:`Peer`: how its model is loaded, how
its prefill and follow-up are called, on which ranks it runs. Every peer runs the same
seeded network, measured in its strongest configuration.

By default the peers (``single``, ``tp``, ``torch_cp``) get what ring gets: FMS's
elementwise work fused (:func:`fmsring.fusion.fuse_elementwise`) and, on CUDA,
the fastest SDPA backend the call allows (cuDNN, then flash, then
memory-efficient, then math); a speedup over a handicapped baseline would say
nothing. FMS and PyTorch as shipped -- unfused, default backend choice -- are
the labelled extra variant ``as-shipped``. Ring calls its own kernels.
Decode goes through FMS's calling convention, which every peer follows
(:func:`fmsring.harness.timing.greedy_decode`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, ClassVar

import fms.models
import torch
from torch import nn
from torch.nn.attention import sdpa_kernel

import fmsring
from fmsring.fusion import fuse_elementwise
from fmsring.harness.ceilings import FASTEST_SDPA
from fmsring.harness.plan import Variant
from fmsring.harness.ranks import DistEnv, free_memory
from fmsring.harness.schema import Phase, Strategy
from fmsring.harness.settings import BenchConfig
from fmsring.harness.torch_cp import make_cp_mesh, torch_cp_length, torch_cp_prefill
from fmsring.ssm import has_ssm

# torch.compile modes that capture CUDA graphs (cudagraph trees), whose outputs a later replay overwrites
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def model_args(cfg: BenchConfig, device: str | None = None) -> dict[str, Any]:
    return dict(architecture=cfg.architecture, variant=cfg.variant, model_path=cfg.model_path, source=cfg.source,
                device_type=device or cfg.device, data_type=cfg.dtype, **cfg.model_kwargs)  # fmt: skip


def followup_mask(batch: int, cached_len: int, new_tokens: int, device: torch.device) -> torch.Tensor:
    """Bool [batch, T, P+T], True = attend: new token i sees all P cached tokens and new tokens 0..i."""
    mask = torch.ones(new_tokens, cached_len + new_tokens, dtype=torch.bool, device=device).tril(cached_len)
    return mask.expand(batch, -1, -1)


class Peer:
    """One variant of a strategy on this rank: load it, then call it. Adding a strategy is one
    subclass (and its :class:`~fmsring.harness.schema.Strategy` member, which holds its mesh)."""

    strategy: ClassVar[Strategy]
    everywhere: ClassVar[bool] = True  # runs on every rank; False: rank 0 alone while the others wait
    sharded: ClassVar[bool] = False  # FMS's tensor parallel: the weights need copying from the whole model

    def __init__(self, variant: Variant, cfg: BenchConfig, env: DistEnv):
        self.variant, self.cfg, self.env = variant, cfg, env
        self.model: nn.Module | None = None

    @property
    def cached(self) -> bool:
        """Has a KV cache, so it has decode and follow-up points."""
        return self.strategy.cached

    def mesh(self, world: int) -> tuple[int, int]:
        return self.strategy.mesh(world, self.variant.ring_tp)

    def unavailable(self, phase: Phase) -> str:
        """Why this peer cannot run ``phase`` on this device ("" when it can)."""
        if phase == Phase.FOLLOWUP and self._fms_restarts_ssm:
            return "FMS's Mamba2 layers restart from a zero state on a multi-token input with a cache (ibm-fms 1.13.1)"
        graphs = self.variant.compile_mode in CUDA_GRAPH_MODES and self.env.device.type == "cuda"
        if graphs and phase in (Phase.DECODE, Phase.FOLLOWUP):
            return (f"FMS's cache grows by concatenation at every call, so the CUDA graphs of compile mode "
                    f"{self.variant.compile_mode!r} overwrite the cache the next call reads (ibm-fms 1.13.1); "
                    f"compile the peers with 'default' to time FMS compiled with a cache")  # fmt: skip
        return ""

    @functools.cached_property
    def _fms_restarts_ssm(self) -> bool:
        """Random weights of a model with Mamba2 layers (decided once, on a meta model: asked per point)."""
        if self.cfg.model_path is not None:
            return False
        return has_ssm(fms.models.get_model(**model_args(self.cfg, "meta"), distributed_strategy="none"))

    def load(self) -> None:
        """Build the model; a compiled variant's is then compiled as FMS's scripts/inference.py
        compiles it: after ``eval()``, its calls made without grad (``Session.measure``). The
        compile is lazy: each shape's first call pays for it, which ``first_step_ms`` shows."""
        torch.manual_seed(self.cfg.seed)
        self.model = self._build().eval()
        if self.variant.compile_mode:
            self.model.compile(mode=self.variant.compile_mode)

    def _build(self) -> nn.Module:
        model = fms.models.get_model(**model_args(self.cfg), distributed_strategy="tp" if self.sharded else "none")
        seed_weights(model, self.cfg, self.env, self.sharded)
        return fuse_elementwise(model) if self.variant.tuned else model

    def context(self) -> contextlib.AbstractContextManager:
        """Around a peer's calls: a tuned peer's on CUDA with every SDPA backend allowed, fastest
        first; a compiled one's with dynamo's recompile limit raised to its accumulated one.

        Each point compiles the static shapes of its length (``bench.run`` turns automatic
        dynamic shapes off), so a launch of a few lengths passes dynamo's limit of 8 per model,
        past which it would run the model eagerly and time that as ``compiled``: past the
        raised limit the point fails instead.
        """
        out = contextlib.ExitStack()
        if self.variant.tuned and self.env.device.type == "cuda":
            out.enter_context(sdpa_kernel(FASTEST_SDPA, set_priority=True))
        if self.variant.compile_mode:
            limit = torch._dynamo.config.accumulated_recompile_limit
            out.enter_context(torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True))
        return out

    def timed_length(self, seq_len: int) -> int:
        """The prompt length a prefill of ``seq_len`` tokens actually runs at."""
        return seq_len

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """One prefill returning the last token's logits [batch, vocab] on every rank."""
        return self.model(ids, last_n_tokens=1)[:, -1]

    def cached_prefill(self, ids: torch.Tensor) -> Any:
        """Prefill with a cache; the cache (FMS's list of per-layer (K, V), or ring's RingCache)."""
        _, cache = self.model(ids, use_cache=True, last_n_tokens=1)
        return cache

    def followup(self, ids: torch.Tensor, cache: Any, cached_len: int) -> torch.Tensor:
        """One follow-up forward of new tokens on a ``cached_len``-token cache; last logits [b, V].

        FMS's store op concatenates (the given cache is untouched), but its cached
        multi-token SDPA path is causal aligned top-left -- new token i would see only
        cached keys 0..i -- so the FMS peers get an explicit mask (:func:`followup_mask`)
        and position ids P..P+T-1.
        """
        batch, new = ids.shape
        pos = torch.arange(cached_len, cached_len + new, device=ids.device).expand(batch, -1)
        mask = followup_mask(batch, cached_len, new, ids.device)
        logits, _ = self.model(
            ids, position_ids=pos, past_key_value_states=cache, use_cache=True, mask=mask, last_n_tokens=1
        )
        return logits[:, -1]


class Single(Peer):
    strategy = Strategy.SINGLE
    everywhere = False


class TensorParallel(Peer):
    strategy = Strategy.TP
    sharded = True


class TorchCP(Peer):
    strategy = Strategy.TORCH_CP
    _mesh: ClassVar[Any] = None  # one per process: device meshes are built from the process group once

    def unavailable(self, phase: Phase) -> str:
        return "" if self.env.device.type == "cuda" else "torch_cp needs CUDA SDPA (flash/efficient/cudnn)"

    def load(self) -> None:
        if TorchCP._mesh is None:
            TorchCP._mesh = make_cp_mesh(self.env)
        super().load()

    def timed_length(self, seq_len: int) -> int:
        return torch_cp_length(seq_len, self.env.world)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return torch_cp_prefill(self.model, ids, TorchCP._mesh)


class Ring(Peer):
    strategy = Strategy.RING

    def _build(self) -> nn.Module:
        cfg = self.cfg
        model = fmsring.get_model(**model_args(cfg), distributed_strategy="ring", ring_layout=cfg.layout,
                                  ring_check_inputs=False, **self.variant.ring_kwargs)  # fmt: skip
        seed_weights(model.model, cfg, self.env, sharded=self.variant.ring_tp > 1)
        return model

    def unavailable(self, phase: Phase) -> str:
        return ""  # fmsring scans a follow-up's Mamba2 layers from the cached state

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # ring calls its own kernels

    def followup(self, ids: torch.Tensor, cache: Any, cached_len: int) -> torch.Tensor:
        """Ring masks by global position itself and writes into its preallocated cache slots,
        so the cache it was given stays a valid P-token cache."""
        return self.model(ids, past_key_value_states=cache, use_cache=True, last_n_tokens=1)[0][:, -1]


PEERS: dict[str, type[Peer]] = {cls.strategy: cls for cls in (Single, TensorParallel, TorchCP, Ring)}


def make_peer(variant: Variant, cfg: BenchConfig, env: DistEnv) -> Peer:
    return PEERS[variant.strategy](variant, cfg, env)


def seed_weights(model: nn.Module, cfg: BenchConfig, env: DistEnv, sharded: bool) -> None:
    """The run's random weights (none with a checkpoint): drawn from the seed, or for a TP-sharded
    model with the check on, the whole model's draw sharded by FMS (:func:`copy_full_weights`)."""
    if cfg.model_path is not None:
        return
    if sharded and cfg.check:
        copy_full_weights(model, cfg, env)
    else:
        draw_weights(model, cfg.seed)


def draw_weights(model: nn.Module, seed: int) -> None:
    """Every parameter drawn afresh from ``seed``, the same in every peer whatever FMS drew.

    FMS 1.13.1's random init leaves some parameters as uninitialised memory (Mamba2's
    ``A_log``, ``dt_bias``, ``D``, conv and projections; gpt-oss's norms and expert biases),
    which made Bamba's and gpt-oss's logits NaN. Matrices get N(0, 1/fan_in), norm scales,
    ``D`` and ``dt_bias`` 1, ``A_log`` FMS's own log(1..heads), biases and sinks 0.
    """
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.device not in gens:
                gens[p.device] = torch.Generator(p.device).manual_seed(seed)
            gen = gens[p.device]
            if leaf == "A_log":
                p.copy_(torch.arange(1, p.numel() + 1, device=p.device).log().view_as(p))
            elif p.dim() > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
            else:
                p.fill_(1.0 if leaf in ("weight", "D", "dt_bias") else 0.0)


def copy_full_weights(tp_model: nn.Module, cfg: BenchConfig, env: DistEnv) -> None:
    """Give a TP-sharded model (tp, or ring with ring_tp) the unsharded model's random
    weights, sharded by FMS's own loader.

    Each TP shard drawn on its own would be a different network, and the exactness
    check meaningless.
    Without the check (a model too large to build whole on one GPU) the shards
    keep their own draws: the same shapes, the same time.
    """
    from fms.utils import serialization

    full = fms.models.get_model(**model_args(cfg), distributed_strategy="none")
    draw_weights(full, cfg.seed)
    state = dict(full.state_dict())
    del full
    serialization.load_state_dict_into_model(model=tp_model, state_dict=state, architecture=cfg.architecture,
                                             source="fms", dtype=getattr(torch, cfg.dtype), distributed_strategy="tp",
                                             initial_device=env.device, rank=env.rank)  # fmt: skip
    del state
    free_memory()
