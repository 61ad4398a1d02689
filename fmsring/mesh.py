"""The two-dimensional device mesh: context parallel ("cp") x tensor parallel ("tp").

One mesh of W = cp x tp ranks gives the model capacity of tensor parallelism
(each rank holds 1/tp of the layer weights, sharded by FMS's own TP) and the
context capacity of the ring (each rank holds 1/cp of the tokens). Ranks of
one TP group are contiguous, so TP -- two all-reduces per layer, on the
critical path -- stays inside a node, and the ring -- one K/V shift per
block, hidden under compute -- crosses nodes. The same layout as Meta's
CP-across-nodes x TP-within-node (arXiv 2411.01783).
"""

from __future__ import annotations

import os
import warnings

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("cp", "tp")


def build_mesh(device_type: str, tp: int, group: dist.ProcessGroup | None = None) -> DeviceMesh:
    """The (cp, tp) mesh over every rank of the default group, ``tp`` contiguous ranks per TP group.

    Raised on every rank alike: a ``tp`` that does not divide the world, or a
    ``group`` other than the whole world (a mesh over part of the ranks must
    be built by the caller, on every rank, and passed as ``ring_mesh``).
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"ring_tp must be a positive integer, got {tp!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ring_tp needs an initialised torch.distributed process group: launch with torchrun "
            "and call fmsring.maybe_init_dist() before building the model"
        )
    if group is not None and dist.get_world_size(group) != dist.get_world_size():
        raise ValueError(
            "ring_tp > 1 with a group over part of the ranks: build a DeviceMesh with dims "
            f"{MESH_DIMS} over those ranks on every rank and pass it as ring_mesh"
        )
    world = dist.get_world_size()
    if world % tp:
        fits = ", ".join(str(t) for t in range(1, world + 1) if world % t == 0)
        raise ValueError(
            f"ring_tp={tp} does not divide the world size {world} (the mesh is cp x tp = world); "
            f"ring_tp values that do: {fits}"
        )
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node % tp:
        warnings.warn(
            f"ring_tp={tp} does not divide the {per_node} ranks per node: TP groups cross nodes, and "
            "their two all-reduces per layer go over the network",
            stacklevel=3,
        )
    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=MESH_DIMS)


def tp_sizes(world: int, nheads: int, kvheads: int) -> list[int]:
    """The ring_tp values that divide the world and that FMS's tensor parallelism can split these
    heads over: the query heads evenly, the kv-heads evenly or each one replicated over whole groups."""
    return [
        t
        for t in range(1, world + 1)
        if world % t == 0 and nheads % t == 0 and (kvheads % t == 0 if kvheads >= t else t % kvheads == 0)
    ]


def mesh_groups(mesh: DeviceMesh) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(cp group, tp group) of this rank; the mesh must be 2-D with dims named ("cp", "tp")."""
    if not isinstance(mesh, DeviceMesh) or tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        names = getattr(mesh, "mesh_dim_names", None)
        raise ValueError(
            f"ring_mesh must be a DeviceMesh with dims named {MESH_DIMS}, got {type(mesh).__name__} {names}"
        )
    return mesh.get_group("cp"), mesh.get_group("tp")
