"""An inductor pass for a batch-1 decode step's projections (:func:`fmsring.fusion.whole_layer_options`).

Its own module: it imports inductor, seconds that a process importing fmsring pays only once it
compiles a whole layer.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims


class OneRowMatmul(CustomGraphPass):
    """Inductor pass: a matmul of one row (a batch-1 decode step's projections) becomes a product
    and a sum over the shared dimension, in fp32 as cuBLAS accumulates. Inductor then fuses each
    projection with the elementwise work around it -- the RMSNorm before, the SiLU or residual add
    after -- where a cuBLAS call is a kernel of its own with the activations written out and read
    back between: a one-token step pays per kernel (docs/performance.md, Decode). Inductor has the
    same rewrite as a decomposition, taken only under ``coordinate_descent_tuning``, which also
    tunes every kernel at its first run in every process (seconds, and steps that move with the
    tuning); as a pass it needs no tuning, and its ``uuid`` keys the compile caches."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.find_nodes(op="call_function", target=aten.mm.default)):
            rows, weight = node.args
            if not statically_known_true(rows.meta["val"].shape[0] == 1):
                continue
            with graph.inserting_before(node):
                product = graph.call_function(aten.mul.Tensor, (
                    graph.call_function(aten.unsqueeze.default, (_to_fp32(graph, rows), 2)),
                    graph.call_function(aten.unsqueeze.default, (_to_fp32(graph, weight), 0)),
                ))  # fmt: skip
                total = graph.call_function(aten.sum.dim_IntList, (product, [1]))
                out = graph.call_function(prims.convert_element_type.default, (total, node.meta["val"].dtype))
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _to_fp32(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    return graph.call_function(prims.convert_element_type.default, (node, torch.float32))
