"""Decode attention alone: fmsring's Triton decode kernel against flash's varlen kernel, per shape,
chunk count and tile configuration; how fmsring.kernels.decode_splits and the kernel's constants
were chosen.

One query token over a bf16 cache shard, each call timed inside a CUDA graph (as the decode step
runs it), for the per-GPU shapes of LLaMA-3-8B on one GPU and its factorisations on 2 and 4 GPUs,
and of LLaMA-2-70B's 2x2. Chunk counts tried: the rule's, half and twice it, and the counts that
fill one and two waves of one program per SM exactly (the rule's own is the first: it rounds one
program per SM down, since rounded up its last wave held a few programs alone), each with every
tile configuration. At the rule's count, the chunks merged the two ways the step has
merged them, the output cast and laid out for the output projection: by inductor's two kernels
compiled from ``merge_split`` (``compiled merge``, the step's merge up to 78cff20) and by
``fmsring.decode_kernel.merge_chunks``, one kernel (``merge_chunks``, the step now); the plain
``fmsring`` rows merge by ``merge_chunks`` too, into fp32 as at world > 1. ``flash`` is the
call fmsring made before it had a kernel of its own (the shard as a batch of chunks through
flash's varlen kernel, the query heads of a kv-head packed as rows), kept here as the baseline.
Every variant is checked against fp32 math (``rel_err``). The bandwidth is the K/V bytes read
over the time. Writes a CSV:

    python scripts/decode_kernel_sweep.py OUT.csv
"""

from __future__ import annotations

import csv
import statistics
import sys

import torch
import triton
from gpu_probe import cuda_times

from fmsring import decode_kernel
from fmsring import split_kv as plans
from fmsring.fusion import fused
from fmsring.kernels import math_attention_with_lse, split_kv_decode_with_lse
from fmsring.merge import merge_split
from fmsring.ring import to_query_layout
from fmsring.split_kv import decode_splits, sm_count, split_kv

SCALE = 128**-0.5
# (name, batch, query heads, kv-heads, cached tokens per GPU)
SHAPES = [
    ("8b 1x1 8K", 1, 32, 8, 8192),
    ("8b 1x1 32K", 1, 32, 8, 32768),
    ("8b 1x1 128K", 1, 32, 8, 131072),
    ("8b 1x1 batch 4 32K", 4, 32, 8, 32768),
    ("8b 2x1 32K", 1, 32, 8, 16384),
    ("8b 2x1 128K", 1, 32, 8, 65536),
    ("8b 1x2 32K", 1, 16, 4, 32768),
    ("8b 1x2 128K", 1, 16, 4, 131072),
    ("8b 2x1 batch 4 32K", 4, 32, 8, 16384),
    ("8b 1x4 128K", 1, 8, 2, 131072),
    ("8b 4x1 1M", 1, 32, 8, 262144),
    ("70b 2x2 128K", 1, 32, 4, 65536),
]
# (cache slots per tile, warps, pipeline stages); the first is the kernel's default
# (the last two hold more bytes in flight, which an H200's faster memory may need)
CONFIGS = [
    (64, 4, 3), (32, 4, 3), (128, 4, 3), (64, 8, 3), (64, 4, 2), (64, 4, 4), (128, 8, 3), (32, 2, 3),
    (128, 4, 4), (128, 8, 4),
]  # fmt: skip


def graph_ms(fn, calls: int = 20) -> float:
    """Median time of one call, from a graph that replays ``calls`` calls back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return statistics.median(cuda_times(graph.replay, reps=7, warmup=1)) / calls


def merged_as_before(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The merge the compiled decoder layer ran before ``fmsring.decode_kernel.merge_chunks``
    (code 78cff20): ``merge_split``, then the output in the dtype and layout of ``query``
    [b, Lq, h, d] (``to_query_layout``, as ``merge_shards`` hands it on at world 1), which inductor
    compiled into two kernels."""
    splits, b, kvh, rows, d = out.shape
    lq = query.shape[1]
    merged, _ = merge_split(out.view(splits, b, kvh, rows // lq, lq, d), lse.view(splits, b, kvh, rows // lq, lq))
    return to_query_layout(merged, query)


merged_as_before_compiled = torch.compile(merged_as_before, dynamic=False)
merge_split_compiled = fused(merge_split)


def flash_varlen(q, k_cache, v_cache, lens, splits):
    """fmsring's decode attention before its own kernel (code d692aa6): the cache cut into ``splits``
    equal chunks of the capacity, each a sequence of flash's varlen kernel, merged through the lse by
    the same fused merge. Returns the call, its bookkeeping made once, as a decode step makes it."""
    b, h, lq, d = q.shape
    cap, kvh = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    bounds = torch.arange(splits + 1, device=q.device) * cap // splits
    used = (lens.long().unsqueeze(1) - bounds[:-1]).clamp(min=0).minimum(bounds[1:] - bounds[:-1]).reshape(-1).int()
    starts = (torch.arange(b, device=q.device) * cap).unsqueeze(1) + bounds[:-1]
    cu_k = torch.cat([starts.reshape(-1), starts.new_full((1,), b * cap)]).int()
    cu_q = torch.arange(b * splits + 1, device=q.device, dtype=torch.int32) * g

    def call():
        packed = q.view(b, kvh, g, d).permute(0, 2, 1, 3).unsqueeze(1).expand(b, splits, g, kvh, d)
        out, lse = torch.ops.aten._flash_attention_forward(
            packed.reshape(b * splits * g, kvh, d), k_cache.view(b * cap, kvh, d), v_cache.view(b * cap, kvh, d),
            cu_q, cu_k, g, -(-cap // splits), 0.0, False, False, scale=SCALE, seqused_k=used,
        )[:2]  # fmt: skip
        out = out.view(b, splits, 1, g, kvh, d).permute(1, 0, 4, 3, 2, 5)
        if lse.dim() == 2:
            lse = lse.view(kvh, b, splits, 1, g).permute(2, 1, 0, 4, 3)
        else:
            lse = lse.view(b, splits, kvh, 1, g).permute(1, 0, 2, 4, 3)
        return merge_split_compiled(out, lse.masked_fill(lse == float("inf"), float("-inf")))

    return call


def main(path: str) -> None:
    torch._dynamo.config.recompile_limit = 64  # the compiled merge compiles once per shape, all of them
    sms = sm_count(torch.device("cuda"))
    default = (plans.TILE_SLOTS, decode_kernel.NUM_WARPS, decode_kernel.NUM_STAGES)
    rows = []
    for name, batch, heads, kv_heads, tokens in SHAPES:
        q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
        kc, vc = (torch.randn(batch, tokens, kv_heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens = torch.full((batch,), tokens, dtype=torch.int32, device="cuda")
        ref = math_attention_with_lse(q[:1], kc[:1].transpose(1, 2), vc[:1].transpose(1, 2), SCALE)[0]
        auto = decode_splits(batch, kv_heads, tokens, sms)
        flash_splits = min(-(-2 * sms // (batch * kv_heads)), tokens // 512)  # fmsring's rule for flash
        cands = {("flash", flash_splits, None): flash_varlen(q, kc, vc, lens, flash_splits)}
        waves = {max(1, n * sms // (batch * kv_heads)) for n in (1, 2)}  # n programs per SM, none left over
        for splits in sorted({max(1, auto // 2), auto, 2 * auto, *waves}):
            plan = split_kv(lens, splits)  # made once per step, outside the layers
            for cfg in CONFIGS:
                cands[("fmsring", splits, cfg)] = lambda p=plan: split_kv_decode_with_lse(q, kc, vc, SCALE, p)
            if splits == auto:  # the merge alone differs: out [b, Lq, h, d] in q's dtype, viewed as [b, h, Lq, d]
                partials = lambda p=plan: decode_kernel.split_kv_decode(q, kc, vc, p.starts, p.used, SCALE)  # noqa: E731
                query = q.transpose(1, 2).contiguous()  # the layer's query layout, as merge_shards gets it
                cands[("fmsring, compiled merge", splits, default)] = lambda: (
                    merged_as_before_compiled(*partials(), query).transpose(1, 2),
                )
                cands[("fmsring, merge_chunks", splits, default)] = lambda p=plan: split_kv_decode_with_lse(
                    q, kc, vc, SCALE, p, out_dtype=q.dtype
                )
        for (kernel, splits, cfg), fn in cands.items():
            if cfg is not None:
                plans.TILE_SLOTS, decode_kernel.NUM_WARPS, decode_kernel.NUM_STAGES = cfg
            try:
                out = fn()[0].float()
            except triton.runtime.errors.OutOfResources as err:  # a tile and stage count past shared memory
                print(f"{name} {kernel} {splits} {cfg}: {err}", flush=True)
                continue
            ms = graph_ms(fn)
            rows.append(dict(
                gpu=torch.cuda.get_device_name(), shape=name, batch=batch, heads=heads, kv_heads=kv_heads,
                tokens=tokens, kernel=kernel, splits=splits,
                chosen=kernel == "fmsring" and splits == auto and cfg == default,
                block_n=cfg and cfg[0], warps=cfg and cfg[1], stages=cfg and cfg[2], ms=round(ms, 4),
                gbps=round(2 * kc.numel() * kc.element_size() / ms / 1e6, 1),
                rel_err=f"{((out[:1] - ref).norm() / ref.norm()).item():.2e}",
            ))  # fmt: skip
            print(rows[-1], flush=True)
        plans.TILE_SLOTS, decode_kernel.NUM_WARPS, decode_kernel.NUM_STAGES = default
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1])
