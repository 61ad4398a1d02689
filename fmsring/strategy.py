"""RingAttentionStrategy: FMS's DistributedStrategy for context parallelism."""

from __future__ import annotations

import torch.distributed as dist
from fms.distributed.strategy import DistributedStrategy
from torch import nn

from fmsring.comm import RingComm
from fmsring.layout import LAYOUTS, ShardPlan


class RingAttentionStrategy(DistributedStrategy):
    """Replicated weights, sharded tokens.

    Every rank keeps the whole model (``_distribute_*`` leave modules as they
    are) and a share of the sequence, laid out by ``layout``; attention
    exchanges K/V around the ring of ``group``.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, layout: str = "zigzag", from_meta: bool = False):
        super().__init__(from_meta)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "RingAttentionStrategy needs an initialised torch.distributed process group: "
                "launch with torchrun and call fmsring.maybe_init_dist() (or "
                "torch.distributed.init_process_group) before building the model"
            )
        if layout not in LAYOUTS:
            raise ValueError(f"unknown ring layout {layout!r}; choose one of {LAYOUTS}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.layout = layout
        self.comm = RingComm(self.group)

    def _distribute_module(self, module: nn.Module, final_layers: bool = False) -> nn.Module:
        return module

    def _distribute_layer(self, block: nn.Module, layer: int) -> nn.Module:
        return block

    def plan(self, seq_len: int) -> ShardPlan:
        return ShardPlan.build(seq_len, self.world_size, self.layout)
