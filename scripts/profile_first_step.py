"""What a process's first decode step spends its time on: compiling, loading compiled code, capturing.

Run: torchrun --nproc_per_node=1 scripts/profile_first_step.py OUT_DIR NAME [SEQ_LEN]
LLaMA-3-8B shapes, random weights, bf16: a cached prefill of SEQ_LEN tokens
(default 8K), then the first one-token step timed whole (CUDA-synchronised
wall time), then the second. The step's time is split by dynamo's own
compile metrics (``torch._dynamo.utils.compilation_time_metrics``): tracing
Python bytecode, the backend (AOTAutograd and inductor, cached or not),
loading compiled modules, building guards; what is left is the CUDA graph's
capture and the step itself; Python's garbage collections inside the step
are timed apart. The allocator is configured as the bench and the CLI
configure it (a ``PYTORCH_CUDA_ALLOC_CONF`` set outside wins). Run it twice
over one ``TORCHINDUCTOR_CACHE_DIR``: the second launch is what a user's
second run pays. Writes first_step_<NAME>_rank<r>.json, with inductor's cache
hits and misses.
"""

from __future__ import annotations

import gc
import sys
import time

import torch
from profile_prefill import llama3_8b, write_rank_json
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


class Collections:
    """Time spent in Python's garbage collections while ``on``, and how many of each generation."""

    def __init__(self) -> None:
        self.on, self.ms, self.count, self._start = False, 0.0, [0, 0, 0], 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if not self.on:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._start) * 1e3
            self.count[info["generation"]] += 1


def timed_step(model, token, cache) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, cache = model(token, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, cache


def main() -> None:
    out_dir, name = sys.argv[1], sys.argv[2]
    seq_len = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
    alloc_conf = configure_allocator()
    collections = Collections()
    rank, world, args, ids = llama3_8b(seq_len, seq_len + 64)
    model = fmsring.get_model(**args, distributed_strategy="ring", ring_check_inputs=False).eval()
    with torch.no_grad():
        logits, cache = model(ids, use_cache=True, last_n_tokens=1)
        token = logits[:, -1:].argmax(-1)
        before = {k: sum(compilation_time_metrics.get(v, [])) for k, v in PHASES.items()}
        collections.on = True
        first_ms, cache = timed_step(model, token, cache)
        collections.on = False
        spent = {k: round((sum(compilation_time_metrics.get(v, [])) - before[k]) * 1e3, 1) for k, v in PHASES.items()}
        second_ms, cache = timed_step(model, token, cache)
    result = {
        "gpu": torch.cuda.get_device_name(), "world_size": world, "seq_len": seq_len, "launch": name,
        "first_step_ms": round(first_ms, 1), "second_step_ms": round(second_ms, 3),
        **{f"{k}_ms": v for k, v in spent.items()},
        "capture_and_run_ms": round(first_ms - spent["compile_total"], 1),
        "gc_ms": round(collections.ms, 1), "gc_collections_by_generation": collections.count,
        "alloc_conf": alloc_conf,
        "inductor_cache_in_process": {k: v for k, v in counters["inductor"].items() if "cache" in k},
    }  # fmt: skip
    write_rank_json(result, out_dir, f"first_step_{name}_rank{rank}.json")


if __name__ == "__main__":
    main()
