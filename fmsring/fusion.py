"""Elementwise work fused by torch.compile: fmsring's merges and FMS's own
norms, gated MLPs and RoPE, without changing FMS.

FMS computes RMSNorm in several fp32 passes, RoPE as an fp32 [..., 2, 2]
product, SiLU and the gate product apart: a sizeable share of a long
prefill's time, and most of the kernels a one-token decode step launches
(docs/performance.md measures both). Compiling FMS's own
methods -- the same math, so the same results up to fp32 reassociation and
where bf16 rounding happens -- turns each into one or two kernels; the
matmuls stay cuBLAS.

FMS modules are changed by swapping their classes (as FSDP2's
``fully_shard`` does), so parameters and state-dict keys stay FMS's own:
elementwise fusion swaps exact FMS classes only (a subclass may compute
something else); whole-layer fusion and feed-forward chunking put a mixin in
front of the module's own class (:func:`swap_in_mixin`).
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
from fms.modules.feedforward import FeedForwardBlock, GatedLinearUnit, TPGatedLinearUnit
from fms.modules.layernorm import LayerNormParameterized
from fms.modules.positions import RotaryEmbedding
from fms.modules.ssm import SSM
from torch import nn

# Devices whose tensors take the compiled code. Elsewhere (CPU) the compiler
# costs more than it saves, so the same functions run eagerly.
FUSE_DEVICES: set[str] = {"cuda"}


def fused(
    fn: Callable[..., Any], dynamic: bool | None = True, options: dict | None = None, any_rows: bool = False
) -> Callable[..., Any]:
    """``fn`` compiled (torch.compile's ``dynamic``: True dynamic shapes, None
    static until a shape changes; inductor's ``options``) when its first
    tensor argument is on one of :data:`FUSE_DEVICES`, eager otherwise.
    ``any_rows``: every size of the first tensor argument but its last is
    unbacked, so one graph serves any number of rows, one included, where
    dynamic shapes specialise a size of 1 and compile a second graph at a
    decode step's first call -- time a second process pays again, to load it.
    Inside code being compiled it is plain ``fn``, for the outer
    compilation to fuse with its neighbours. A machine where the
    compiler cannot build it (no Triton for the GPU, no C++ compiler) gets an
    error that says how to run without fusion.

    The compiled function is made at its first call on such a device, not here:
    ``torch.compile`` imports the compiler stack, seconds that every process
    importing fmsring would pay, on CPU for nothing."""
    compiled = None

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if first.device.type not in FUSE_DEVICES:
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=dynamic, options=options)
        if any_rows:  # on the tensor itself (a view's base would still specialise); the marks stay with it
            for dim in range(first.ndim - 1):
                torch._dynamo.decorators.mark_unbacked(first, dim)
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
    """FMS's norm, one graph for a prompt's rows and a step's one row: the model's final norm runs
    outside the whole-layer graph, at both."""

    forward = fused(LayerNormParameterized.forward, any_rows=True)


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


# Inductor's options for a whole compiled layer. Combo kernels: the kernels of one layer that
# share no data but run one after the other -- the query's RoPE, the key's RoPE and cache write,
# the value's cache write -- become one launch, where inductor's own fusion joins only kernels
# that read the same buffers: a one-token step pays per kernel (docs/performance.md, Decode).
WHOLE_LAYER = {"combo_kernels": True}


class FusedDecoderBlock(nn.Module):
    """Mixin for FMS decoder blocks: a layer whose attention mode says it can
    be compiled whole (``whole_layer``: fmsring's one-token decode step, a
    short follow-up on one rank) runs as one compiled graph, so norm, RoPE,
    cache write, attention bookkeeping, the merge's packing, SiLU and residual
    adds fuse with each other instead of only within each module: such a step
    is bound by bytes or by launches, not FLOPs, and pays per kernel, and this
    launches fewer (docs/performance.md). Every other call -- prefills, longer
    follow-ups -- runs FMS's own forward.

    Shapes: a decode step's shapes change only with the cache, and one
    compilation serves every layer (their parameters are the graph's
    inputs). The first cache capacity compiles with static shapes, its
    kernels tuned to them; after that each shape that changes compiles once
    more and stays dynamic (dynamo's automatic dynamic shapes): the capacity,
    and the split-KV chunk count once it first leaves 1. So a conversation or
    a server seeing many prompt lengths compiles at most three times, not
    once per length into dynamo's recompile limit (past which the modules
    would run one by one: slower, not wrong). A short follow-up's graphs are
    bounded the same way, at five (:func:`fmsring.modes.followup.compiles_whole`):
    eight with the decode step's, dynamo's default limit.
    """

    _whole_layer: Callable[..., Any]

    def forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        if getattr(kwargs.get("ring"), "whole_layer", False):
            return self._whole_layer(self, x, **kwargs)
        return super().forward(x, **kwargs)


class FusedMambaBlock(FusedDecoderBlock):
    """:class:`FusedDecoderBlock` for a block holding a Mamba2 layer (Bamba's): FMS's block adds each
    step's length to its Mamba2 cache's ``seqlen_offset``, a Python int that a compiled graph
    guards on, so every step would compile anew. The compiled layer runs the block without its
    cache bookkeeping (``use_cache=False``: the layer still advances its states in place), and the
    bookkeeping follows here, as FMS's block does it."""

    def forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        whole = getattr(kwargs.get("ring"), "whole_layer", False)
        if not (whole and kwargs.get("use_cache")):
            return super().forward(x, **kwargs)
        out = self._whole_layer(self, x, **{**kwargs, "use_cache": False})
        unit = kwargs["past_key_value_state"]
        unit.seqlen_offset += x.shape[1]
        unit.has_previous_state = True
        return out, unit


_MIXED: dict[tuple[type, type], type] = {}


def swap_in_mixin(
    module: nn.Module, mixin: type, prefix: str, attrs: Callable[[type], dict[str, Any]] = lambda cls: {}
) -> None:
    """Make ``module`` an instance of ``mixin`` in front of its own class (named ``prefix`` + its
    name, with class attributes ``attrs(its class)``): one subclass per pair, made once and reused."""
    cls = type(module)
    if isinstance(module, mixin):
        return
    if (mixin, cls) not in _MIXED:
        _MIXED[mixin, cls] = type(prefix + cls.__name__, (mixin, cls), attrs(cls))
    module.__class__ = _MIXED[mixin, cls]


def fuse_decoder_blocks(model: nn.Module) -> nn.Module:
    """Make every block that holds one of ``model``'s attention layers a :class:`FusedDecoderBlock`
    of its own FMS class, and every one that holds a Mamba2 layer a :class:`FusedMambaBlock`, in
    place; returns ``model``."""
    mixins = {name.rpartition(".")[0]: FusedMambaBlock if isinstance(m, SSM) else FusedDecoderBlock
              for name, m in model.named_modules() if isinstance(m, (MultiHeadAttention, SSM))}  # fmt: skip
    for name, mixin in mixins.items():
        block = model.get_submodule(name)
        if block is not model:
            whole = lambda cls: {"_whole_layer": staticmethod(fused(cls.forward, dynamic=None, options=WHOLE_LAYER))}  # noqa: E731
            swap_in_mixin(block, mixin, "Fused", whole)
    return model


class ChunkedFeedForward(nn.Module):
    """Mixin for FMS feed-forward modules: run the sequence in chunks of
    ``ffn_chunk`` tokens, so the MLP's wide intermediate activations do not
    grow with the prompt. Exact: the MLP is per token."""

    ffn_chunk: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] <= self.ffn_chunk:
            return super().forward(x)
        out = torch.empty_like(x)
        for start in range(0, x.shape[1], self.ffn_chunk):
            stop = start + self.ffn_chunk
            out[:, start:stop] = super().forward(x[:, start:stop])
        return out


def chunk_feedforward(model: nn.Module, chunk: int) -> None:
    """Make every FMS feed-forward module of ``model`` a :class:`ChunkedFeedForward` of ``chunk`` tokens."""
    for m in model.modules():
        if isinstance(m, (GatedLinearUnit, FeedForwardBlock)):
            swap_in_mixin(m, ChunkedFeedForward, "Chunked")
            m.ffn_chunk = chunk


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
