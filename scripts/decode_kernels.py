"""Decode attention against a long cache shard: which kernel, at what cost, in a CUDA graph.

Run: python scripts/decode_kernels.py OUT.json   (one GPU)
One query token (32 heads) against 8 kv-heads x {16K, 64K, 128K} cached
tokens in a preallocated [1, capacity, kvh, d] buffer. Times, per call inside
a captured graph (as a decode step runs): the exact-length slice through
``attention_with_lse`` (what an eager step could call; its shape changes every
token, so it cannot be captured), flash's varlen kernel with ``seqused_k``
(shape-static), fmsring's ``decode_attention_with_lse`` (that kernel plus its
bookkeeping), and ``num_splits`` where the op takes it; it records whether
the op takes a paged ``block_table``. Each is checked against the fp32 math
path; a profile of fmsring's call lists the kernels it launches.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from gpu_probe import cuda_times
from torch.profiler import ProfilerActivity, profile

from fmsring.kernels import (
    attention_with_lse,
    decode_attention_with_lse,
    flash_decode_with_lse,
    math_attention_with_lse,
)

aten = torch.ops.aten
SCALE = 128**-0.5


def graph_ms(fn, calls: int = 32) -> float:
    """Median time of one call, from graphs that replay ``calls`` calls back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return statistics.median(cuda_times(graph.replay, reps=11, warmup=0)) / calls


def measure(fill: int, schema: str, res: dict) -> None:
    """Every candidate against ``fill`` cached tokens, into ``res``."""
    k_cache = torch.randn(1, fill + 256, 8, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    lens = torch.full((1,), fill, dtype=torch.int32, device="cuda")
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = k_cache[:, :fill].transpose(1, 2), v_cache[:, :fill].transpose(1, 2)
    ref_out, ref_lse = math_attention_with_lse(q, k, v, SCALE)
    cands = {
        "slice": lambda: attention_with_lse(q, k, v, SCALE),
        "ours": lambda: decode_attention_with_lse(q, k_cache, v_cache, lens, SCALE),
        "varlen": lambda: flash_decode_with_lse(q, k_cache, v_cache, lens, SCALE),
    }
    if "num_splits" in schema:
        for n in (1, 4, 8, 16, 32, 64):
            cands[f"splits{n}"] = lambda n=n: flash_decode_with_lse(q, k_cache, v_cache, lens, SCALE, num_splits=n)
    for name, fn in cands.items():
        key = f"{name}_fill{fill}"
        try:
            out, lse = fn()
            res[key] = {
                "graph_ms": graph_ms(fn),
                "out_rel": ((out.float() - ref_out).norm() / ref_out.norm()).item(),
                "lse_abs": (lse - ref_lse).abs().max().item(),
            }
        except Exception as e:  # noqa: BLE001 - an op this torch lacks is a result too
            res[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(key, res[key], flush=True)


def main() -> None:
    schema = str(aten._flash_attention_forward.default._schema)
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "schema": schema}
    res["has_block_table"] = "block_table" in schema  # a paged cache needs it
    for fill in (16384, 65536, 131072):
        measure(fill, schema, res)
    k_cache = torch.randn(1, 16640, 8, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((1,), 16384, dtype=torch.int32, device="cuda")
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    decode_attention_with_lse(q, k_cache, k_cache, lens, SCALE)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            decode_attention_with_lse(q, k_cache, k_cache, lens, SCALE)
        torch.cuda.synchronize()
    res["profile"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
    print(res["profile"])
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
