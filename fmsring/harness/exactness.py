"""How a strategy's logits are compared with the one-GPU model's; the verdict is
:func:`fmsring.harness.schema.judge`'s, by the schema's per-dtype tolerances."""

from __future__ import annotations

from typing import Any

import torch

NAN = float("nan")
NOT_COMPARED = {"max_abs_err": NAN, "rel_err": NAN, "ref_norm": NAN, "same_next_token": ""}


def compare(
    output: tuple[torch.Tensor, torch.Tensor] | None, ref: tuple[torch.Tensor, torch.Tensor] | None
) -> dict[str, Any]:
    """max |a-b|, ||a-b|| / ||b||, ||b|| over the compared logits, and whether the greedy tokens agree.

    Outputs are (logits, tokens): [b, V] and [b] for a prefill or follow-up, or
    [1+steps, b, V] and [b, 1+steps] for a greedy decode. Once the greedy tokens
    differ, later steps run on different inputs and say nothing about exactness,
    so a decode is compared up to and including its first differing step; the
    reference's top-2 gap there (``top2_gap``) tells a near-tie from an error.
    """
    if output is None or ref is None or output[0].shape != ref[0].shape:
        return dict(NOT_COMPARED)
    logits, ref_logits = output[0].double(), ref[0].double()
    tokens, ref_tokens = output[1], ref[1]
    if logits.dim() == 2:  # one step: [b, V], tokens [b]
        logits, ref_logits = logits.unsqueeze(0), ref_logits.unsqueeze(0)
        tokens, ref_tokens = tokens.unsqueeze(1), ref_tokens.unsqueeze(1)
    differs = (tokens != ref_tokens).any(dim=0)  # per step
    first = int(differs.to(torch.int64).argmax()) if bool(differs.any()) else None
    steps = logits.shape[0] if first is None else first + 1
    diff = logits[:steps] - ref_logits[:steps]
    norm = ref_logits[:steps].norm().item()
    out: dict[str, Any] = {
        "max_abs_err": diff.abs().max().item(),
        "rel_err": diff.norm().item() / norm if norm > 0 else NAN,
        "ref_norm": norm,
        "same_next_token": first is None,
    }
    if first is not None:
        wrong = tokens[:, first] != ref_tokens[:, first]
        top2 = ref_logits[first][wrong].topk(2, dim=-1).values
        out["top2_gap"] = (top2[:, 0] - top2[:, 1]).max().item()
    return out
