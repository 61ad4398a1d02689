"""Blockwise attention that also returns the log-sum-exp, so that partial
results can be merged exactly (:mod:`fmsring.merge`): one kernel choice for
every block a mode attends.
"""

from __future__ import annotations

import importlib.util

import torch

from fmsring.merge import finite_lse
from fmsring.split_kv import SplitKV, decode_splits, sm_count, split_kv

# fmsring's decode kernel is Triton's; without Triton (a CPU-only torch) decode attends as any block does.
split_kv_decode = merge_chunks = None
if importlib.util.find_spec("triton") is not None:
    from fmsring.decode_kernel import merge_chunks, split_kv_decode


def empty_partial(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial result of attending to no key: out = 0, lse = -inf (fp32), shaped like q."""
    return (
        torch.zeros(q.shape, dtype=torch.float32, device=q.device),
        torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device),
    )


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one block, returning (out, lse); lse is fp32, out
    fp32 or the input dtype (the merge promotes it). The kernel is
    :func:`select_kernel`'s choice; shapes and semantics are those of
    :func:`math_attention_with_lse`.
    """
    kernel = select_kernel(q.device.type, q.dtype, q.shape[-1], q.shape[2], causal, bias is not None)
    if kernel == "flash":
        return flash_attention_with_lse(q, k, v, scale)
    if kernel == "cudnn":
        return cudnn_attention_with_lse(q, k, v, scale, causal)
    if kernel == "efficient":
        return efficient_attention_with_lse(q, k, v, scale, causal, bias)
    if kernel == "cpu_flash":
        return cpu_flash_attention_with_lse(q, k, v, scale, causal, bias)
    return math_attention_with_lse(q, k, v, scale, causal, bias)


DECODE_ROWS = 16
FUSED_DTYPES = (torch.bfloat16, torch.float16)
ANY_FUSED_DTYPES = (torch.float32, *FUSED_DTYPES)  # some fused kernel on CPU and CUDA takes these


def select_kernel(device_type: str, dtype: torch.dtype, head_dim: int, q_rows: int, causal: bool, bias: bool) -> str:
    """Which kernel :func:`attention_with_lse` runs for a block: "cudnn", "flash", "efficient",
    "cpu_flash" or "math".

    On CUDA without a bias, a fused kernel that returns the log-sum-exp.
    Half precision: flash for a few query rows against many keys
    (decode-like blocks), cuDNN for everything else (the fastest measured
    for prefill blocks: docs/performance.md); both take GQA K/V as they
    are. float32: PyTorch's memory-efficient kernel, the only fused one
    that takes fp32 (what FMS's own SDPA runs in fp32).

    On a CPU, in fp32 or half precision, PyTorch's fused CPU kernel
    (:func:`cpu_flash_attention_with_lse`, what FMS's own SDPA runs there),
    a bias included: the math path's result without its score matrix (a
    4071-token causal block of SmolLM2-135M's heads: 0.14 s against 1.45 s
    on two cores). A block with both a causal flag and a bias (no mode makes
    one) stays on the math path, since the fused kernel cannot say which
    rows the two hide together.

    A block with a bias on CUDA (a padded batch's mask, a window's band)
    takes the memory-efficient kernel too, the only fused one that adds a
    bias and returns the log-sum-exp; with a causal flag as well it stays on
    the math path, as on a CPU.

    Otherwise -- a head dim over 128 on CUDA, float64, another device -- the
    fp32 math path, which materialises the block's scores.
    """
    if device_type == "cpu":
        return "cpu_flash" if dtype in ANY_FUSED_DTYPES and not (causal and bias) else "math"
    if device_type != "cuda" or head_dim > 128 or dtype not in ANY_FUSED_DTYPES or (causal and bias):
        return "math"
    if dtype == torch.float32 or bias:
        return "efficient"
    return "flash" if q_rows <= DECODE_ROWS and not causal else "cudnn"


def flash_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention (GQA-native, any K/V strides along the sequence) returning (out, lse)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse.view(q.shape[:-1])


def takes_flash_window(q: torch.Tensor) -> bool:
    """Whether a sliding window's straddled blocks run flash attention's own window
    (:func:`flash_window_with_lse`): CUDA, half precision, a head dim flash takes."""
    return q.is_cuda and q.dtype in FUSED_DTYPES and q.shape[-1] <= 256


def flash_window_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, left: int, right: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention through its local window (GQA-native), returning (out [b, h, Lq, d], lse
    fp32 [b, h, Lq]): query row i sees the key rows from i + Lk - Lq - ``left`` to
    i + Lk - Lq + ``right``, so a window of w keys costs w per query, never the block's
    width. Every row must see at least one key (the kernel gives a row that sees none
    lse +inf)."""
    lq, lk = q.shape[2], k.shape[2]
    res = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, lq, lk, 0.0, False, False,
        scale=scale, window_size_left=left, window_size_right=right,
    )  # fmt: skip
    return res[0].transpose(1, 2), res[1][..., :lq]


def decode_attention_with_lse(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    plan: SplitKV | None = None,
    slot_bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few query rows over the first ``kv_lens[i]`` slots of a
    preallocated cache, returning (out [b, h, Lq, d] in ``out_dtype``, lse fp32 [b, h, Lq]).

    q: [b, h, Lq, d]; caches: [b, capacity, kvh, d]; kv_lens: int32 [b] on the
    device; ``slot_bias``: an additive fp32 [b, capacity] on every query row,
    e.g. a padding mask (-inf hides a slot). Shapes never depend on how full
    the cache is, so a decode step built on this can be captured once as a
    CUDA graph and replayed. On CUDA with half-precision inputs it is
    :func:`split_kv_decode_with_lse` along ``plan`` (every layer of a step
    shares one: pass it, or it is made here); otherwise
    :func:`attention_with_lse` over the whole cache with the unused slots
    masked by the bias: fp32 math on CUDA, the fused kernel on a CPU.
    """
    plan = plan if plan is not None else decode_split_kv(kv_lens, k_cache)
    if plan is not None:
        return split_kv_decode_with_lse(q, k_cache, v_cache, scale, plan, slot_bias, out_dtype)
    b, cap = k_cache.shape[:2]
    unused = torch.arange(cap, device=q.device).unsqueeze(0) >= kv_lens.unsqueeze(1)
    bias = torch.zeros(b, cap, device=q.device) if slot_bias is None else slot_bias.float()
    bias = bias.masked_fill(unused, float("-inf")).unsqueeze(1)
    out, lse = attention_with_lse(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), scale, bias=bias)
    return out.to(out_dtype), lse


def decode_split_kv(kv_lens: torch.Tensor, k_cache: torch.Tensor) -> SplitKV | None:
    """The split-KV plan a decode step over caches like ``k_cache`` [b, capacity, kvh, d] runs,
    chunked by :func:`decode_splits`; None where the step attends as any block does instead (not
    CUDA, not half precision, a head dim over 256, or no Triton)."""
    if split_kv_decode is None or not k_cache.is_cuda:
        return None
    if k_cache.dtype not in FUSED_DTYPES or k_cache.shape[-1] > 256:
        return None
    b, cap, kvh = k_cache.shape[:3]
    return split_kv(kv_lens, decode_splits(b, kvh, cap, sm_count(k_cache.device)))


def split_kv_decode_with_lse(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    plan: SplitKV,
    slot_bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash decoding: each [b, capacity, kvh, d] cache read in the plan's
    chunks by as many programs of fmsring's decode kernel
    (:mod:`fmsring.decode_kernel`), the chunks' partials merged exactly through
    their log-sum-exp, ``slot_bias`` [b, capacity] added to every row's scores.
    Returns (out [b, h, Lq, d] in ``out_dtype``, lse fp32 [b, h, Lq]); out is a
    view of [b, Lq, h, d] memory, the layout the output projection reads, so a
    caller that takes it on in the query's dtype copies nothing
    (:func:`fmsring.ring.to_query_layout`).

    The h/kvh query heads that share a kv-head are rows of one program, so
    each chunk of K/V is read once, not once per query head. ``splits=1`` is
    the unsplit kernel.
    """
    b, h, lq, _ = q.shape
    kvh = k_cache.shape[2]
    if plan.batch != b or k_cache.shape[0] != b or h % kvh:
        raise ValueError(
            f"split-KV plan for {plan.batch} sequences does not fit queries {tuple(q.shape)} "
            f"over caches {tuple(k_cache.shape)}"
        )
    out, lse = split_kv_decode(q, k_cache, v_cache, plan.starts, plan.used, scale, slot_bias)
    out, lse = merge_chunks(out, lse, lq, out_dtype)
    return out.transpose(1, 2), lse


def efficient_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's memory-efficient fused attention, returning (out, lse fp32): fp32 blocks, and
    blocks with a bias (additive, [b or 1, Lq, Lk], never with ``causal``).

    The kernel takes no GQA. A block without the causal mask packs the
    query heads of each kv-head as rows of one head (the math path's trick;
    the bias's rows repeat once per head), so K/V are read as they are; a
    causal block, whose mask follows the row index, gets K/V expanded to
    every query head -- one block's worth, never the whole ring's. Its lse
    is padded to a multiple of 32 rows: cut. The bias is read in q's dtype,
    its key dim padded to a multiple of 16 (the kernel's alignment) with
    masked keys; a row it hides wholly comes back as the empty partial.
    """
    b, h, lq, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    op = torch.ops.aten._scaled_dot_product_efficient_attention
    mask = None
    if bias is not None:
        pad = -k.shape[2] % 16
        k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (k, v))
        mask = torch.nn.functional.pad(bias, (0, pad), value=float("-inf")).to(q.dtype)
    if g > 1 and not causal:
        if mask is not None:
            mask = mask.repeat(1, g, 1).unsqueeze(1).expand(b, kvh, -1, -1)
        out, lse = op(q.reshape(b, kvh, g * lq, d), k, v, mask, True, 0.0, False, scale=scale)[:2]
        out, lse = out.reshape(b, h, lq, d), lse[..., : g * lq].reshape(b, h, lq)
    else:
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        mask = None if mask is None else mask.unsqueeze(1).expand(b, h, -1, -1)
        out, lse = op(q, k, v, mask, True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., :lq]
    if bias is not None:
        dead = bias.isneginf().all(-1).unsqueeze(1)
        out, lse = out.masked_fill(dead.unsqueeze(-1), 0.0), lse.masked_fill(dead, float("-inf"))
    return out, lse


def cpu_flash_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU attention (flash: the scores in tiles, never the whole block's),
    returning (out in q's dtype, lse fp32).

    Shapes and semantics are :func:`math_attention_with_lse`'s: the kernel
    takes GQA K/V as they are, aligns its causal mask top-left like the math
    path, adds the bias in fp32 and computes in fp32 (half-precision inputs
    round the probabilities to their dtype before the product with V, as the
    CUDA kernels do). A block without the causal mask, whose bias (if any)
    is one row for all, packs the query heads of each kv-head as rows of one
    head (the math path's trick), so K/V are read once per kv-head, not once
    per query head: what a decode step over a long cache is bound by (half
    the time of the unpacked call over 32K slots).

    Where the kernel differs from the math path, this makes it the same:

    * a row the bias hides wholly comes back as out 0 but lse 0, which the
      merge would weigh as a real partial: its lse is set to -inf;
    * a block of no query rows or no keys kills the process (the kernel
      divides by zero): it is the empty partial, without a call;
    * it reads the last dim of q, k, v and the bias as contiguous whatever
      its stride (PyTorch's SDPA checks that before dispatching; the op
      does not): a tensor with another stride there is copied first.
    """
    b, h, lq, d = q.shape
    kvh = k.shape[1]
    if not lq or not k.shape[2]:
        return empty_partial(q)
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    mask = None if bias is None else _unit_stride(bias.float()).unsqueeze(1)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if kvh < h and not causal and (bias is None or bias.shape[-2] == 1):
        out, lse = op(q.reshape(b, kvh, h // kvh * lq, d), k, v, 0.0, False, attn_mask=mask, scale=scale)
        out, lse = out.reshape(b, h, lq, d), lse.reshape(b, h, lq)
    else:
        out, lse = op(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    if bias is not None:
        lse = lse.masked_fill(bias.isneginf().all(-1).unsqueeze(1), float("-inf"))
    return out, lse


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t, copied where its last dim is not contiguous (the fused CPU kernel reads it as if it were)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cudnn_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN fused attention returning (out in q's dtype, lse in fp32).

    cuDNN takes GQA K/V with kv-heads only, causal blocks included, and K/V
    in any strides (heads-major is what it reads fastest).
    """
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return res[0], res[1].view(q.shape[:-1])


# The fp32 scores one call of the math path holds at once: a longer block (a padded prefill's,
# whose mask sends it here) runs in query-row chunks instead of materialising all of its scores.
MATH_SCORES_BYTES = 1 << 30


def math_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one block in fp32, returning (out, lse).

    q: [b, h, Lq, d]; k, v: [b, kvh, Lk, d] with h a multiple of kvh. GQA is
    done by grouping the h/kvh query heads of each kv head into the row
    dimension, so K/V are never expanded. ``causal`` masks key j > query i
    (top-left aligned: used for a block against itself). ``bias`` is an
    additive mask [b, Lq, Lk] (or [b, 1, Lk] for every row). Rows with no
    visible key get out = 0 and lse = -inf, which the merge treats as "no
    contribution". Rows are independent, so the block runs in chunks of rows
    whose scores fit :data:`MATH_SCORES_BYTES`: exact, and memory that grows
    with Lq x Lk / chunks instead of Lq x Lk (a 32K-token padded prefill's
    block would otherwise hold over 100 GiB of scores).
    """
    b, h, lq, _ = q.shape
    rows = max(1, MATH_SCORES_BYTES // (4 * b * h * k.shape[2]))
    if lq <= rows:
        return _math_rows(q, k, v, scale, causal, bias, 0)
    parts = [
        _math_rows(q[:, :, r : r + rows], k, v, scale, causal, _bias_rows(bias, r, r + rows), r)
        for r in range(0, lq, rows)
    ]
    return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)


def _bias_rows(bias: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return bias if bias is None or bias.shape[-2] == 1 else bias[:, start:stop]


def _math_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    bias: torch.Tensor | None,
    first_row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`math_attention_with_lse` for query rows ``first_row`` onwards of the block."""
    b, h, lq, d = q.shape
    kvh, lk = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.float().reshape(b, kvh, g * lq, d)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)).mul_(scale).view(b, kvh, g, lq, lk)
    if causal:
        hidden = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(1 + first_row)
        scores.masked_fill_(hidden, float("-inf"))
    if bias is not None:
        scores.add_(bias.float().unsqueeze(1).unsqueeze(1))
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(finite_lse(lse).unsqueeze(-1)).exp_()
    out = torch.matmul(probs.view(b, kvh, g * lq, lk), v.float()).view(b, h, lq, d)
    return out, lse.view(b, h, lq)
