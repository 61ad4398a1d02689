"""Measure the floors and the per-block attention kernels on this machine.

Run: torchrun --nproc_per_node=2 scripts/gpu_probe.py OUT_DIR [SECTION ...]
(sections: shift backends matmul followup; all but followup by default).
Decode attention: scripts/decode_kernel_sweep.py.
Rank 0 probes kernels (which SDPA backends return the log-sum-exp, accept
GQA without expansion, and how fast each is per block shape); both ranks
time the NCCL ring shift. Writes probe.json; prints a short table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import traceback

import torch
import torch.distributed as dist

from fmsring.kernels import math_attention_with_lse

aten = torch.ops.aten


def cuda_times(fn, reps: int = 10, warmup: int = 3) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` (CUDA events), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return times


def bench_ms(fn, reps: int = 10) -> float:
    """Median of :func:`cuda_times`."""
    return statistics.median(cuda_times(fn, reps))


def backends(q, k, v, causal, scale):
    """Each candidate returns (out [b,h,Lq,d], lse [b,h,Lq])."""
    return {
        "cudnn": lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[
            :2
        ],
        "flash": lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2],
        "efficient": lambda: aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )[:2],
    }


def check_backends(results: dict) -> None:
    """Correctness of each backend's (out, lse) vs the fp32 math path, MHA and GQA."""
    torch.manual_seed(0)
    for kvh in (32, 8):
        for causal in (False, True):
            q = torch.randn(1, 32, 1000, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, kvh, 1000, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            ref_o, ref_l = math_attention_with_lse(q, k, v, 128**-0.5, causal)
            for name, fn in backends(q, k, v, causal, 128**-0.5).items():
                key = f"{name}_kvh{kvh}_causal{int(causal)}"
                try:
                    o, l = fn()
                    l = l.reshape(1, 32, -1)[..., :1000].float()
                    results[key] = {
                        "out_rel": ((o.float() - ref_o).norm() / ref_o.norm()).item(),
                        "lse_max": (l - ref_l).abs().max().item(),
                        "lse_shape": list(l.shape),
                    }
                except Exception as e:  # noqa: BLE001 -- recording which backends fail is the point
                    results[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def time_each(results: dict, key: str, q, k, v, causal: bool, flops: float) -> None:
    """Time every backend on one block: ``results[key.format(backend)]`` is its ms and TFLOP/s, or
    the error it raised (which backends fail is part of what is probed)."""
    for name, fn in backends(q, k, v, causal, 128**-0.5).items():
        try:
            ms = bench_ms(fn)
            results[key.format(name)] = {"ms": ms, "tflops": flops / ms / 1e9}
        except Exception as e:  # noqa: BLE001
            results[key.format(name)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def time_backends(results: dict) -> None:
    """TFLOP/s per backend for ring block shapes of LLaMA-3-8B (32 q heads, d=128)."""
    for lq, lk, causal in (
        (8192, 8192, True),
        (32768, 32768, True),
        (65536, 65536, True),
        (32768, 32768, False),
        (65536, 32768, False),
        (32768, 65536, False),
        (8192, 16384, False),
    ):
        q = torch.randn(1, 32, lq, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 32, lk, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4 * 32 * 128 * lq * lk * (0.5 if causal else 1.0)
        time_each(results, "time_{}_" + f"{lq}x{lk}_c{int(causal)}", q, k, v, causal, flops)
        del q, k, v
        torch.cuda.empty_cache()


def time_followup_blocks(results: dict) -> None:
    """TFLOP/s of a follow-up's largest block, T new queries over the P cached keys (LLaMA-3-8B:
    32 query heads, 8 kv-heads, d=128, non-causal), with the keys as a follow-up reads them -- the
    cache's tokens-major [b, capacity, kvh, d] seen heads-major through a transpose, no copy -- and
    as a contiguous heads-major copy, which the ring's pass-KV sends and cuDNN reads fastest."""
    for lq, lk in ((1024, 32768), (512, 131072), (8192, 131072)):
        q = torch.randn(1, 32, lq, 128, device="cuda", dtype=torch.bfloat16)
        cache_k, cache_v = (torch.randn(1, lk + 256, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        layouts = {
            "cache": (cache_k[:, :lk].transpose(1, 2), cache_v[:, :lk].transpose(1, 2)),
            "heads_major": (cache_k[:, :lk].transpose(1, 2).contiguous(), cache_v[:, :lk].transpose(1, 2).contiguous()),
        }
        for layout, (k, v) in layouts.items():
            time_each(results, "followup_{}_" + f"{layout}_{lq}x{lk}", q, k, v, False, 4 * 32 * 128 * lq * lk)
        del q, cache_k, cache_v, layouts
        torch.cuda.empty_cache()


def time_matmul(results: dict) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = bench_ms(lambda: a @ b)
    results["matmul_8192_tflops"] = 2 * 8192**3 / ms / 1e9


def time_ring_shift(results: dict, rank: int, world: int) -> None:
    """One ring step (send to next, receive from previous) of K/V sized buffers."""
    for mib in (4, 64, 256, 1024):
        n = mib * 2**20 // 2
        send = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        recv = torch.empty_like(send)

        def step():
            ops = [dist.P2POp(dist.isend, send, (rank + 1) % world), dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
            for r in dist.batch_isend_irecv(ops):
                r.wait()

        ms = bench_ms(step, reps=20)
        results[f"ring_shift_{mib}MiB"] = {"ms": ms, "GBps_per_direction": mib * 2**20 / ms / 1e6}


def main() -> None:
    out_dir = sys.argv[1]
    sections = set(sys.argv[2:]) or {"shift", "backends", "matmul"}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
    }
    try:
        if world > 1 and "shift" in sections:
            time_ring_shift(results, rank, world)
        if rank == 0:
            if "backends" in sections:
                check_backends(results)
                time_backends(results)
            if "matmul" in sections:
                time_matmul(results)
            if "followup" in sections:
                time_followup_blocks(results)
    except Exception:  # noqa: BLE001
        results["fatal"] = traceback.format_exc()
    dist.barrier()
    if rank == 0:
        with open(os.path.join(out_dir, "probe.json"), "w") as f:
            json.dump(results, f, indent=1)
        for k, v in results.items():
            print(k, v)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
