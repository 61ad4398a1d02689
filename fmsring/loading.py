"""``fmsring.get_model``: ``fms.models.get_model`` with ``distributed_strategy="ring"``."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import fms.models
import torch
import torch.distributed as dist
from fms.modules.attention import MultiHeadAttention
from fms.modules.tp import TPModule
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from fmsring.comm import broadcast_weights
from fmsring.layout import LAYOUTS
from fmsring.mesh import build_mesh, mesh_groups, tp_sizes
from fmsring.model import LlamaRing
from fmsring.modes.followup import FOLLOWUP_MODES
from fmsring.strategy import RingAttentionStrategy

STRATEGIES = ("ring", "replicated", None, "", "tp", "mp", "fsdp", "hsdp", "ddp")
RING_OPTIONS = (
    "ring_layout", "ring_check_inputs", "ring_cache_headroom", "ring_ffn_chunk",
    "ring_cuda_graphs", "ring_fuse", "ring_fuse_layers", "ring_followup", "ring_prefill_chunk", "ring_tp",
    "ring_mesh",
)  # fmt: skip


def get_model(
    architecture: str,
    variant: str | None = None,
    model_path: str | None = None,
    source: str | None = None,
    device_type: str = "cpu",
    data_type: str | torch.dtype | None = None,
    distributed_strategy: str | None = None,
    checkpoint_sharding: str | None = None,
    group: dist.ProcessGroup | None = None,
    ring_layout: str = "zigzag",
    ring_check_inputs: bool = True,
    ring_cache_headroom: int = 256,
    ring_ffn_chunk: int = 16384,
    ring_cuda_graphs: bool = True,
    ring_fuse: bool = True,
    ring_fuse_layers: bool = True,
    ring_followup: str = "auto",
    ring_prefill_chunk: int = 0,
    ring_tp: int = 1,
    ring_mesh: DeviceMesh | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``fms.models.get_model`` that also accepts ``distributed_strategy="ring"``.

    With ``"ring"`` the model is wrapped in :class:`LlamaRing`; its weights
    are loaded whole on every rank unless ``ring_tp`` shards them (below).
    ``"replicated"`` loads the plain, unsharded FMS model on every rank (FMS
    itself turns ``None`` into tensor parallel under torchrun). Any other
    strategy is passed to FMS unchanged. Random-init models (no
    ``model_path``) get rank 0's weights on every rank. The ``ring_*``
    options are :class:`LlamaRing`'s; an unknown one is an error (FMS would
    pass it on to the model config, where it is silently ignored).

    ``ring_tp=T`` (or a ``ring_mesh`` with dims ("cp", "tp"), see
    :mod:`fmsring.mesh`) runs ring x tensor parallel: the world is a cp x T
    mesh, FMS's ``TensorParallelStrategy`` shards the weights over each group
    of T contiguous ranks (checkpoints load sharded through FMS's loader;
    random weights: FMS's per-shard draws, identical over the ring, and TP
    rank 0's replicated ones -- embedding, head, norms -- on every rank), and
    the ring runs over cp on every TP rank's heads. ``ring_tp=1`` replicates
    the weights over the ring.
    """
    if distributed_strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed_strategy {distributed_strategy!r}; choose one of {STRATEGIES}")
    check_model_path(architecture, model_path)
    unknown = sorted(k for k in kwargs if k.startswith("ring_"))
    if unknown:
        raise ValueError(f"unknown ring option(s) {unknown}; fmsring.get_model takes {RING_OPTIONS}")
    ours = distributed_strategy in ("ring", "replicated")
    if ours and ring_layout not in LAYOUTS:
        raise ValueError(f"unknown ring_layout {ring_layout!r}; choose one of {LAYOUTS}")
    if ring_followup not in FOLLOWUP_MODES:
        raise ValueError(f"unknown ring_followup {ring_followup!r}; choose one of {FOLLOWUP_MODES}")
    if distributed_strategy != "ring" and (ring_tp != 1 or ring_mesh is not None):
        raise ValueError(f"ring_tp and ring_mesh need distributed_strategy='ring', not {distributed_strategy!r}")
    ring_group, tp_group = group, None
    if distributed_strategy == "ring" and (ring_tp != 1 or ring_mesh is not None):
        if ring_mesh is None:
            ring_mesh = build_mesh(device_type, ring_tp, group)
        elif group is not None:
            raise ValueError("ring_mesh says the groups: pass group or ring_mesh, not both")
        ring_group, tp_group = mesh_groups(ring_mesh)
        if ring_tp not in (1, dist.get_world_size(tp_group)):
            raise ValueError(
                f"ring_tp={ring_tp} but ring_mesh's tp dimension has {dist.get_world_size(tp_group)} ranks"
            )
        if dist.get_world_size(tp_group) == 1:
            tp_group = None
    strategy = (
        RingAttentionStrategy(group=ring_group, layout=ring_layout, tp_group=tp_group)
        if distributed_strategy == "ring"
        else None
    )
    # FMS treats a strategy name it does not know as replicated: every rank loads every weight.
    fms_strategy = "tp" if tp_group is not None else "replicated" if ours else distributed_strategy
    try:
        with _quiet_tp_banner(tp_group is not None):
            model = fms.models.get_model(
                architecture,
                variant,
                model_path,
                source,
                device_type,
                data_type,
                fms_strategy,
                checkpoint_sharding,
                tp_group if tp_group is not None else group,
                **kwargs,
            )
    except AssertionError as exc:  # FMS's TP checks head and width divisibility with asserts
        if tp_group is None:
            raise
        world = strategy.world_size * strategy.tp_size
        model = fms.models.get_model(architecture, variant, model_path, source, "meta", None, "replicated", **kwargs)
        raise _unshardable(model, variant or model_path or architecture, strategy.tp_size, world, exc) from exc
    if not ours:
        return model
    if dist.is_initialized() and model_path is None and architecture != "hf_pretrained":
        if tp_group is not None:  # the replicated weights (embedding, head, norms) as TP rank 0 drew them
            broadcast_weights(model, tp_group, skip=(TPModule,))
        broadcast_weights(model, ring_group)
    if strategy is None:
        return model
    return LlamaRing(
        model,
        strategy,
        check_inputs=ring_check_inputs,
        cache_headroom=ring_cache_headroom,
        ffn_chunk=ring_ffn_chunk,
        cuda_graphs=ring_cuda_graphs,
        fuse=ring_fuse,
        fuse_layers=ring_fuse_layers,
        followup=ring_followup,
        prefill_chunk=ring_prefill_chunk,
    )


def check_model_path(architecture: str, model_path: str | None) -> None:
    """Refuse a checkpoint path that is not there, saying so. FMS hands an ``hf_pretrained`` path to
    transformers, which takes a missing directory for a Hugging Face repo id and fails with "Repo id
    must be in the form ..." deep in a traceback.

    Args:
        architecture: FMS's architecture name; ``hf_pretrained`` reads a checkpoint directory.
        model_path: the checkpoint: a directory, a file, or (FMS) a directory and a glob (``dir/*.pth``).
    """
    if model_path is None:
        return
    path = Path(str(model_path).partition("*")[0]).expanduser()
    if architecture == "hf_pretrained" and not path.is_dir():
        raise FileNotFoundError(
            f"no such directory: {model_path}" if not path.exists() else f"not a directory: {model_path}"
        )
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {model_path}")


def _unshardable(model: nn.Module, name: str, tp: int, world: int, exc: AssertionError) -> ValueError:
    """FMS's tensor parallelism refuses a model it cannot shard with a bare assert; say which heads the
    model has and which ring_tp values fit. ``model`` is the unsharded one built on the meta device (no
    weights): whatever the architecture, its attention layers know the heads."""
    attn = next(m for m in model.modules() if isinstance(m, MultiHeadAttention))
    heads = f"{attn.nheads} attention heads and {attn.kvheads} kv-heads"
    fits = tp_sizes(world, attn.nheads, attn.kvheads)
    if tp in fits:  # the heads split: a width FMS shards does not
        return ValueError(
            f"ring_tp={tp}: FMS's tensor parallelism cannot split {name} over {tp} ranks ({exc}); its {heads} would split"
        )
    return ValueError(
        f"ring_tp={tp}: {name} has {heads}, which FMS's tensor parallelism cannot split over {tp} ranks ({exc}); "
        f"ring_tp values that divide both the world ({world}) and the heads: {', '.join(map(str, fits))}"
    )


@contextlib.contextmanager
def _quiet_tp_banner(quiet: bool):
    """FMS prints "using tensor parallel" on every rank when it builds a TP model: under ring_tp
    that is fmsring's choice, not news, and it would land in every rank's output. Anything
    else FMS prints is passed on."""
    if not quiet:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        rest = buf.getvalue().replace("using tensor parallel\n", "")
        if rest:
            sys.stdout.write(rest)
