"""Where a long prefill's GPU time goes: kernel time by kind, for ring and one GPU.

Run: torchrun --nproc_per_node=2 scripts/profile_prefill.py OUT_DIR [SEQ_LEN]
One warm-up and one profiled forward (LLaMA-3-8B shapes, random weights,
bf16, ``last_n_tokens=1``) of ``ring`` on all ranks, then of the plain FMS
model on rank 0. Writes profile_rank<r>.json: the forward's wall time (CUDA
events) and its kernel time summed by kind; ``wall - compute kernels`` is
the time the compute stream had no kernel running (launch gaps, waiting for
a transfer or for the other rank). The largest of those idle spans are
listed by the kernels around them, to say what the stream was waiting for.
"""

from __future__ import annotations

import cProfile
import functools
import io
import itertools
import json
import os
import pstats
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable

import fms.models
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import fmsring
from fmsring.comm import maybe_init_dist

KINDS = (  # first match wins; matched against lower-cased kernel names
    ("communication", ("nccl",)),
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa", "split_kv_decode")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "elementwise and other")


def idle_spans(trace_path: str, top: int = 8) -> dict:
    """Idle time on the compute stream (the one with the most non-NCCL kernel time),
    summed by (kernel before, kernel after)."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel" and e.get("ph") == "X"]
    busy: dict[int, float] = defaultdict(float)
    for e in events:
        if kind_of(e["name"]) != "communication":
            busy[e["args"]["stream"]] += e["dur"]
    stream = max(busy, key=busy.get)
    kernels = sorted((e for e in events if e["args"]["stream"] == stream), key=lambda e: e["ts"])
    spans: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for prev, nxt in itertools.pairwise(kernels):
        idle = nxt["ts"] - (prev["ts"] + prev["dur"])
        if idle > 20:  # us
            key = f"{prev['name'][:50]} -> {nxt['name'][:50]}"
            spans[key][0] += idle / 1e3
            spans[key][1] += 1
    ranked = sorted(spans.items(), key=lambda kv: -kv[1][0])[:top]
    return {k: {"ms": round(v[0], 2), "count": v[1]} for k, v in ranked}


def cuda_kernels(prof: profile) -> list[tuple[str, int, float]]:
    """(name, launches, total ms) of every CUDA kernel a profile recorded."""
    kernels = []
    for evt in prof.key_averages():
        ms = getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)) / 1e3
        if ms > 0 and str(evt.device_type).endswith("CUDA"):
            kernels.append((evt.key, evt.count, ms))
    return kernels


def kernels_by_name(kernels: list[tuple[str, int, float]], top: int = 40) -> list[dict]:
    """The ``top`` of :func:`cuda_kernels` by launch count (then time): name (cut to 90
    characters), kind, count per profiled call, total ms -- what a step's kernel count is made of."""
    rows = [{"name": name[:90], "kind": kind_of(name), "count": n, "ms": round(ms, 4)} for name, n, ms in kernels]
    return sorted(rows, key=lambda r: (-r["count"], -r["ms"]))[:top]


def kernel_ms_by_kind(kernels: list[tuple[str, int, float]]) -> tuple[dict[str, float], int]:
    """:func:`cuda_kernels`' time (ms) summed by kind, and how many kernels ran."""
    totals: dict[str, float] = {}
    for name, _, ms in kernels:
        totals[kind_of(name)] = totals.get(kind_of(name), 0.0) + ms
    return totals, sum(n for _, n, _ in kernels)


def llama3_8b(seq_len: int, table_len: int) -> tuple[int, int, dict, torch.Tensor]:
    """(rank, world, get_model kwargs for LLaMA-3-8B bf16 on CUDA with a RoPE
    table of ``table_len``, a random prompt of ``seq_len`` tokens, the same on every rank)."""
    rank, world = maybe_init_dist()
    args = {
        "architecture": "llama",
        "variant": "3-8b",
        "device_type": "cuda",
        "data_type": "bfloat16",
        "max_expected_seq_len": table_len,
    }
    torch.manual_seed(0)
    return rank, world, args, torch.randint(0, 32000, (1, seq_len), device="cuda")


def top_functions(profiler: cProfile.Profile, key: str, n: int) -> list[str]:
    """cProfile's report sorted by ``key``, its first ``n`` function lines."""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(n)
    lines = text.getvalue().splitlines()
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return [line for line in lines[head:] if line.strip()]


def write_rank_json(result: dict, out_dir: str, name: str) -> None:
    """Write and print this rank's result, then wait for the other ranks (if a group is left: the
    bench, run in the process, destroys its own)."""
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    if dist.is_initialized():
        dist.barrier()


def profiled(call: Callable[[], object], host_ops: int = 0) -> dict:
    """``call`` once to warm up, then once profiled: its wall time (CUDA events), kernel time by
    kind, the compute stream's idle time and largest idle spans, and (``host_ops`` > 0) that many
    host ops by self CPU time -- what the host was busy with while the GPU idled."""
    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host_ops else [])
        with profile(activities=activities) as prof:
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
    totals, _ = kernel_ms_by_kind(cuda_kernels(prof))
    compute = sum(v for k, v in totals.items() if k != "communication")
    wall = start.elapsed_time(end)
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        idle = idle_spans(trace.name)
    result = {
        "wall_ms": wall,
        "kernel_ms": totals,
        "compute_kernels_ms": compute,
        "gap_ms": wall - compute,
        "largest_idle_spans": idle,
    }
    if host_ops:
        host = [e for e in prof.key_averages() if str(e.device_type).endswith("CPU") and e.self_cpu_time_total > 0]
        host.sort(key=lambda e: -e.self_cpu_time_total)
        result["host_ops_by_self_ms"] = [
            {"name": e.key[:90], "count": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 3)}
            for e in host[:host_ops]
        ]
    return result


def main() -> None:
    out_dir, seq_len = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 131072
    rank, world, args, ids = llama3_8b(seq_len, seq_len)
    result = {"gpu": torch.cuda.get_device_name(), "world_size": world, "seq_len": seq_len}
    torch.manual_seed(0)
    ring = fmsring.get_model(**args, distributed_strategy="ring", ring_check_inputs=False).eval()
    result["ring"] = profiled(functools.partial(ring, ids, last_n_tokens=1))
    del ring
    torch.cuda.empty_cache()
    if rank == 0:
        single = fms.models.get_model(**args, distributed_strategy="none").eval()
        result["single"] = profiled(functools.partial(single, ids, last_n_tokens=1))
    write_rank_json(result, out_dir, f"profile_rank{rank}.json")


if __name__ == "__main__":
    main()
