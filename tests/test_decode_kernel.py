"""fmsring's Triton decode kernel against fp32 math: on a GPU as it runs there (bf16, fp16), and on a
CPU through Triton's interpreter (fp16, fp32: the interpreter has no bf16), so every CI run
checks the kernel's indexing -- GQA rows, several query tokens, chunks, empty ones, a head dim
that is no power of two -- and not only the GPU runs."""

from __future__ import annotations

import inspect
import random

import pytest
import torch

pytest.importorskip("triton")  # a CPU without it has no kernel to test; tests/conftest.py interprets it

from fmsring import decode_kernel  # noqa: E402
from fmsring.kernels import (  # noqa: E402
    decode_attention_with_lse,
    math_attention_with_lse,
    split_kv_decode_with_lse,
)
from fmsring.merge import merge_split  # noqa: E402
from fmsring.split_kv import TILE_SLOTS, split_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16, torch.float32]


def test_the_plans_cut_chunks_in_the_kernels_tiles():
    """The kernel's tile is the plans' (one constant, read at launch): tuning it moves both."""
    assert "BLOCK_N=plans.TILE_SLOTS" in inspect.getsource(decode_kernel)
    assert decode_kernel.plans.TILE_SLOTS == TILE_SLOTS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,kvh,d,lq", [(8, 2, 64, 1), (4, 4, 32, 1), (6, 2, 80, 3)])
def test_each_chunk_partial_is_attention_over_its_slots(dtype, h, kvh, d, lq):
    """Every chunk's (out, lse) against fp32 math over exactly its slots; a chunk with no slot
    gives out 0 and lse -inf. Caches of odd capacity, chunks of odd starts and lengths."""
    b, cap, splits = 2, random.randrange(200, 257), 3
    q = torch.randn(b, h, lq, d, device=DEVICE, dtype=dtype)
    kc, vc = (torch.randn(b, cap, kvh, d, device=DEVICE, dtype=dtype) for _ in range(2))
    chunks = [(0, 70), (70, 1), (100, cap - 100), (5, 0), (cap - 9, 9), (0, cap)]  # (start, used), seq-major
    starts, used = (torch.tensor(col, dtype=torch.int32, device=DEVICE) for col in zip(*chunks))
    out, lse = decode_kernel.split_kv_decode(q, kc, vc, starts, used, d**-0.5)
    g = h // kvh
    assert out.shape == (splits, b, kvh, g * lq, d) and lse.shape == (splits, b, kvh, g * lq)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for i in range(b):
        for c in range(splits):
            lo, n = chunks[i * splits + c]
            got_out, got_lse = out[c, i].view(kvh, g, lq, d), lse[c, i].view(kvh, g, lq)
            if n == 0:
                assert torch.all(got_out == 0) and torch.all(got_lse == float("-inf"))
                continue
            k, v = (t[i : i + 1, lo : lo + n].transpose(1, 2) for t in (kc, vc))
            ref, ref_lse = math_attention_with_lse(q[i : i + 1], k, v, d**-0.5)
            torch.testing.assert_close(got_out.cpu(), ref.view(kvh, g, lq, d).cpu(), rtol=tol, atol=tol)
            torch.testing.assert_close(got_lse.cpu(), ref_lse.view(kvh, g, lq).cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_kv_decode_merges_to_attention_over_the_filled_slots(dtype):
    """The whole path a decode step takes -- plan, kernel, merge -- at several chunk counts against
    fp32 math over each sequence's first kv_lens slots: a partly filled, an empty and a full cache."""
    b, h, kvh, d, cap = 3, 8, 2, 64, random.randrange(300, 341)
    lens = torch.tensor([random.randrange(1, cap), 0, cap], dtype=torch.int32, device=DEVICE)
    q = torch.randn(b, h, 1, d, device=DEVICE, dtype=dtype)
    kc, vc = (torch.randn(b, cap, kvh, d, device=DEVICE, dtype=dtype) for _ in range(2))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for splits, out_dtype in ((1, torch.float32), (2, dtype), (5, torch.float32), (5, dtype)):
        out, lse = split_kv_decode_with_lse(q, kc, vc, d**-0.5, split_kv(lens, splits), out_dtype=out_dtype)
        assert out.dtype == out_dtype and out.transpose(1, 2).is_contiguous()  # the output projection's layout
        for i, n in enumerate(lens.tolist()):
            if n == 0:
                assert torch.all(lse[i] == float("-inf")) and torch.all(out[i] == 0)
                continue
            k, v = kc[i : i + 1, :n].transpose(1, 2), vc[i : i + 1, :n].transpose(1, 2)
            ref, ref_lse = math_attention_with_lse(q[i : i + 1], k, v, d**-0.5)
            torch.testing.assert_close(
                out[i : i + 1].float().cpu(), ref.cpu(), rtol=tol, atol=tol, msg=f"{splits} chunks"
            )
            torch.testing.assert_close(lse[i : i + 1].cpu(), ref_lse.cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_padding_bias_hides_slots_exactly(dtype):
    """A per-slot additive bias (what a padded batch's mask becomes): finite values and -inf,
    a whole first tile of one sequence hidden (the kernel's running max starts at -inf there), and
    a sequence with every slot hidden (out 0, lse -inf), and NaN past each fill, where a step
    leaves its bias unwritten (``fmsring.masks.decode_bias``) -- against fp32 math with the same
    bias, through the decode step's entry point, at several chunk counts."""
    b, h, kvh, d, cap = 3, 8, 2, 64, random.randrange(200, 260)
    lens = torch.tensor([cap - 3, random.randrange(70, cap), 40], dtype=torch.int32, device=DEVICE)
    q = torch.randn(b, h, 1, d, device=DEVICE, dtype=dtype)
    kc, vc = (torch.randn(b, cap, kvh, d, device=DEVICE, dtype=dtype) for _ in range(2))
    bias = torch.randn(b, cap, device=DEVICE).masked_fill(torch.rand(b, cap, device=DEVICE) < 0.3, float("-inf"))
    bias[1, :70] = float("-inf")
    bias[2] = float("-inf")
    for i, n in enumerate(lens.tolist()):
        bias[i, n:] = float("nan")
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    ref, ref_lse = decode_attention_with_lse(q.float(), kc.float(), vc.float(), lens, d**-0.5, None, bias)
    assert torch.all(ref_lse[2] == float("-inf")) and torch.all(ref[2] == 0)
    for splits in (1, 3, 4):
        out, lse = split_kv_decode_with_lse(q, kc, vc, d**-0.5, split_kv(lens, splits), bias)
        torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=tol, atol=tol, msg=f"{splits} chunks")
        torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), rtol=tol, atol=tol, msg=f"{splits} chunks")


@pytest.mark.parametrize("out_dtype", [torch.float32, DTYPES[0]])
def test_one_kernel_merges_the_chunks_as_merge_split_does(out_dtype):
    """merge_chunks against merge_split (torch, fp32), laid out as the layer's query [b, Lq, h, d]:
    odd chunk counts, several query tokens, chunks that saw nothing on some rows and a row that no
    chunk saw (out 0, lse -inf), out in fp32 (the ring merges it further) and in the query's dtype."""
    for splits, b, h, kvh, lq, d in ((5, 1, 8, 2, 1, 16), (3, 2, 4, 4, 3, 80), (1, 1, 4, 1, 2, 16)):
        g = h // kvh
        out = torch.randn(splits, b, kvh, g * lq, d, device=DEVICE)
        lse = torch.randn(splits, b, kvh, g * lq, device=DEVICE) * 3
        lse[0, 0, 0, :] = float("-inf")  # the first chunk saw nothing on these rows
        lse[:, -1, -1, -1] = float("-inf")  # nor any chunk on this one
        got, got_lse = decode_kernel.merge_chunks(out, lse, lq, out_dtype)
        want, want_lse = merge_split(out.view(splits, b, kvh, g, lq, d), lse.view(splits, b, kvh, g, lq))
        assert got.shape == (b, lq, h, d) and got.dtype == out_dtype
        assert torch.all(got[-1, lq - 1, h - 1] == 0) and got_lse[-1, h - 1, lq - 1] == float("-inf")
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), want.transpose(1, 2), rtol=tol, atol=tol, msg=f"{splits} chunks")
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-6, msg=f"{splits} chunks")


def test_the_kernel_refuses_a_strided_head_dim():
    q = torch.zeros(1, 2, 1, 32, device=DEVICE, dtype=torch.float16)
    cache = torch.zeros(1, 64, 2, 32, device=DEVICE, dtype=torch.float16)
    starts, used = (torch.zeros(1, dtype=torch.int32, device=DEVICE) for _ in range(2))
    with pytest.raises(ValueError, match="head dim"):
        decode_kernel.split_kv_decode(
            q, cache.transpose(-1, -2).contiguous().transpose(-1, -2), cache, starts, used, 1.0
        )


def test_the_op_passes_torchs_custom_op_checks():
    """torch.library.opcheck of both ops: the schema, the fake (meta) function a compiled layer
    traces with -- shapes from the plan's tensor lengths -- and dynamic shapes through AOT dispatch."""
    q = torch.randn(2, 4, 1, 32, device=DEVICE, dtype=DTYPES[0])
    kc, vc = (torch.randn(2, 130, 2, 32, device=DEVICE, dtype=DTYPES[0]) for _ in range(2))
    plan = split_kv(torch.tensor([130, 7], dtype=torch.int32, device=DEVICE), 3)
    torch.library.opcheck(decode_kernel.split_kv_decode, (q, kc, vc, plan.starts, plan.used, 32**-0.5))
    out, lse = decode_kernel.split_kv_decode(q, kc, vc, plan.starts, plan.used, 32**-0.5)
    torch.library.opcheck(decode_kernel.merge_chunks, (out, lse, 1, DTYPES[0]))


def test_a_compiled_caller_follows_new_cache_sizes_and_chunk_counts():
    """What the whole-layer decode compile does with the op: traced through its fake function, the
    cache's capacity and the chunk count become dynamic, and the compiled call keeps matching
    the eager one."""
    torch._dynamo.reset()
    compiled = torch.compile(split_kv_decode_with_lse, fullgraph=True, dynamic=None)
    for cap, splits in ((96, 2), (160, 3), (224, 5)):
        q = torch.randn(1, 4, 1, 32, device=DEVICE, dtype=DTYPES[0])
        kc, vc = (torch.randn(1, cap, 2, 32, device=DEVICE, dtype=DTYPES[0]) for _ in range(2))
        plan = split_kv(torch.tensor([cap - 5], dtype=torch.int32, device=DEVICE), splits)
        for got, want in zip(compiled(q, kc, vc, 32**-0.5, plan), split_kv_decode_with_lse(q, kc, vc, 32**-0.5, plan)):
            torch.testing.assert_close(got, want, msg=f"capacity {cap}, {splits} chunks")
