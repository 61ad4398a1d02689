"""fmsring's own split-KV decode attention: a Triton kernel for a few query rows against a long cache.

Why a kernel of our own: a decode step reads its cache shard once, so attention
should run at the copy bandwidth. Flash's varlen kernel, fed the shard as a
batch of chunks, does not (docs/performance.md): its tile is 128 query rows,
of which a GQA kv-head's decode step fills 4, and every chunk must be a
sequence of its own. Here one program reads one chunk of one kv-head's cache
for every query row that shares it (GQA packed: the K/V bytes are read once)
and keeps a 16-row tile. The last program of a (sequence, kv-head) to finish
its chunk merges every chunk's (out, lse) exactly, as :func:`fmsring.merge.merge_split`
does, and writes the result in the dtype and layout its reader takes (the
output projection's, at world 1): one launch a layer, where a merge kernel of
its own cost a second launch and the gap before it.

The chunks are whatever the caller's plan says -- where each starts in its
sequence's cache and how many slots it uses -- so they follow the cache's fill,
not its capacity, and every shape is fixed by the capacity and the chunk
count: the call can be captured in a CUDA graph and replayed as the cache grows.

Registered as the custom op ``fmsring::split_kv_decode`` so a compiled decoder
layer calls it as it is (inductor neither traces nor re-tunes it).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from fmsring import split_kv as plans

# The launch configuration (and fmsring.split_kv.TILE_SLOTS, the tile of cache slots, which the
# split-KV plans cut chunks in), tuned per shape by scripts/decode_kernel_sweep.py.
NUM_WARPS = 4
NUM_STAGES = 3
# Partial values a program holds at once while it merges, chunks x rows x head dim: bounds its registers.
MERGE_VALUES = 8192


@triton.jit
def _split_kv_decode_kernel(
    Q, K, V, Starts, Used, Bias, Part, PartLse, Arrivals, Dst, DstLse,
    scale_log2, batch, kv_heads, rows, q_len, head_dim,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_bias_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
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
    # this (sequence, kv-head)'s rows among all of them, as the partials are laid out: [chunk, b, kvh, rows]
    n_rows = batch * kv_heads * rows
    row0 = seq_head * rows
    if splits > 1:
        part = (chunk * n_rows + row0 + r).to(tl.int64)
        tl.store(Part + part[:, None] * head_dim + d[None, :], out, mask=row_ok)
        tl.store(PartLse + part, lse, mask=r < rows)
        # Every thread's partial stored, then counted once, with release: the program that counts last
        # acquires them all (read past L1, which no other SM's stores reach) and merges.
        tl.debug_barrier()
        arrived = tl.atomic_add(Arrivals + seq_head, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            tl.store(Arrivals + seq_head, 0)  # the count starts from 0 at the next call, or graph replay
            rr = tl.arange(0, BLOCK_R)
            top = tl.full([BLOCK_R], float("-inf"), tl.float32)  # the merge's running max, sum and output
            den = tl.zeros([BLOCK_R], tl.float32)
            merged = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            for s0 in range(0, splits, BLOCK_S):  # a block of chunks at a time, rescaled as the kernel's tiles
                c = s0 + tl.arange(0, BLOCK_S)
                ok = (c < splits)[:, None] & (rr < rows)[None, :]
                at = c[:, None] * n_rows + row0 + rr[None, :]  # [chunks, rows]
                lses = tl.load(PartLse + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
                parts = tl.load(
                    Part + at[:, :, None].to(tl.int64) * head_dim + d[None, None, :],
                    mask=ok[:, :, None] & (d < head_dim)[None, None, :], other=0.0, cache_modifier=".cg",
                )  # fmt: skip
                top_new = tl.maximum(top, tl.max(lses, 0))
                top_use = tl.where(top_new == float("-inf"), 0.0, top_new)  # no chunk saw a slot yet: weights 0
                alpha = tl.exp(top - top_use)
                w = tl.exp(lses - top_use[None, :])
                den = den * alpha + tl.sum(w, 0)
                merged = merged * alpha[:, None] + tl.sum(parts * w[:, :, None], 0)
                top = top_new
            some = tl.where(den > 0, den, 1.0)
            merged_lse = tl.where(den > 0, top + tl.log(some), float("-inf"))
            _store_rows(
                Dst, DstLse, merged / some[:, None], merged_lse, rr, d, b, kv_head, rows, q_len, kv_heads, head_dim
            )
    else:  # one chunk: its partial is the result
        _store_rows(Dst, DstLse, out, lse, r, d, b, kv_head, rows, q_len, kv_heads, head_dim)


@triton.jit
def _store_rows(Dst, DstLse, out, lse, r, d, b, kv_head, rows, q_len, kv_heads, head_dim):
    """Rows ``r`` of one (sequence, kv-head) into out [b, q_len, heads, d] (in its dtype) and lse [b, heads, q_len]."""
    heads = kv_heads * (rows // q_len)
    head, t = kv_head * (rows // q_len) + r // q_len, r % q_len
    dst = ((b * q_len + t) * heads + head).to(tl.int64) * head_dim
    ok = r < rows
    tl.store(Dst + dst[:, None] + d[None, :], out.to(Dst.dtype.element_ty), mask=ok[:, None] & (d < head_dim)[None, :])
    tl.store(DstLse + (b * heads + head) * q_len + t, lse, mask=ok)


# Per device, one count per (sequence, kv-head) of the programs that have finished their chunk: the
# last to finish merges and sets it back to 0, so a count is 0 between calls and inside a replayed
# graph. Made outside any capture (a decode step runs once before it is captured), zeroed once.
MAX_COUNTS = 1 << 16
_arrivals: dict[torch.device, torch.Tensor] = {}


def arrivals(device: torch.device) -> torch.Tensor:
    if device not in _arrivals:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fmsring's decode kernel must run once on a device before a CUDA graph captures it")
        _arrivals[device] = torch.zeros(MAX_COUNTS, dtype=torch.int32, device=device)
    return _arrivals[device]


@torch.library.custom_op("fmsring::split_kv_decode", mutates_args=())
def split_kv_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    used: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [b, h, Lq, d] over caches [b, capacity, kvh, d] (half precision, the head dim
    contiguous), read in chunks -- chunk c of sequence i being ``used[i*S + c]`` slots from slot
    ``starts[i*S + c]``, S chunks per sequence (``used.numel() // b``) -- and merged exactly through
    their log-sum-exp, plus ``bias`` [b, capacity] fp32 on every query row where given (a padding
    mask: -inf hides a slot). Returns (out [b, Lq, h, d] in ``out_dtype``: the layout of the layer's
    query and of the output projection's input; lse [b, h, Lq] fp32). A row that no slot is shown
    to gives out 0 and lse -inf."""
    if not q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1:
        raise ValueError("split_kv_decode reads the head dim of q and the caches as contiguous")
    if bias is not None and (bias.shape != k_cache.shape[:2] or bias.dtype != torch.float32 or bias.stride(-1) != 1):
        raise ValueError(f"a decode bias is fp32 [batch, capacity] = {tuple(k_cache.shape[:2])}, contiguous per row")
    b, h, lq, d = q.shape
    kvh = k_cache.shape[2]
    rows, splits = h // kvh * lq, used.numel() // b
    if splits > 1 and b * kvh > MAX_COUNTS:
        raise ValueError(f"{b * kvh} (sequence, kv-head) pairs read in chunks; the kernel counts {MAX_COUNTS}")
    dst, dst_lse = _empty_merged(q, out_dtype)
    part = part_lse = counts = dst_lse  # read only where there are several chunks
    if splits > 1:
        part = q.new_empty((splits, b, kvh, rows, d), dtype=torch.float32)
        part_lse = q.new_empty((splits, b, kvh, rows), dtype=torch.float32)
        counts = arrivals(q.device)
    block_r, block_d = triton.next_power_of_2(rows), max(16, triton.next_power_of_2(d))
    guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with guard:
        _split_kv_decode_kernel[(splits, b * kvh)](
            q, k_cache, v_cache, starts, used, used if bias is None else bias, part, part_lse, counts, dst, dst_lse,
            scale * math.log2(math.e), b, kvh, rows, lq, d,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            0 if bias is None else bias.stride(0),
            BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=plans.TILE_SLOTS, BLOCK_D=block_d,
            HAS_BIAS=bias is not None, BLOCK_R=block_r,
            BLOCK_S=max(1, min(triton.next_power_of_2(splits), MERGE_VALUES // (block_r * block_d))),
            num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )  # fmt: skip
    return dst, dst_lse


def _empty_merged(q: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, lq, d = q.shape
    return q.new_empty((b, lq, h, d), dtype=out_dtype), q.new_empty((b, h, lq), dtype=torch.float32)


@split_kv_decode.register_fake
def _(q, k_cache, v_cache, starts, used, scale, bias=None, out_dtype=torch.float32):
    return _empty_merged(q, out_dtype)
