"""fmsring's own split-KV decode attention: a Triton kernel for a few query rows against a long cache.

Why a kernel of our own: a decode step reads its cache shard once, so attention
should run at the copy bandwidth. Flash's varlen kernel, fed the shard as a
batch of chunks, does not (docs/performance.md): its tile is 128 query rows,
of which a GQA kv-head's decode step fills 4, and every chunk must be a
sequence of its own. Here one program reads one chunk of one kv-head's cache
for every query row that shares it (GQA packed: the K/V bytes are read once),
keeps a 16-row tile, and writes that chunk's (out, lse); a second kernel
(:func:`merge_chunks`) combines the chunks exactly, as :func:`fmsring.merge.merge_split`
does, in one launch where the compiled merge took two, and writes the result in
the dtype and layout its reader takes (the output projection's, at world 1).

The chunks are whatever the caller's plan says -- where each starts in its
sequence's cache and how many slots it uses -- so they follow the cache's fill,
not its capacity, and every shape is fixed by the capacity and the chunk
count: the call can be captured in a CUDA graph and replayed as the cache grows.

Registered as the custom ops ``fmsring::split_kv_decode`` and ``fmsring::merge_chunks`` so
a compiled decoder layer calls them as they are (inductor neither traces nor re-tunes them).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from fmsring import split_kv as plans

# The launch configuration (and fmsring.split_kv.TILE_SLOTS, the tile of cache slots, which the
# split-KV plans cut chunks in), tuned per shape by scripts/decode_kernel_sweep.py.
NUM_WARPS = 4
NUM_STAGES = 3


@contextlib.contextmanager
def _launching_on(t: torch.Tensor) -> Iterator[None]:
    """``t``'s device current while a kernel launches, and Triton's disk cache where inductor keeps its own.

    Triton compiles a kernel into ``TRITON_CACHE_DIR``, which inductor sets for the
    whole process (where it is unset) when it first builds a kernel of its own in
    this process. A run that compiles the decoder layers does that before the first
    step launches these kernels; a run that loads the layers from inductor's cache
    builds none, so these kernels looked in Triton's default dir instead and
    compiled again, in a second run's first step (docs/performance.md, The first
    step). Setting the dir as inductor would keeps one home for every run. Off
    CUDA (the Triton interpreter on CPU) nothing compiles.
    """
    if not t.is_cuda:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir  # here, not at import: it imports inductor

    os.environ.setdefault("TRITON_CACHE_DIR", triton_cache_dir(t.device.index))
    with torch.cuda.device(t.device):
        yield


@triton.jit
def _split_kv_decode_kernel(
    Q, K, V, Starts, Used, Bias, Out, Lse,
    scale_log2, batch, kv_heads, rows, q_len, head_dim,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_bias_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    seq_head = tl.program_id(1)
    b = seq_head // kv_heads
    kv_head = seq_head % kv_heads
    splits = tl.num_programs(0)
    start = tl.load(Starts + b * splits + chunk)
    used = tl.load(Used + b * splits + chunk)

    # row r: query head kv_head * (rows // q_len) + r // q_len, token r % q_len
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = (r < rows)[:, None] & (d < head_dim)[None, :]
    q_head = kv_head * (rows // q_len) + r // q_len
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + (r % q_len)[:, None] * stride_ql + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok, other=0.0)

    n = tl.arange(0, BLOCK_N)
    k_ptrs = K + b.to(tl.int64) * stride_kb + kv_head * stride_kh + (start + n)[:, None].to(tl.int64) * stride_kn
    v_ptrs = V + b.to(tl.int64) * stride_vb + kv_head * stride_vh + (start + n)[:, None].to(tl.int64) * stride_vn
    bias_ptrs = Bias + b.to(tl.int64) * stride_bias_b + start + n
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, in log2 units (exp2 is the fast one)
    l = tl.zeros([BLOCK_M], tl.float32)  # noqa: E741 - flash's name for the running sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for lo in range(0, used, BLOCK_N):  # the pointers advance a tile at a time: 64-bit, whatever the shard's length
        valid = lo + n < used
        slot_ok = valid[:, None] & (d < head_dim)[None, :]
        k = tl.load(k_ptrs + d[None, :], mask=slot_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        if HAS_BIAS:  # a padding mask, additive per slot, natural log: -inf hides a slot
            s += tl.load(bias_ptrs, mask=valid, other=0.0)[None, :] * 1.4426950408889634
            bias_ptrs += BLOCK_N
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # every slot so far hidden: nothing to rescale
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l = l * alpha + tl.sum(p, 1)  # noqa: E741
        v = tl.load(v_ptrs + d[None, :], mask=slot_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    # a chunk with no slot to see (none used, or all hidden): out 0, lse -inf ("no contribution" to the merge)
    seen = tl.where(l > 0, l, 1.0)
    out = acc / seen[:, None]
    lse = tl.where(l > 0, (m + tl.log2(seen)) * 0.6931471805599453, float("-inf"))  # back to natural log
    row0 = ((chunk * batch + b) * kv_heads + kv_head) * rows
    tl.store(Out + (row0 + r)[:, None].to(tl.int64) * head_dim + d[None, :], out, mask=row_ok)
    tl.store(Lse + row0 + r, lse, mask=r < rows)


@torch.library.custom_op("fmsring::split_kv_decode", mutates_args=())
def split_kv_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    used: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's partial attention: q [b, h, Lq, d] over caches [b, capacity, kvh, d] (half
    precision, the head dim contiguous), chunk c of sequence i being ``used[i*S + c]`` slots from
    slot ``starts[i*S + c]`` (S chunks per sequence: ``used.numel() // b``), plus ``bias``
    [b, capacity] fp32 on every query row where given (a padding mask: -inf hides a slot).
    Returns fp32 (out [S, b, kvh, h/kvh*Lq, d], lse [S, b, kvh, h/kvh*Lq]), a kv-head's rows in
    (query head, token) order; a chunk with no slot to see gives out 0 and lse -inf."""
    if not q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1:
        raise ValueError("split_kv_decode reads the head dim of q and the caches as contiguous")
    if bias is not None and (bias.shape != k_cache.shape[:2] or bias.dtype != torch.float32 or bias.stride(-1) != 1):
        raise ValueError(f"a decode bias is fp32 [batch, capacity] = {tuple(k_cache.shape[:2])}, contiguous per row")
    b, h, lq, d = q.shape
    kvh = k_cache.shape[2]
    rows = h // kvh * lq
    out, lse = _empty_partials(q, k_cache, used)
    with _launching_on(q):
        _split_kv_decode_kernel[(used.numel() // b, b * kvh)](
            q, k_cache, v_cache, starts, used, used if bias is None else bias, out, lse,
            scale * math.log2(math.e), b, kvh, rows, lq, d,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            0 if bias is None else bias.stride(0),
            BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=plans.TILE_SLOTS, BLOCK_D=max(16, triton.next_power_of_2(d)),
            HAS_BIAS=bias is not None,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )  # fmt: skip
    return out, lse


def _empty_partials(q: torch.Tensor, k_cache: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, lq, d = q.shape
    kvh = k_cache.shape[2]
    shape = (used.shape[0] // b, b, kvh, h // kvh * lq)
    return q.new_empty((*shape, d), dtype=torch.float32), q.new_empty(shape, dtype=torch.float32)


@split_kv_decode.register_fake
def _(q, k_cache, v_cache, starts, used, scale, bias=None):
    return _empty_partials(q, k_cache, used)


@triton.jit
def _merge_chunks_kernel(
    Out, Lse, Dst, DstLse, splits, n_rows, rows, q_len, heads, kv_heads, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # a query row of one kv-head of one sequence, as the decode kernel writes it
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < splits
    lse = tl.load(Lse + s * n_rows + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no chunk saw a slot: every weight 0, out 0
    w = tl.exp(lse - m)
    den = tl.sum(w, 0)
    part_ok = s_ok[:, None] & (d < head_dim)[None, :]
    part = tl.load(Out + (s[:, None] * n_rows + row).to(tl.int64) * head_dim + d[None, :], mask=part_ok, other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    seq_head, r = row // rows, row % rows
    b, kv_head = seq_head // kv_heads, seq_head % kv_heads
    head, t = kv_head * (rows // q_len) + r // q_len, r % q_len
    tl.store(Dst + ((b * q_len + t) * heads + head) * head_dim + d, out.to(Dst.dtype.element_ty), mask=d < head_dim)
    tl.store(DstLse + (b * heads + head) * q_len + t, tl.where(den > 0, m + tl.log(den), float("-inf")))


@torch.library.custom_op("fmsring::merge_chunks", mutates_args=())
def merge_chunks(
    out: torch.Tensor, lse: torch.Tensor, q_len: int, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_kv_decode`'s chunk partials (out [S, b, kvh, rows, d], lse [S, b, kvh, rows],
    fp32, rows = h/kvh * ``q_len``) merged exactly through their log-sum-exp, in fp32: (out
    [b, q_len, h, d] in ``out_dtype``, the layout of the layer's query and of the output
    projection's input; lse [b, h, q_len] fp32). A row that no chunk saw gives out 0, lse -inf."""
    _, b, kvh, rows, d = out.shape
    dst, dst_lse = _empty_merged(out, q_len, out_dtype)
    with _launching_on(out):
        _merge_chunks_kernel[(b * kvh * rows,)](
            out, lse, dst, dst_lse, out.shape[0], b * kvh * rows, rows, q_len, dst.shape[2], kvh, d,
            BLOCK_S=max(16, triton.next_power_of_2(out.shape[0])), BLOCK_D=max(16, triton.next_power_of_2(d)),
        )  # fmt: skip
    return dst, dst_lse


def _empty_merged(out: torch.Tensor, q_len: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    _, b, kvh, rows, d = out.shape
    heads = kvh * rows // q_len
    return out.new_empty((b, q_len, heads, d), dtype=out_dtype), out.new_empty((b, heads, q_len))


@merge_chunks.register_fake
def _(out, lse, q_len, out_dtype):
    return _empty_merged(out, q_len, out_dtype)
