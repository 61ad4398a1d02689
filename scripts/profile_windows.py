"""A sliding-window layer's prefill attention against a full layer's, on one GPU.

Run: python scripts/profile_windows.py OUT_DIR [SEQ_LEN [WINDOW]]
gpt-oss-20b's attention shapes (64 query heads, 8 kv-heads, head dim 64, bf16),
one layer's prefill at world 1 as the ring runs it: the causal block of
SEQ_LEN tokens (one fused call) against the same block through a window of
WINDOW keys (:func:`fmsring.windows.windowed_blocks`: query tiles against the
keys they can see, the band as bias), with the tiles cut for the call and
with them reused as a prefill's later window layers reuse them. CUDA events,
median of 10. The ideal
ratio is the causal block's scores over the band's, n/2 against w per query.
The band is first checked against the dense masked block (fp32 math) at 4K.
Writes windows_profile.json.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from gpu_probe import cuda_times

from fmsring.kernels import attention_with_lse, math_attention_with_lse
from fmsring.layout import BlockCall
from fmsring.windows import LayerAttention, windowed_blocks

HEADS, KV_HEADS, HEAD_DIM = 64, 8, 64


def qkv(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator("cuda").manual_seed(n)
    q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in "kv")
    return q, k, v


def windowed(q, k, v, layer: LayerAttention, bands: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = q.shape[2]
    index = torch.arange(n)
    call = (BlockCall(0, n, 0, n, True),)
    ((_, blk),) = windowed_blocks(q, k, v, HEAD_DIM**-0.5, call, layer, index, index, bands)
    return blk


def main(out_dir: str, n: int, window: int) -> None:
    layer = LayerAttention(None, window)
    q, k, v = qkv(4096)
    out, lse = windowed(q, k, v, layer)
    index = torch.arange(4096, device="cuda")
    want, want_lse = math_attention_with_lse(q, k, v, HEAD_DIM**-0.5, bias=layer.bias(index, index, causal=True))
    check = {
        "max_abs_err_4k": (out.float() - want).abs().max().item(),
        "lse_err_4k": (lse - want_lse).abs().max().item(),
    }
    del out, lse, want, want_lse
    q, k, v = qkv(n)
    full = statistics.median(cuda_times(lambda: attention_with_lse(q, k, v, HEAD_DIM**-0.5, causal=True)))
    band = statistics.median(cuda_times(lambda: windowed(q, k, v, layer)))
    bands: dict = {}
    windowed(q, k, v, layer, bands)  # a prefill's first window layer cuts the tiles; the others reuse them
    reused = statistics.median(cuda_times(lambda: windowed(q, k, v, layer, bands)))
    result = {
        "gpu": torch.cuda.get_device_name(), "seq_len": n, "window": window, **check,
        "full_layer_ms": round(full, 3), "window_layer_ms": round(band, 3), "ratio": round(full / band, 2),
        "window_layer_reused_ms": round(reused, 3), "ratio_reused": round(full / reused, 2),
        "ideal_ratio": round((n + 1) / 2 / window, 1),
    }  # fmt: skip
    print(json.dumps(result))
    with open(f"{out_dir}/windows_profile.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32768, int(sys.argv[3]) if len(sys.argv) > 3 else 128)
