"""How each strategy's model is loaded and called, so every strategy runs the same
seeded network and is measured in its strongest configuration.

By default the peers (``single``, ``tp``, ``torch_cp``) get what ring gets: FMS's
elementwise work fused (:func:`fmsring.fusion.fuse_elementwise`) and, on CUDA,
the fastest SDPA backend the call allows (cuDNN, then flash, then
memory-efficient, then math); a speedup over a handicapped baseline would say
nothing. FMS and PyTorch as shipped -- unfused, default backend choice -- are
the labelled extra variant ``as-shipped``. Ring calls its own kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fms.models
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

import fmsring
from fmsring.fusion import fuse_elementwise
from fmsring.harness.ceilings import FASTEST_SDPA
from fmsring.harness.ranks import DistEnv, free_memory
from fmsring.harness.schema import AS_SHIPPED, ring_tp_of, ring_variant_label

if TYPE_CHECKING:
    from fmsring.harness.bench import BenchConfig

_PLAIN_SDPA = F.scaled_dot_product_attention  # taken before any CP context can patch it
FOLLOWUP_MARGIN = 64  # ring cache slots kept free beyond the longest follow-up and the decode steps


@dataclass(frozen=True)
class Variant:
    """One configuration of a strategy: ``label`` is its ``variant`` column."""

    strategy: str
    label: str = ""
    ring_kwargs: dict[str, Any] = field(default_factory=dict)  # ring: fmsring.get_model ring_* options
    tuned: bool = True  # peers: fused elementwise work and the fastest SDPA backend

    @property
    def ring_tp(self) -> int:
        """Ranks each ring replica's weights are sharded over (1 for the peers)."""
        return ring_tp_of(self.ring_kwargs)


def variants(strategy: str, cfg: BenchConfig) -> list[Variant]:
    """The variants of ``strategy`` a run measures, in order.

    Ring: one per ``cfg.ring_variants`` entry, each with ``cfg.ring_kwargs`` merged
    in. With the followup phase ring's cache keeps room for the longest follow-up
    and the decode steps beyond the prompt (unless a variant sets
    ``ring_cache_headroom``), so a follow-up writes into the preallocated slots and
    leaves the cached prompt valid for the next repeat.
    """
    if strategy != "ring":
        shipped = [Variant(strategy, AS_SHIPPED, tuned=False)] if cfg.as_shipped else []
        return [Variant(strategy), *shipped]
    headroom = {}
    if "followup" in cfg.phases:
        headroom = {"ring_cache_headroom": max(256, max(cfg.seq_lens) + cfg.decode_tokens + FOLLOWUP_MARGIN)}
    out = []
    for name, kwargs in cfg.ring_variants.items():
        clash = sorted(set(kwargs) & set(cfg.ring_kwargs))
        if clash:
            raise ValueError(f"ring variant {name!r} and --ring-kwargs both set {clash}")
        merged = {**headroom, **cfg.ring_kwargs, **kwargs}
        out.append(Variant("ring", ring_variant_label(name, cfg.ring_kwargs), merged))
    return out


def model_args(cfg: BenchConfig, device: str | None = None) -> dict[str, Any]:
    return dict(
        architecture=cfg.architecture,
        variant=cfg.variant,
        model_path=cfg.model_path,
        source=cfg.source,
        device_type=device or cfg.device,
        data_type=cfg.dtype,
        **cfg.model_kwargs,
    )


def load_model(variant: Variant, cfg: BenchConfig, env: DistEnv) -> nn.Module:
    """The model for one variant, with the same seeded weights as every other.

    "none" (any name FMS does not know) keeps FMS from switching to TP when world > 1.
    """
    torch.manual_seed(cfg.seed)
    if variant.strategy == "ring":
        model = fmsring.get_model(
            **model_args(cfg),
            distributed_strategy="ring",
            ring_layout=cfg.layout,
            ring_check_inputs=False,
            **variant.ring_kwargs,
        )
        if variant.ring_tp > 1 and cfg.model_path is None and cfg.check:
            _copy_full_weights(model.model, cfg, env)
    elif variant.strategy == "tp":
        model = fms.models.get_model(**model_args(cfg), distributed_strategy="tp")
        if cfg.model_path is None and cfg.check:
            _copy_full_weights(model, cfg, env)
    else:
        model = fms.models.get_model(**model_args(cfg), distributed_strategy="none")
    if variant.strategy != "ring" and variant.tuned:
        fuse_elementwise(model)
    return model.eval()


def _copy_full_weights(tp_model: nn.Module, cfg: BenchConfig, env: DistEnv) -> None:
    """Give a TP-sharded model (tp, or ring with ring_tp) the unsharded model's random
    weights, sharded by FMS's own loader.

    FMS initialises each TP shard with its own random draw, so without this TP
    would run a different network and the exactness check would be meaningless.
    Without the check (a model too large to build whole on one GPU) the shards
    keep their own draws: the same shapes, the same time.
    """
    from fms.utils import serialization

    torch.manual_seed(cfg.seed)
    full = fms.models.get_model(**model_args(cfg), distributed_strategy="none")
    state = dict(full.state_dict())
    del full
    serialization.load_state_dict_into_model(
        model=tp_model,
        state_dict=state,
        architecture=cfg.architecture,
        source="fms",
        dtype=getattr(torch, cfg.dtype),
        distributed_strategy="tp",
        initial_device=env.device,
        rank=env.rank,
    )
    del state
    free_memory()


def forward_context(variant: Variant, device: torch.device) -> contextlib.AbstractContextManager:
    """Around a tuned peer's calls on CUDA: every SDPA backend allowed, fastest first."""
    if variant.strategy == "ring" or not variant.tuned or device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(FASTEST_SDPA, set_priority=True)


# ----------------------------------------------------------------------------- calls


def prefill_fn(strategy: str, model: nn.Module, mesh: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """One prefill returning the last token's logits [batch, vocab] on every rank."""
    if strategy == "torch_cp":
        return lambda ids: torch_cp_prefill(model, ids, mesh)
    return lambda ids: model(ids, last_n_tokens=1)[:, -1]


def cached_prefill(model: nn.Module, ids: torch.Tensor) -> Any:
    """Prefill with a cache; the cache (FMS's list of per-layer (K, V), or ring's RingCache)."""
    _, cache = model(ids, use_cache=True, last_n_tokens=1)
    return cache


def followup_mask(batch: int, cached_len: int, new_tokens: int, device: torch.device) -> torch.Tensor:
    """Bool [batch, T, P+T], True = attend: new token i sees all P cached tokens and new tokens 0..i."""
    mask = torch.ones(new_tokens, cached_len + new_tokens, dtype=torch.bool, device=device).tril(cached_len)
    return mask.expand(batch, -1, -1)


def followup_fn(strategy: str, model: nn.Module) -> Callable[[torch.Tensor, Any, int], torch.Tensor]:
    """One follow-up forward of new tokens on a cache of ``cached_len`` tokens; last logits [b, V].

    Ring masks by global position itself and writes into its preallocated cache
    slots, so the cache it was given stays a valid P-token cache. FMS's store op
    concatenates (the given cache is untouched), but its cached multi-token SDPA
    path is causal aligned top-left -- new token i would see only cached keys
    0..i -- so single and tp get an explicit mask (:func:`followup_mask`) and
    position ids P..P+T-1.
    """
    if strategy == "ring":
        return lambda ids, cache, _p: model(ids, past_key_value_states=cache, use_cache=True, last_n_tokens=1)[0][:, -1]

    def fms_followup(ids: torch.Tensor, cache: Any, cached_len: int) -> torch.Tensor:
        batch, new = ids.shape
        pos = torch.arange(cached_len, cached_len + new, device=ids.device).expand(batch, -1)
        mask = followup_mask(batch, cached_len, new, ids.device)
        logits, _ = model(
            ids, position_ids=pos, past_key_value_states=cache, use_cache=True, mask=mask, last_n_tokens=1
        )
        return logits[:, -1]

    return fms_followup


# ----------------------------------------------------------------------------- torch context parallel


def make_cp_mesh(env: DistEnv) -> Any:
    """A 1-D mesh over all ranks for torch_cp, with the all-gather K/V rotation (no all-to-all)."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        set_rotate_method("allgather")
    except ImportError:
        pass
    return init_device_mesh(env.device.type, (env.world,))


# torch's context_parallel cuts the sequence into 2 x world load-balancing chunks; a chunk
# that is not a multiple of this many tokens failed with a shape mismatch between SDPA's
# padded outputs (7000 tokens on 4 GPUs: chunks of 875, "size of tensor a (896) must
# match the size of tensor b (880)"). Prompts are padded up to it.
CP_CHUNK_ALIGN = 128


def torch_cp_length(seq_len: int, world: int) -> int:
    """The length torch_cp runs a ``seq_len``-token prompt at: the next multiple of 2 x world x
    :data:`CP_CHUNK_ALIGN`."""
    unit = 2 * world * CP_CHUNK_ALIGN
    return -(-seq_len // unit) * unit


def torch_cp_prefill(model: nn.Module, ids: torch.Tensor, mesh: Any) -> torch.Tensor:
    """PyTorch's context_parallel around the plain FMS model's ``base_model``, then the
    head on the prompt's last token, which one rank holds; a sum all-reduce gives it to all.

    position_ids travel as a CP buffer, so each rank's RoPE angles and its share
    of the last token follow CP's (load-balanced) token order whatever it is. The
    prompt is padded on the right to :func:`torch_cp_length`: attention is causal, so
    the padding changes no logit of a real token, and it costs its share of the time.
    """
    from torch.distributed.tensor.experimental import context_parallel

    batch, seq_len = ids.shape
    padded = torch_cp_length(seq_len, mesh.size())
    x = torch.nn.functional.pad(ids, (0, padded - seq_len))
    pos = torch.arange(padded, device=ids.device).repeat(batch, 1)
    restore_plain_sdpa()
    try:
        with context_parallel(mesh, buffers=[x, pos], buffer_seq_dims=[1, 1], no_restore_buffers={x, pos}):
            if F.scaled_dot_product_attention is _PLAIN_SDPA:
                raise RuntimeError(
                    "context_parallel did not patch F.scaled_dot_product_attention: ranks would attend locally"
                )
            hidden, _ = model.base_model(x, pos)
    finally:
        restore_plain_sdpa()
    is_last = pos[0] == seq_len - 1
    where = is_last.to(torch.int64).argmax().view(1)
    logits = model.head(hidden.index_select(1, where))[:, 0] * is_last.any().to(hidden.dtype)
    dist.all_reduce(logits, group=mesh.get_group())
    return logits


def restore_plain_sdpa() -> None:
    """Undo a CP patch that an exception left behind (torch 2.11's context_parallel has no
    ``finally``): it would send every later strategy's attention through CP, and stop the
    next context from patching at all."""
    if F.scaled_dot_product_attention is not _PLAIN_SDPA:
        F.scaled_dot_product_attention = _PLAIN_SDPA
