"""RingAttentionStrategy: the ring's groups and layout, shaped as an FMS DistributedStrategy.

FMS's ``get_model`` takes a strategy by name only (``distributed_strategy``
is a string there, and the instance it builds from it is its own), so
:func:`fmsring.get_model` loads the FMS model as "replicated" or "tp" and
hands this object to :class:`fmsring.LlamaRing`, which runs the ring. It
subclasses ``DistributedStrategy`` so that code written against FMS's
strategies (``distribute_module``, ``distribute_layer``) works on it.
"""

from __future__ import annotations

import torch.distributed as dist
from fms.distributed.strategy import DistributedStrategy
from torch import nn

from fmsring.comm import RingComm
from fmsring.layout import LAYOUTS, ShardPlan


class RingAttentionStrategy(DistributedStrategy):
    """Sharded tokens over the ring ``group``; weights replicated over it.

    ``comm`` is the ring's :class:`fmsring.comm.RingComm`, which the modes use
    for the ring's rank, size and exchange.

    Every rank of the ring keeps the same weights (``_distribute_*`` leave
    modules as they are) and a share of the sequence, laid out by ``layout``;
    attention exchanges K/V around the ring. With ``tp_group`` (a 2-D mesh,
    :mod:`fmsring.mesh`) the weights are also sharded over that group by FMS's
    tensor parallelism, and the ring runs on each TP rank's own heads: the
    ranks that must agree on inputs and sampling are then both groups'.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        layout: str = "zigzag",
        from_meta: bool = False,
        tp_group: dist.ProcessGroup | None = None,
    ):
        super().__init__(from_meta)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "RingAttentionStrategy needs an initialised torch.distributed process group: call "
                "fmsring.maybe_init_dist() (or torch.distributed.init_process_group) before building the model; "
                "it joins torchrun's group, or makes one of this process alone"
            )
        if layout not in LAYOUTS:
            raise ValueError(f"unknown ring layout {layout!r}; choose one of {LAYOUTS}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.layout = layout
        self.comm = RingComm(self.group)
        self.tp_group = tp_group
        self.tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1

    @property
    def model_groups(self) -> tuple[dist.ProcessGroup, ...]:
        """The groups whose ranks run one model together: the TP group (a mesh row), then the ring (a column)."""
        return (self.group,) if self.tp_size == 1 else (self.tp_group, self.group)

    def _distribute_module(self, module: nn.Module, final_layers: bool = False) -> nn.Module:
        return module

    def _distribute_layer(self, block: nn.Module, layer: int) -> nn.Module:
        return block

    def plan(self, seq_len: int) -> ShardPlan:
        return ShardPlan.build(seq_len, self.world_size, self.layout)
