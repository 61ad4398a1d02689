"""Elementwise work fused by torch.compile: fmsring's merges and FMS's own
norms, gated MLPs and RoPE, without changing FMS.

FMS computes RMSNorm in several fp32 passes, RoPE as an fp32 [..., 2, 2]
product, SiLU and the gate product apart: a sizeable share of a long
prefill's time, and most of the kernels a one-token decode step launches
(docs/performance.md measures both). Compiling FMS's own
methods -- the same math, so the same results up to fp32 reassociation and
where bf16 rounding happens -- turns each into one or two kernels; the
matmuls stay cuBLAS.

FMS modules are fused by swapping their classes (as
:func:`fmsring.model.chunk_feedforward` does), so parameters and state-dict
keys stay FMS's own. Only exact FMS classes are swapped: a subclass may
compute something else.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from fms.distributed.tensorparallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from fms.modules.attention import MultiHeadAttention
from fms.modules.feedforward import GatedLinearUnit, TPGatedLinearUnit
from fms.modules.layernorm import LayerNormParameterized
from fms.modules.positions import RotaryEmbedding
from torch import nn

# Devices whose tensors take the compiled code. Elsewhere (CPU) the compiler
# costs more than it saves, so the same functions run eagerly.
FUSE_DEVICES: set[str] = {"cuda"}


def fused(fn: Callable[..., Any], dynamic: bool | None = True) -> Callable[..., Any]:
    """``fn`` compiled (torch.compile's ``dynamic``: True dynamic shapes, None
    static until a shape changes) when its first tensor argument is on one of :data:`FUSE_DEVICES`,
    eager otherwise. Inside code being compiled it is plain ``fn``, for the
    outer compilation to fuse with its neighbours. A machine where the
    compiler cannot build it (no Triton for the GPU, no C++ compiler) gets an
    error that says how to run without fusion."""
    compiled = torch.compile(fn, dynamic=dynamic)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if first.device.type not in FUSE_DEVICES:
            return fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise RuntimeError(
                f"torch.compile could not fuse {fn.__qualname__} on {first.device.type}: "
                f"{str(e).splitlines()[0]}\nTo run without fusion, call "
                f"fmsring.fusion.FUSE_DEVICES.discard({first.device.type!r}) before the first forward."
            ) from e

    return run


class FusedLayerNorm(LayerNormParameterized):
    forward = fused(LayerNormParameterized.forward)


class FusedGatedLinearUnit(GatedLinearUnit):
    forward = fused(GatedLinearUnit.forward)


class FusedTPGatedLinearUnit(TPGatedLinearUnit):
    """FMS's TP MLP: the same all-reduce around the fused local GLU (FMS calls
    ``GatedLinearUnit.forward`` by name, so a subclass alone would not fuse it)."""

    _local = staticmethod(fused(GatedLinearUnit.forward))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._local(self, copy_to_tensor_model_parallel_region(x, self.group))
        return reduce_from_tensor_model_parallel_region(out, self.group)


class FusedRotaryEmbedding(RotaryEmbedding):
    adjusted_qk = fused(RotaryEmbedding.adjusted_qk)


class FusedDecoderBlock(nn.Module):
    """Mixin for FMS decoder blocks: a layer whose attention mode says it can
    be compiled whole (``whole_layer``: fmsring's one-token decode step) runs
    as one compiled graph, so norm, RoPE, cache write, attention bookkeeping,
    the merge's packing, SiLU and residual adds fuse with each other instead
    of only within each module: a decode step is bound by bytes but pays per
    kernel, and this launches fewer (docs/performance.md). Every other call
    -- prefills, follow-ups -- runs FMS's own forward.

    Shapes: a decode step's shapes change only with the cache, and one
    compilation serves every layer (their parameters are the graph's
    inputs). The first cache capacity compiles with static shapes, its
    kernels tuned to them; after that each shape that changes compiles once
    more and stays dynamic (dynamo's automatic dynamic shapes): the capacity,
    and the split-KV chunk count once it first leaves 1. So a conversation or
    a server seeing many prompt lengths compiles at most three times, not
    once per length into dynamo's recompile limit (past which the modules
    would run one by one: slower, not wrong).
    """

    _whole_layer: Callable[..., Any]

    def forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        if getattr(kwargs.get("ring"), "whole_layer", False):
            return self._whole_layer(self, x, **kwargs)
        return super().forward(x, **kwargs)


_BLOCKS: dict[type, type] = {}


def fuse_decoder_blocks(model: nn.Module) -> nn.Module:
    """Make every block that holds one of ``model``'s attention layers a
    :class:`FusedDecoderBlock` of its own FMS class, in place; returns ``model``."""
    names = {name.rpartition(".")[0] for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    for name in names:
        block = model.get_submodule(name)
        cls = type(block)
        if isinstance(block, FusedDecoderBlock) or block is model:
            continue
        if cls not in _BLOCKS:
            whole = staticmethod(fused(cls.forward, dynamic=None))
            _BLOCKS[cls] = type(f"Fused{cls.__name__}", (FusedDecoderBlock, cls), {"_whole_layer": whole})
        block.__class__ = _BLOCKS[cls]
    return model


_SWAPS: dict[type, type] = {
    LayerNormParameterized: FusedLayerNorm,
    GatedLinearUnit: FusedGatedLinearUnit,
    TPGatedLinearUnit: FusedTPGatedLinearUnit,
    RotaryEmbedding: FusedRotaryEmbedding,
}


def fuse_elementwise(model: nn.Module) -> nn.Module:
    """Fuse the elementwise work of every FMS norm, gated MLP and RoPE in
    ``model``, in place; returns it."""
    for m in [*model.modules(), *position_encoders(model)]:
        if type(m) in _SWAPS:
            m.__class__ = _SWAPS[type(m)]
    return model


def position_encoders(model: nn.Module) -> list[Any]:
    """The distinct position encoders of ``model``'s attention layers. FMS
    shares one plain object (not a submodule) between all layers, so
    ``model.modules()`` does not reach it."""
    found = (getattr(m, "position_encoder", None) for m in model.modules())
    return list({id(enc): enc for enc in found if enc is not None}.values())
