"""Where a ring decode step's time goes, against its memory floor.

Run: torchrun --nproc_per_node=2 scripts/profile_decode.py OUT_DIR [SEQ_LEN [VARIANTS [RING_TP [BATCH [PADDING]]]]]
For ring with whole decoder layers compiled (the default), with only each
module's elementwise work fused (``ring_fuse_layers=False``), and unfused
(``ring_fuse=False``) -- the first VARIANTS of these (default all three), on
the mesh of ``ring_tp=RING_TP`` (default 1: the ring alone; with TP, FMS's
all-reduces are among the kernels), at batch BATCH (default 1), left-padded by
PADDING (default 0; as the bench's ``--padding``: the mask extended every step
as FMS's ``generate`` extends it, inside the host's part):
a cached prefill of SEQ_LEN tokens (LLaMA-3-8B shapes, random weights,
bf16), then one-token steps. The captured (CUDA-graph) step is timed with
CUDA events, median of 20, beside the host's time inside the call (and, under
cProfile, the functions it is spent in) and the graph replayed alone; one
eager step is profiled for its kernel count, kernel time by kind and the most
launched kernels by name (a graph replays the same kernels without the launch
gaps). Then the bench's own timed loop on the same model (its drained and
streamed steps, ``bench_loop_*``), which tells a cost of the bench's loop from
one of its process. The floor is what a step must read -- every weight but the
embedding table, plus this rank's cache shard -- over the HBM bandwidth measured
here by a large copy.
Writes decode_profile_rank<r>.json.
"""

from __future__ import annotations

import cProfile
import statistics
import sys
import time

import torch
from gpu_probe import cuda_times
from profile_prefill import cuda_kernels, kernel_ms_by_kind, kernels_by_name, llama3_8b, top_functions, write_rank_json
from torch.profiler import ProfilerActivity, profile

import fmsring
from fmsring.harness.session import left_pad
from fmsring.harness.timing import Clock, greedy_decode, padding_for_next_step


def hbm_gbps(gib: int = 4) -> float:
    """Copy bandwidth (read + write bytes per second) of a large device copy, median of 5."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / statistics.median(cuda_times(lambda: dst.copy_(src), reps=5, warmup=1)) / 1e6


def host_ms(fn, reps: int) -> tuple[list[float], list[str]]:
    """Host milliseconds of each of ``reps`` calls of ``fn``, the device drained before each: what
    the host spends preparing and launching a step while the device waits for it. And where, by
    function: a second ``reps`` calls under cProfile, its top lines by own time (cProfile's overhead
    inflates them, so the shares count, not the times)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    profiler = cProfile.Profile()
    for _ in range(reps):
        torch.cuda.synchronize()
        profiler.runcall(fn)
    return times, top_functions(profiler, "tottime", 25)


def bench_loop(model, ids, padding: dict, steps: int = 32) -> tuple[list[float], list[float]]:
    """The bench's timed generation (:func:`fmsring.harness.timing.greedy_decode`: a prefill, then
    ``steps`` drained and ``steps`` streamed steps) on ``model`` in this process: its drained steps'
    and its streamed intervals' ms, the first drained one (a new cache's capture) left out."""
    clock = Clock(torch.device("cuda", torch.cuda.current_device()))
    with torch.no_grad():
        timed = greedy_decode(model, ids, steps, padding)(clock)
    torch.cuda.synchronize()
    return [clock.ms(s) for s in timed.spans[1:]], [clock.ms(s) for s in timed.streamed]


def profile_steps(model, ids, padding: dict) -> dict:
    with torch.no_grad():
        logits, cache = model(ids, use_cache=True, last_n_tokens=1, **padding)
        tok = logits[:, -1:].argmax(-1)
        kwargs = dict(padding)

        def step():
            nonlocal cache, kwargs
            kwargs = padding_for_next_step(kwargs)
            _, cache = model(tok, past_key_value_states=cache, use_cache=True, last_n_tokens=1, **kwargs)

        times = cuda_times(step, reps=20)  # the first warm-up step captures the graph
        host, host_by_function = host_ms(step, reps=20)
        graph = model.graphs.current
        replay = cuda_times(graph.graph.replay, reps=20) if graph is not None else [float("nan")]
        model.cuda_graphs = False
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        model.cuda_graphs = True
    kernels = cuda_kernels(prof)
    kernel_ms, count = kernel_ms_by_kind(kernels)
    fill = cache.state.fills[model.strategy.rank]
    k0 = cache[0][0]
    cache_bytes = 2 * len(cache) * fill * k0[:, 0].numel() * k0.element_size()  # every sequence's
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embeddings)
    del cache, graph
    bench_drained, bench_streamed = bench_loop(model, ids, padding)
    return {
        # the bench's own loop in this process: a difference from graph_step_ms is the loop's, not the process's
        "bench_loop_ms_median": statistics.median(bench_drained),
        "bench_loop_stream_ms_median": statistics.median(bench_streamed),
        "graph_step_ms_median": statistics.median(times),
        # the host's part: its time inside the model call (no sync), and the captured graph replayed alone
        "host_call_ms_median": statistics.median(host),
        "replay_only_ms_median": statistics.median(replay),
        "host_by_own_time": host_by_function,
        "graph_step_ms_min": min(times),
        "graph_step_ms_max": max(times),
        "eager_kernels": count,
        "eager_kernel_ms": kernel_ms,
        "eager_kernels_by_name": kernels_by_name(kernels),
        "weight_bytes": weight_bytes,
        "cache_shard_bytes": cache_bytes,
    }


def main() -> None:
    out_dir, seq_len = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    variants = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    ring_tp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    fraction = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    rank, world, args, ids = llama3_8b(seq_len, seq_len + 512)
    ids = ids.expand(batch, -1)
    ids, padding = left_pad(ids, fraction) if fraction else (ids, {})
    bw = hbm_gbps()
    result: dict = {
        "gpu": torch.cuda.get_device_name(),
        "world_size": world,
        "ring_tp": ring_tp,
        "seq_len": seq_len,
        "batch": batch,
        "padding": fraction,
        "hbm_gbps": bw,
    }
    for name, fuse, layers in (("whole_layer", True, True), ("fused", True, False), ("unfused", False, False))[
        :variants
    ]:
        torch.manual_seed(0)
        model = fmsring.get_model(
            **args,
            distributed_strategy="ring",
            ring_tp=ring_tp,
            ring_check_inputs=False,
            ring_fuse=fuse,
            ring_fuse_layers=layers,
        )
        res = profile_steps(model.eval(), ids, padding)
        res["floor_ms"] = (res["weight_bytes"] + res["cache_shard_bytes"]) / bw / 1e6
        result[name] = res
        print(rank, name, {k: v for k, v in res.items() if not k.startswith("eager_kernel")}, flush=True)
        del model
        torch.cuda.empty_cache()
    shape = f"_b{batch}_pad{fraction:g}" if batch > 1 or fraction else ""
    write_rank_json(result, out_dir, f"decode_profile{shape}_rank{rank}.json")


if __name__ == "__main__":
    main()
