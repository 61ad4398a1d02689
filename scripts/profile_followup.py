"""Where a short follow-up's time goes: kernels, idle stream and host work, for the ring.

Run: torchrun --nproc_per_node=1 scripts/profile_followup.py OUT_DIR [CACHED [NEW]]
LLaMA-3-8B shapes, random weights, bf16: a cached prefill of CACHED tokens
(default 128K), then the follow-up of NEW tokens (default 512) on its cache,
which the prefill sized with room for them (as the bench does): the follow-up
writes into free slots and leaves the cache it was given a valid CACHED-token
cache, so the same follow-up runs again: one to compile, one warm-up, one
profiled. Writes
followup_profile_<CACHED>_<NEW>_rank<r>.json: the follow-up's wall time (CUDA events), its
kernel time by kind, the compute stream's idle time and largest idle spans,
and the host's ops by self CPU time. A follow-up far above its kernels is
host- or allocation-bound, and the idle spans and host ops say where.
"""

from __future__ import annotations

import functools
import sys

import torch
from profile_prefill import llama3_8b, profiled, write_rank_json

import fmsring
from fmsring.cache import headroom_for


def main() -> None:
    out_dir = sys.argv[1]
    cached = int(sys.argv[2]) if len(sys.argv) > 2 else 131072
    new = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    rank, world, args, ids = llama3_8b(cached + new, cached + new)
    room = headroom_for(new, world)  # without it the follow-up grows the buffers, and the cache it was given is gone
    model = fmsring.get_model(
        **args, distributed_strategy="ring", ring_check_inputs=False, ring_cache_headroom=room
    ).eval()
    with torch.no_grad():
        _, cache = model(ids[:, :cached], use_cache=True, last_n_tokens=1)
        model(ids[:, cached:], past_key_value_states=cache, use_cache=True, last_n_tokens=1)  # compiles
    followup = functools.partial(model, ids[:, cached:], past_key_value_states=cache, use_cache=True, last_n_tokens=1)
    result = {"gpu": torch.cuda.get_device_name(), "world_size": world, "cached": cached, "new": new}
    result["ring"] = profiled(followup, host_ops=30)
    write_rank_json(result, out_dir, f"followup_profile_{cached}_{new}_rank{rank}.json")


if __name__ == "__main__":
    main()
