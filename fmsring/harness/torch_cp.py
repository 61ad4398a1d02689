"""PyTorch's own context parallelism (``torch.distributed.tensor.experimental.context_parallel``)
around the plain FMS model: the ``torch_cp`` peer's mesh and prefill."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_PLAIN_SDPA = F.scaled_dot_product_attention  # taken before any CP context can patch it


def make_cp_mesh(env: Any) -> Any:
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
