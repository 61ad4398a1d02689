"""Decode attention alone, per chunk count: how fmsring.kernels.decode_splits was tuned.

One query token over a bf16 cache shard, timed with CUDA graphs (as the decode
step runs it), for the per-GPU shapes of LLaMA-3-8B's factorisations; the
bandwidth is the K/V bytes read over the time. Writes a CSV to the given path:

    python scripts/decode_kernel_sweep.py OUT.csv
"""

from __future__ import annotations

import csv
import sys

import torch

from fmsring.kernels import _sm_count, decode_splits, split_kv, split_kv_decode_with_lse


def time_ms(fn, iters: int = 50) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(path: str) -> None:
    sms = _sm_count(torch.device("cuda"))
    rows = []
    for batch, heads, kv_heads, tokens in [(1, 32, 8, 32768), (1, 32, 8, 131072), (1, 16, 4, 65536),
                                           (1, 8, 2, 131072), (4, 32, 8, 32768)]:  # fmt: skip
        q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
        kc, vc = (torch.randn(batch, tokens, kv_heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens = torch.full((batch,), tokens, dtype=torch.int32, device="cuda")
        auto = decode_splits(batch, kv_heads, tokens, sms)
        for splits in sorted({1, max(1, auto // 4), max(1, auto // 2), auto, 2 * auto, 4 * auto}):
            plan = split_kv(lens, kc, heads, 1, splits)  # made once per step, outside the graph's layers
            ms = time_ms(lambda p=plan: split_kv_decode_with_lse(q, kc, vc, 128**-0.5, p))
            gbps = 2 * kc.numel() * kc.element_size() / ms / 1e6
            rows.append(dict(gpu=torch.cuda.get_device_name(), batch=batch, heads=heads, kv_heads=kv_heads,
                             tokens=tokens, splits=splits, chosen=splits == auto, ms=round(ms, 4),
                             gbps=round(gbps, 1)))  # fmt: skip
            print(rows[-1], flush=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1])
