"""When a strategy's logits count as the one-GPU model's: per-dtype tolerances, the
comparison of two outputs, and the verdict. Only :func:`compare` needs torch (imported
there): the sweep and the analysis judge rows without it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

NOT_COMPARED = {"max_abs_err": math.nan, "rel_err": math.nan, "ref_norm": math.nan, "same_next_token": ""}


@dataclass(frozen=True)
class Tolerance:
    """The largest relative error of the compared logits, ||a - b|| / ||b||, that still
    counts as the same computation as the one-GPU model in this dtype."""

    rel_err: float
    reason: str


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(1e-4, "ranks only reorder fp32 sums (block-wise softmax merged through the log-sum-exp, "
                         "sharded matmuls): ~1e-6; 1e-4 leaves room for long prompts, not for a wrong block"),
    "bfloat16": Tolerance(2e-2, "ring and the one-GPU model round activations at the same places; each bf16 "
                          "rounding is 2^-9 relative, and measured errors stay several times below"),
    "float16": Tolerance(2e-2, "as bfloat16: the same rounding places, with a finer (2^-11) rounding"),
}  # fmt: skip
"""Per-dtype tolerances, and why. A greedy-token disagreement counts as a mismatch
only when the reference's top-2 logit gap exceeds twice the max abs error: below
that it is a near-tie that either answer rounds to, not a wrong computation."""


def judge(dtype: str, errors: dict[str, Any]) -> str:
    """Why a compared row does not match the one-GPU model ("" when it does).

    ``errors`` holds ``max_abs_err``, ``rel_err``, ``ref_norm`` and, when the
    greedy tokens differ, ``top2_gap`` (the reference's top-1 minus top-2 logit
    where they first differ). A zero or infinite reference, or non-finite
    errors, never pass: there is nothing a relative error could be judged by.
    A NaN ``ref_norm`` means unknown (rows written before the column existed).
    """
    tol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    abs_err, rel, norm = (float(errors.get(k, math.nan)) for k in ("max_abs_err", "rel_err", "ref_norm"))
    if norm <= 0 or math.isinf(norm):
        return f"reference logits degenerate (norm {norm:.3g}): exactness cannot be judged"
    if not (math.isfinite(abs_err) and math.isfinite(rel)):
        return "non-finite logits"
    problems = []
    if rel > tol.rel_err:
        problems.append(f"rel_err {rel:.3g} > {tol.rel_err:g} ({dtype}; max abs {abs_err:.3g}, ref norm {norm:.3g})")
    gap = errors.get("top2_gap")
    if gap is not None and math.isfinite(gap) and gap > 2 * abs_err:
        problems.append(f"greedy token differs where the reference's top-2 gap {gap:.3g} > 2 x max abs err")
    return "; ".join(problems)


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
    import torch

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
        "rel_err": diff.norm().item() / norm if norm > 0 else math.nan,
        "ref_norm": norm,
        "same_next_token": first is None,
    }
    if first is not None:
        wrong = tokens[:, first] != ref_tokens[:, first]
        top2 = ref_logits[first][wrong].topk(2, dim=-1).values
        out["top2_gap"] = (top2[:, 0] - top2[:, 1]).max().item()
    return out
