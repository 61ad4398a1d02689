"""The decode step's projections alone: cuBLAS as the step calls it now against a Triton GEMV of
our own, per LLaMA-3-8B projection at batch 1 and 4, each call timed inside a CUDA graph (as the
step runs it).

Why: the one-GPU decode profile (docs/performance.md) puts the largest share of the step's time
over its floor in the matmuls, cuBLAS reading the small projections' weights (QKV, and the output
and down projections it splits along K, plus a reduction kernel each) well below the copy rate
that it reaches on the gate/up projection. A GEMV of our own is only worth putting in the step if
it reads every projection at least as fast; it could then also take the RMSNorm before it
(prologue) and the residual add or SwiGLU after it (epilogue): two to three kernels fewer a layer.
This answers both, before any of it goes into the step.

Variants, each checked against fp32 math (``rel_err``), for its projection's place in the layer:

* ``cublas``: ``F.linear`` alone, as the step calls it now (the fusions' work not included);
* ``cublas_fused``: the same with its layer's elementwise work around it, compiled: what the step's
  compiled layer runs now (cuBLAS between inductor's kernels), the baseline ``triton_fused`` must beat;
* ``triton``: ``y = x W^T``, one program per ``BLOCK_N`` output columns over all of K;
* ``triton_fused``: the same with the layer's fusion: RMSNorm of x first (QKV), residual added
  after (output, down), RMSNorm first and ``silu(gate) * up`` after (gate/up: each program
  reads the gate rows and the matching up rows).

Each Triton variant runs at every configuration of :data:`CONFIGS` and reports its best (the
others stay in the CSV). The bandwidth is the weight bytes over the time, beside the copy rate of
this GPU measured in the same run (``copy_gbps``, ``of_copy``). Writes a CSV:

    python scripts/gemv_sweep.py OUT.csv

Without a GPU it checks the Triton variants' values through Triton's interpreter on small shapes
and writes nothing.
"""

from __future__ import annotations

import csv
import itertools
import os
import sys

import torch

if not torch.cuda.is_available():  # read when the kernel is defined: before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fmsring.rates import CUDA_SIZES, memory_gbps  # noqa: E402

EPS = 1e-5
# (name, output columns N, input dim K, fusion); gate/up's N is both halves, as FMS stores them
PROJECTIONS = [
    ("qkv", 6144, 4096, "norm"),
    ("o", 4096, 4096, "residual"),
    ("gate_up", 28672, 4096, "swiglu"),
    ("down", 4096, 14336, "residual"),
]
# (output columns per program, input columns per iteration, warps, pipeline stages), each compiled once
# per variant and batch: few enough that the sweep fits one device call beside other sections
CONFIGS = list(itertools.product((4, 8, 16, 32), (256, 512), (4, 8), (3,)))


@triton.jit
def _gemv_kernel(
    X, W, G, R, Y,
    rows, n_out, k_in, half, eps,
    stride_x, stride_w, stride_r, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr,
):  # fmt: skip
    """Y [rows, n_out] = epilogue(prologue(X) W^T) for X [rows, k_in], W [n_out (x2 with SWIGLU), k_in].

    NORM: X's rows RMS-normalised with weight G [k_in] (the sum of squares accumulates in the same
    loop, the 1/rms scales the fp32 accumulator once at the end). SWIGLU: silu(X Wg^T) * (X Wu^T),
    Wg the first ``half`` rows of W and Wu the rest. RESIDUAL: R [rows, n_out] added."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    col_ok = cols < n_out
    row_ok = m < rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    squares = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_in
        x = tl.load(X + m[:, None] * stride_x + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        if NORM:
            squares += tl.sum(x * x, 1)
            x = x * tl.load(G + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        w_ok = col_ok[:, None] & k_ok[None, :]
        w = tl.load(W + cols[:, None].to(tl.int64) * stride_w + k[None, :], mask=w_ok, other=0.0)
        acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], 2)
        if SWIGLU:
            wu = tl.load(W + (cols + half)[:, None].to(tl.int64) * stride_w + k[None, :], mask=w_ok, other=0.0)
            up += tl.sum(x[:, None, :] * wu.to(tl.float32)[None, :, :], 2)
    if NORM:
        inv_rms = tl.rsqrt(squares / k_in + eps)
        acc = acc * inv_rms[:, None]
        up = up * inv_rms[:, None]
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * up
    out_ok = row_ok[:, None] & col_ok[None, :]
    if RESIDUAL:
        acc += tl.load(R + m[:, None] * stride_r + cols[None, :], mask=out_ok, other=0.0).to(tl.float32)
    tl.store(Y + m[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty), mask=out_ok)


def gemv(x, w, config, g=None, residual=None, swiglu=False):
    """The kernel on x [rows, K] and w [N, K]; ``config`` one of :data:`CONFIGS`."""
    block_n, block_k, warps, stages = config
    rows, k_in = x.shape
    n_out = w.shape[0] // 2 if swiglu else w.shape[0]
    y = x.new_empty(rows, n_out)
    r = residual if residual is not None else y
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, w, g if g is not None else x, r, y,
        rows, n_out, k_in, n_out, EPS,
        x.stride(0), w.stride(0), r.stride(0), y.stride(0),
        BLOCK_M=triton.next_power_of_2(rows), BLOCK_N=block_n, BLOCK_K=block_k,
        NORM=g is not None, RESIDUAL=residual is not None, SWIGLU=swiglu,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def as_the_layer_does(x, w, fusion, g, residual):
    """The projection with its fusion's elementwise work (None: none) as FMS computes it (the norm in
    fp32, rounded before its weight; SwiGLU and the residual on the rounded product): compiled, what
    the step's compiled layer runs now, cuBLAS between inductor's kernels; on fp32 inputs, the
    reference (:func:`reference`)."""
    if fusion in ("norm", "swiglu"):
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * g
    y = torch.nn.functional.linear(x, w)
    if fusion == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y + residual if fusion == "residual" else y


def reference(x, w, fusion, g, residual):
    """fp32 math of a projection with its layer's fusion (None: the product alone)."""
    return as_the_layer_does(x.float(), w.float(), fusion, g.float(), residual.float())


def variants(x, w, fusion, g, residual):
    """name -> (call taking a config or None, fusion included); ``cublas*`` only on a GPU."""
    fused = {
        "norm": {"g": g},
        "residual": {"residual": residual},
        "swiglu": {"g": g, "swiglu": True},
    }[fusion]
    out = {
        "triton": (lambda c: gemv(x, w, c), False),
        "triton_fused": (lambda c: gemv(x, w, c, **fused), True),
    }
    if x.is_cuda:
        torch._dynamo.reset()  # each projection compiles anew: never past dynamo's recompile limit into eager
        layer = torch.compile(as_the_layer_does)
        out["cublas"] = (lambda _: torch.nn.functional.linear(x, w), False)
        out["cublas_fused"] = (lambda _: layer(x, w, fusion, g, residual), True)
    return out


def inputs(rows, n_out, k_in, fusion, dtype, device):
    x = torch.randn(rows, k_in, dtype=dtype, device=device)
    w = torch.randn(n_out, k_in, dtype=dtype, device=device) / k_in**0.5
    g = 1 + 0.1 * torch.randn(k_in, dtype=dtype, device=device)
    half = n_out // 2 if fusion == "swiglu" else n_out
    residual = torch.randn(rows, half, dtype=dtype, device=device)
    return x, w, g, residual


def rel_err(got, want) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def check_on_cpu() -> None:
    """Every fusion's values through the interpreter (fp32: it has no bf16), odd sizes, 1 and 3 rows."""
    for (name, _, _, fusion), rows in itertools.product(PROJECTIONS, (1, 3)):
        n_out, k_in = (2 * 37, 100) if fusion == "swiglu" else (37, 100)
        x, w, g, residual = inputs(rows, n_out, k_in, fusion, torch.float32, "cpu")
        want = reference(x, w, fusion, g, residual)
        for variant, (call, includes) in variants(x, w, fusion, g, residual).items():
            got = call((16, 32, 4, 2))
            err = rel_err(got, want if includes else reference(x, w, None, g, residual))
            assert err < 1e-5, f"{name} {variant} rows={rows}: rel_err {err}"
            print(f"{name:8} {variant:13} rows={rows}  rel_err {err:.1e}")


def main() -> None:
    if not torch.cuda.is_available():
        check_on_cpu()
        return
    from decode_kernel_sweep import graph_ms  # a CUDA graph of back-to-back calls, as in the step

    out = sys.argv[1]
    copy_gbps = memory_gbps(torch.device("cuda"), CUDA_SIZES.copy_bytes)  # the bench's own copy rate
    fields = ["projection", "rows", "n_out", "k_in", "variant", "config", "us", "weight_gbps", "copy_gbps",
              "of_copy", "rel_err", "best"]  # fmt: skip
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for (name, n_out, k_in, fusion), rows in itertools.product(PROJECTIONS, (1, 4)):
            x, w, g, residual = inputs(rows, n_out, k_in, fusion, torch.bfloat16, "cuda")
            want = reference(x, w, fusion, g, residual)
            plain = reference(x, w, None, g, residual)
            for variant, (call, includes) in variants(x, w, fusion, g, residual).items():
                results = []
                for config in [None] if variant.startswith("cublas") else CONFIGS:
                    try:
                        err = rel_err(call(config), want if includes else plain)
                        us = graph_ms(lambda: call(config)) * 1e3  # noqa: B023 -- called here, in the loop
                    except Exception as e:  # noqa: BLE001 -- a configuration the compiler refuses is a row
                        print(f"{name} {variant} {config}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    gbps = w.numel() * w.element_size() / us / 1e3
                    results.append({"projection": name, "rows": rows, "n_out": n_out, "k_in": k_in,
                                    "variant": variant, "config": config, "us": round(us, 3),
                                    "weight_gbps": round(gbps, 1), "copy_gbps": round(copy_gbps, 1),
                                    "of_copy": round(gbps / copy_gbps, 3), "rel_err": err, "best": False})  # fmt: skip
                if not results:
                    continue
                best = min(results, key=lambda r: r["us"])
                best["best"] = True
                writer.writerows(results)
                f.flush()
                print(f"{name:8} rows={rows} {variant:13} {best['us']:9.2f} us  {best['of_copy']:.0%} of copy"
                      f"  {best['config']}  rel_err {best['rel_err']:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
