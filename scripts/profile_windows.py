"""A sliding-window layer's prefill attention against a full layer's, on one GPU.

Run: python scripts/profile_windows.py OUT_DIR [SEQ_LEN [WINDOW]]
gpt-oss-20b's attention shapes (64 query heads, 8 kv-heads, head dim 64, bf16),
one layer's prefill at world 1 as the ring runs it: the causal block of
SEQ_LEN tokens (one fused call) against the same block through a window of
WINDOW keys (:func:`fmsring.windows.windowed_blocks`: flash attention's own
window on a GPU in half precision), and through the band of query tiles with
their keys and a bias (:func:`fmsring.windows.band_attention`, what fp32 and a
CPU run; tiles cut once and reused, as a prefill's window layers reuse them).
CUDA events, median of 10. The ideal ratio is the causal block's scores over
the window's, n/2 against w per query. The window is first checked against
the dense masked block (fp32 math) at 4K. Writes windows_profile.json.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from gpu_probe import cuda_times

from fmsring.kernels import attention_with_lse, math_attention_with_lse
from fmsring.layout import BlockCall
from fmsring.windows import LayerAttention, band, band_attention, windowed_blocks

HEADS, KV_HEADS, HEAD_DIM = 64, 8, 64


def qkv(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator("cuda").manual_seed(n)
    q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in "kv")
    return q, k, v


def windowed(q, k, v, layer: LayerAttention) -> tuple[torch.Tensor, torch.Tensor]:
    n = q.shape[2]
    index = torch.arange(n)
    ((_, blk),) = windowed_blocks(q, k, v, HEAD_DIM**-0.5, (BlockCall(0, n, 0, n, True),), layer, index, index)
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
    window_ms = statistics.median(cuda_times(lambda: windowed(q, k, v, layer)))
    index = torch.arange(n)
    tiles = band(layer, index, index, "cuda")
    tiled = statistics.median(cuda_times(lambda: band_attention(q, k, v, HEAD_DIM**-0.5, tiles)))
    result = {
        "gpu": torch.cuda.get_device_name(), "seq_len": n, "window": window, **check,
        "full_layer_ms": round(full, 3), "window_layer_ms": round(window_ms, 3), "ratio": round(full / window_ms, 2),
        "band_tiles_ms": round(tiled, 3), "ratio_band_tiles": round(full / tiled, 2),
        "ideal_ratio": round((n + 1) / 2 / window, 1),
    }  # fmt: skip
    print(json.dumps(result))
    with open(f"{out_dir}/windows_profile.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32768, int(sys.argv[3]) if len(sys.argv) > 3 else 128)
