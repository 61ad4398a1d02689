"""What a process's first decode step spends its time on: compiling, loading compiled code, capturing.

Run: torchrun --nproc_per_node=1 scripts/profile_first_step.py OUT_DIR NAME [SEQ_LEN] [--bench] [--cprofile]
     [--collect-at-load]
LLaMA-3-8B shapes, random weights, bf16: a cached prefill of SEQ_LEN tokens
(default 8K), then the first one-token step timed whole (CUDA-synchronised
wall time), then the second. The step's time is split by dynamo's own
compile metrics (``torch._dynamo.utils.compilation_time_metrics``): tracing
Python bytecode, the backend (AOTAutograd and inductor, cached or not),
loading compiled modules, building guards; what is left is the CUDA graph's
capture and the step itself; Python's garbage collections inside the step
are timed apart, each full one with the frames it set off in, and the objects
a full collection scans are counted at the step's end. The allocator is
configured as the bench and the CLI configure it (a ``PYTORCH_CUDA_ALLOC_CONF``
set outside wins). Run it twice over one ``TORCHINDUCTOR_CACHE_DIR``: the
second launch is what a user's second run pays. Writes
first_step_<NAME>_rank<r>.json, with inductor's cache hits and misses.

``--bench``: the same split of the bench's own first step instead -- ``fmsring.bench``
run in this process (ring decode of 8 tokens, one run, its rows in
results_first_step.csv), the split taken between the marks its clock sets around
that step -- since the bench's second launch has paid more than this script's.

``--cprofile``: the first step under cProfile as well, its top functions by cumulative and by own
time in the JSON -- where the time outside dynamo's phases goes (the profiler's overhead inflates
the Python-heavy phases, so such a launch's phase times are not the step's).

``--collect-at-load``: a full collection right after ``fmsring.get_model`` returns, where the user
waits for the weights anyway -- whether it keeps the full collection the loaded heap is due out of
the first step (the JSON's collection counts say), before the library is asked to do it.
"""

from __future__ import annotations

import cProfile
import gc
import os
import sys
import time
import traceback

import torch
from profile_prefill import llama3_8b, top_functions, write_rank_json
from torch._dynamo.utils import compilation_time_metrics, counters

import fmsring
from fmsring.allocator import configure_allocator

PHASES = {  # dynamo's metric names (seconds, summed over every compile of the step)
    "compile_total": "_compile.compile_inner",
    "bytecode_tracing": "bytecode_tracing",
    "backend_aot_inductor": "OutputGraph.call_user_compiler",
    "load_compiled_modules": "PyCodeCache.load_by_key_path",
    "wait_async_compile": "async_compile.wait",
    "build_guards": "build_guards",
}
FULL_COLLECTION_FRAMES = 16  # innermost frames kept of where a full collection set off


class StepWatch:
    """What is watched while the first step runs (``on``): Python's garbage collections, their
    time and how many of each generation, where each full one (generation 2, a scan of every
    tracked object) set off -- its innermost frames -- and how many objects are tracked when the
    watch ends (counted after the step's clock stopped); and, given a ``profiler``, cProfile."""

    def __init__(self, profiler: cProfile.Profile | None = None) -> None:
        self._on, self.ms, self.count, self._start = False, 0.0, [0, 0, 0], 0.0
        self.full_collection_frames: list[list[str]] = []
        self.tracked_at_end = 0
        self.profiler = profiler
        gc.callbacks.append(self._callback)

    @property
    def on(self) -> bool:
        return self._on

    @on.setter
    def on(self, value: bool) -> None:
        if self.profiler is not None and value != self._on:
            self.profiler.enable() if value else self.profiler.disable()
        if self._on and not value:
            self.tracked_at_end = len(gc.get_objects())
        self._on = value

    def _callback(self, phase: str, info: dict) -> None:
        if not self._on:
            return
        if phase == "start":
            if info["generation"] == 2:  # the frames below this callback: the allocation that set it off
                frames = traceback.extract_stack()[:-1][-FULL_COLLECTION_FRAMES:]
                self.full_collection_frames.append([f"{f.filename}:{f.lineno} {f.name}" for f in frames])
            self._start = time.perf_counter()  # after the frames: the collection's time is its own
        else:
            self.ms += (time.perf_counter() - self._start) * 1e3
            self.count[info["generation"]] += 1


def phase_totals() -> dict[str, float]:
    """Seconds dynamo has spent so far in each of :data:`PHASES`."""
    return {k: sum(compilation_time_metrics.get(v, [])) for k, v in PHASES.items()}


# the bench's point: LLaMA-3-8B's ring decode, one run of 8 tokens, as device_runs.sh's first-step section runs it
BENCH_ARGS = ["--architecture", "llama", "--variant", "3-8b", "--device", "cuda", "--dtype", "bfloat16",
              "--strategies", "ring", "--phases", "decode", "--decode-tokens", "8", "--no-check", "--repeats", "1",
              "--warmup", "0"]  # fmt: skip


def bench_first_step(out_dir: str, seq_len: int, watch: StepWatch) -> tuple[float, dict[str, float]]:
    """The bench's first decode step, run by the bench in this process: (its wall ms, dynamo's
    seconds by phase inside it), between the clock's third and fourth marks (the prefill's two
    come first); what ``watch`` watches runs inside it. The harness is imported
    here, so the script's own step runs in a process without it, as before."""
    from fmsring.harness import bench, timing

    marks: list[tuple[float, dict[str, float]]] = []
    mark = timing.Clock.mark

    def noted(clock):
        if len(marks) == 3 and clock.cuda:  # the end of the first step: after the device, as the bench's own mark
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), phase_totals()))
        watch.on = len(marks) == 3
        return mark(clock)

    timing.Clock.mark = noted
    try:
        bench.main([*BENCH_ARGS, "--seq-lens", str(seq_len), "--out", os.path.join(out_dir, "results_first_step.csv")])
    finally:
        timing.Clock.mark = mark
    (start, before), (end, after) = marks[2], marks[3]
    return (end - start) * 1e3, {k: after[k] - before[k] for k in PHASES}


def timed_step(model, token, cache) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, cache = model(token, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, cache


def collect_after_loading() -> None:
    """``fmsring.get_model`` (as the bench and this script call it) followed by a full collection."""
    load = fmsring.get_model

    def get_model_then_collect(*args, **kwargs):
        model = load(*args, **kwargs)
        gc.collect()
        return model

    fmsring.get_model = get_model_then_collect


def main() -> None:
    positional = [a for a in sys.argv[1:] if not a.startswith("--")]
    out_dir, name = positional[0], positional[1]
    seq_len = int(positional[2]) if len(positional) > 2 else 8192
    alloc_conf = configure_allocator()
    if "--collect-at-load" in sys.argv:
        collect_after_loading()
    profiler = cProfile.Profile() if "--cprofile" in sys.argv else None
    watch = StepWatch(profiler)
    if "--bench" in sys.argv:
        first_ms, spent = bench_first_step(out_dir, seq_len, watch)
        rank, world, second_ms = 0, 1, float("nan")
    else:
        rank, world, args, ids = llama3_8b(seq_len, seq_len + 64)
        model = fmsring.get_model(**args, distributed_strategy="ring", ring_check_inputs=False).eval()
        with torch.no_grad():
            logits, cache = model(ids, use_cache=True, last_n_tokens=1)
            token = logits[:, -1:].argmax(-1)
            before = phase_totals()
            watch.on = True
            first_ms, cache = timed_step(model, token, cache)
            watch.on = False
            spent = {k: v - before[k] for k, v in phase_totals().items()}
            second_ms, cache = timed_step(model, token, cache)
    spent = {k: round(v * 1e3, 1) for k, v in spent.items()}
    result = {
        "gpu": torch.cuda.get_device_name(), "world_size": world, "seq_len": seq_len, "launch": name,
        "first_step_ms": round(first_ms, 1), "second_step_ms": round(second_ms, 3),
        **{f"{k}_ms": v for k, v in spent.items()},
        "capture_and_run_ms": round(first_ms - spent["compile_total"], 1),
        "gc_ms": round(watch.ms, 1), "gc_collections_by_generation": watch.count,
        "gc_full_collection_frames": watch.full_collection_frames, "gc_tracked_at_end": watch.tracked_at_end,
        "alloc_conf": alloc_conf, "collect_at_load": "--collect-at-load" in sys.argv,
        "inductor_cache_in_process": {k: v for k, v in counters["inductor"].items() if "cache" in k},
    }  # fmt: skip
    if profiler is not None:
        result["by_cumulative_time"] = top_functions(profiler, "cumtime", 60)
        result["by_own_time"] = top_functions(profiler, "tottime", 30)
    write_rank_json(result, out_dir, f"first_step_{name}_rank{rank}.json")


if __name__ == "__main__":
    main()
