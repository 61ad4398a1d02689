"""Blockwise attention + log-sum-exp merge against a float64 reference.

Inputs are fresh random draws each run (no fixed seed): the merge must be
exact for any input, not for one.
"""

import random

import pytest
import torch

from fmsring.kernels import (
    attention_with_lse,
    cpu_flash_attention_with_lse,
    decode_attention_with_lse,
    decode_split_kv,
    math_attention_with_lse,
    select_kernel,
    split_kv_decode_with_lse,
)
from fmsring.merge import merge_into, merge_pair, merge_split, merge_stacked
from fmsring.split_kv import TILE_SLOTS, split_kv, split_kv_chunks


def reference(q, k, v, scale, bias):
    """Plain float64 softmax attention with K/V expanded to the query heads."""
    g = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(g, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale + bias.double().unsqueeze(1)
    return torch.softmax(s, -1) @ v


def random_case(h, kvh, lq, lk, b=2, d=16):
    q = torch.randn(b, h, lq, d)
    k = torch.randn(b, kvh, lk, d) * 2
    v = torch.randn(b, kvh, lk, d)
    return q, k, v


@pytest.mark.parametrize("h,kvh", [(4, 4), (8, 2), (6, 1)])
def test_random_blocks_merged_in_random_order_equal_full_attention(h, kvh):
    lq, lk = random.randint(1, 40), random.randint(2, 90)
    q, k, v = random_case(h, kvh, lq, lk)
    bias = torch.where(torch.rand(2, lq, lk) < 0.3, float("-inf"), torch.randn(2, lq, lk))
    bias[..., 0] = 0.0  # every row sees at least one key
    cuts = sorted(random.sample(range(1, lk), random.randint(1, min(5, lk - 1))))
    blocks = list(zip([0] + cuts, cuts + [lk]))
    random.shuffle(blocks)
    out = torch.zeros(q.shape)
    lse = torch.full(q.shape[:-1], float("-inf"))
    for lo, hi in blocks:
        merge_into(out, lse, *attention_with_lse(q, k[:, :, lo:hi], v[:, :, lo:hi], 0.25, bias=bias[..., lo:hi]))
    ref = reference(q, k, v, 0.25, bias)
    assert (out.double() - ref).abs().max() < 1e-5


def test_causal_block_is_lower_triangle():
    q, k, v = random_case(4, 2, 17, 17)
    causal = torch.zeros(17, 17).masked_fill_(torch.ones(17, 17, dtype=torch.bool).triu(1), float("-inf"))
    out, _ = attention_with_lse(q, k, v, 0.3, causal=True)
    assert (out.double() - reference(q, k, v, 0.3, causal.expand(2, 17, 17))).abs().max() < 1e-5


def test_fully_masked_rows_contribute_nothing():
    q, k, v = random_case(2, 2, 3, 5)
    bias = torch.zeros(2, 3, 5)
    bias[:, 1] = float("-inf")
    out, lse = attention_with_lse(q, k, v, 0.5, bias=bias)
    assert torch.isneginf(lse[:, :, 1]).all() and (out[:, :, 1] == 0).all()
    acc, acc_lse = out.clone(), lse.clone()
    merge_into(acc, acc_lse, *attention_with_lse(q, k, v, 0.5))
    assert torch.isfinite(acc).all()


@pytest.mark.parametrize("bias_rows", ["every row", "one for all"])
def test_math_path_in_row_chunks_equals_the_whole_block(monkeypatch: pytest.MonkeyPatch, bias_rows: str):
    """A block whose scores exceed MATH_SCORES_BYTES runs in query-row chunks (a long padded
    prefill); causal rows, GQA, a bias per row or one for all, rows that see nothing: all
    exact against the float64 reference, the lse included."""
    import fmsring.kernels as kernels

    b, h, kvh, lq, d = 2, 6, 2, random.randint(20, 60), 16
    q, k, v = random_case(h, kvh, lq, lq, b=b, d=d)
    bias = torch.where(torch.rand(b, lq, lq) < 0.3, float("-inf"), torch.randn(b, lq, lq))
    bias[..., 0] = 0.0
    bias[:, 3] = float("-inf")  # a row that sees no key
    if bias_rows == "one for all":
        bias = bias[:, :1]
    causal = torch.zeros(lq, lq).masked_fill_(torch.ones(lq, lq, dtype=torch.bool).triu(1), float("-inf"))
    rows = random.randint(1, 7)
    monkeypatch.setattr(kernels, "MATH_SCORES_BYTES", 4 * b * h * lq * rows)  # chunks of `rows` query rows
    out, lse = math_attention_with_lse(q, k, v, 0.3, causal=True, bias=bias)
    full = (causal + bias).expand(b, lq, lq)
    seen = torch.isfinite(full).any(-1)  # [b, lq]
    ref = reference(q, k, v, 0.3, full.masked_fill(~seen.unsqueeze(-1), 0.0))
    assert (out.double() - ref).abs()[seen.unsqueeze(1).expand(b, h, lq)].max() < 1e-5, f"{rows=}"
    assert (out[~seen.unsqueeze(1).expand(b, h, lq)] == 0).all()
    g = h // kvh
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * 0.3 + full.double().unsqueeze(1)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)


CPU_MASKS = ["none", "causal", "bias per row", "bias one row"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", CPU_MASKS)
@pytest.mark.parametrize("h,kvh", [(4, 4), (6, 2), (9, 3)])
def test_cpu_fused_kernel_equals_float64_attention(dtype, mask, h, kvh):
    """The fused CPU kernel a CPU block runs, against float64 softmax attention of the same
    (rounded) inputs: GQA, more or fewer query rows than keys (causal too: the math path's
    top-left mask, which on the ring's square diagonal blocks is also bottom-right's), a bias
    per row or one for all, rows the bias hides wholly (out 0, lse -inf, as the merge reads
    "no contribution"). float32 to 1e-5; bfloat16 rounds each probability and the output once
    (2^-8 relative each), so out is within 2^-8 (|out| + max |v|), and its lse, accumulated in
    fp32, within 2^-10 relative (measured: under 1e-4)."""
    b, d = 2, random.choice([16, 64])
    lq, lk = random.randint(1, 150), random.randint(1, 150)
    q, k, v = (t.to(dtype) for t in random_case(h, kvh, lq, lk, b=b, d=d))
    causal, bias = mask == "causal", None
    full = torch.zeros(b, lq, lk, dtype=torch.float64)
    if causal:
        full.masked_fill_(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
    if mask.startswith("bias"):
        rows = lq if mask == "bias per row" else 1
        bias = torch.where(torch.rand(b, rows, lk) < 0.3, float("-inf"), torch.randn(b, rows, lk))
        bias[random.randrange(b), random.randrange(rows)] = float("-inf")  # a row (or sequence) that sees no key
        full += bias.double()
    assert select_kernel("cpu", dtype, d, lq, causal, bias is not None) == "cpu_flash"
    out, lse = attention_with_lse(q, k, v, d**-0.5, causal, bias)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:-1]
    seen = torch.isfinite(full).any(-1).unsqueeze(1).expand(b, h, lq)
    assert torch.isneginf(lse[~seen]).all() and (out[~seen] == 0).all()
    ref = reference(q, k, v, d**-0.5, full.masked_fill(~seen[:, :1].transpose(1, 2), 0.0))
    g = h // kvh
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * d**-0.5 + full.unsqueeze(1)
    ref_lse = torch.logsumexp(s, -1)
    err, lse_err = (out.double() - ref).abs()[seen], (lse.double() - ref_lse).abs()[seen]
    if dtype == torch.float32:
        assert (err < 1e-5).all() and (lse_err < 1e-5).all()
    else:
        assert (err <= 2**-8 * (ref.abs()[seen] + v.abs().max().item())).all()
        assert (lse_err <= 2**-10 * ref_lse.abs()[seen].clamp_min(1.0)).all()


def test_cpu_fused_kernel_takes_what_it_would_crash_on_or_misread():
    """A block of no keys or no query rows is the empty partial (the kernel itself divides by zero
    and kills the process); q, k, v or a bias whose last dim is strided (the kernel reads it as
    contiguous) gives what contiguous copies give."""
    q, k, v = random_case(6, 2, 9, 11)
    for qq, kk, vv in ((q, k[:, :, :0], v[:, :, :0]), (q[:, :, :0], k, v)):
        out, lse = cpu_flash_attention_with_lse(qq, kk, vv, 0.3, causal=True)
        assert out.shape == qq.shape and (out == 0).all() and torch.isneginf(lse).all()
    bias = torch.randn(2, 9, 11)
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v, bias)]
    assert all(t.stride(-1) != 1 for t in strided)
    for causal, b in ((True, None), (False, strided[3])):
        got = cpu_flash_attention_with_lse(*strided[:3], 0.3, causal, b)
        want = cpu_flash_attention_with_lse(q, k, v, 0.3, causal, None if b is None else bias)
        torch.testing.assert_close(got, want)


def test_merge_stacked_matches_sequential_merge():
    W = random.randint(2, 5)
    q, k, v = random_case(4, 2, 1, 8 * W)
    parts = [attention_with_lse(q, k[:, :, 8 * i : 8 * i + 8], v[:, :, 8 * i : 8 * i + 8], 0.2) for i in range(W)]
    parts[0] = (torch.zeros_like(parts[0][0]), torch.full_like(parts[0][1], float("-inf")))  # an empty shard
    merged = merge_stacked(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    ref = reference(q, k[:, :, 8:], v[:, :, 8:], 0.2, torch.zeros(2, 1, 8 * W - 8))
    assert (merged.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_pair_rounds_once(dtype):
    """Two partials merged in the query dtype: float32 to 1e-5; bfloat16 within the roundings it
    cannot avoid, each at most the unit roundoff u = 2^-8 of what it rounds: each partial's own
    (carried into the result by its weight w) and the result's, so u (w_a |a| + w_b |b| + |out|).
    That is not 2u |out|: partials of opposite signs cancel (a bound of 2^-7 |out| failed 1 seed in ~300)."""
    q, k, v = random_case(8, 2, random.randint(1, 30), 40)
    a = attention_with_lse(q, k[:, :, :17], v[:, :, :17], 0.3)
    b = attention_with_lse(q, k[:, :, 17:], v[:, :, 17:], 0.3)
    out, lse = merge_pair(a[0].to(dtype), a[1], b[0].to(dtype), b[1])
    ref = reference(q, k, v, 0.3, torch.zeros(2, q.shape[2], 40))
    assert out.dtype == dtype
    assert (lse - torch.logaddexp(a[1], b[1])).abs().max() == 0
    if dtype == torch.float32:
        assert ((out.double() - ref).abs() <= 1e-5 * ref.abs().clamp_min(1.0)).all()
        return
    w_a, w_b = (torch.exp(part[1] - lse).unsqueeze(-1).double() for part in (a, b))
    carried = w_a * a[0].abs().double() + w_b * b[0].abs().double() + ref.abs()
    assert ((out.double() - ref).abs() <= 2**-8 * (1 + 2**-8) * carried + 1e-6).all()  # (1 + u): u of u's error


@pytest.mark.parametrize("h,kvh", [(4, 4), (8, 2)])
def test_decode_over_a_preallocated_cache_reads_only_the_used_slots(h, kvh):
    b, d, cap = 3, 16, random.randint(8, 40)
    lens = torch.tensor([random.randint(1, cap), 0, cap], dtype=torch.int32)
    q = torch.randn(b, h, 1, d)
    k_cache, v_cache = torch.randn(b, cap, kvh, d) * 2, torch.randn(b, cap, kvh, d)
    scale = d**-0.5
    out, lse = decode_attention_with_lse(q, k_cache, v_cache, lens, scale)
    for i, n in enumerate(lens.tolist()):
        if n == 0:  # a shard with nothing yet contributes nothing to the merge
            assert torch.all(out[i] == 0) and torch.all(lse[i] == float("-inf"))
            continue
        k, v = k_cache[i : i + 1, :n].transpose(1, 2), v_cache[i : i + 1, :n].transpose(1, 2)
        ref = reference(q[i : i + 1], k, v, scale, torch.zeros(1, 1, n))
        assert (out[i : i + 1].double() - ref).abs().max() < 1e-5  # fp32 softmax over <= 40 keys: ~1e-7
        # what lies beyond the used slots must not matter
        k_cache[i, n:], v_cache[i, n:] = 1e4, -1e4
    again = decode_attention_with_lse(q, k_cache, v_cache, lens, scale)
    torch.testing.assert_close(again[0], out)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
@pytest.mark.parametrize("windowed", [False, True])
def test_split_kv_chunks_cover_exactly_the_used_slots_and_merge_to_the_unsplit_result(splits, windowed):
    """The chunk bookkeeping of split-KV decoding: the chunks' used slots are exactly each
    sequence's first kv_lens slots (``windowed``: from a first slot on, the slots a sliding
    window shows), in order, disjoint, in whole tiles but the last; merging per-chunk partials
    (math here, the decode kernel in tests/test_decode_kernel.py) gives the unsplit attention
    (with the skipped slots masked). Empty chunks and empty sequences contribute nothing."""
    b, h, kvh, d, cap = 3, 8, 2, 16, random.randint(splits, 700)
    lens = torch.tensor([random.randint(1, cap), 0, cap], dtype=torch.int32)
    first = torch.tensor([random.randint(0, int(n)) for n in lens]) if windowed else torch.zeros(b, dtype=torch.long)
    starts, used = split_kv_chunks(lens, splits, first if windowed else None)
    assert starts.shape == used.shape == (b * splits,)
    for i in range(b):
        chunks = [(int(starts[i * splits + c]), int(used[i * splits + c])) for c in range(splits)]
        assert [s for lo, n in chunks for s in range(lo, lo + n)] == list(range(int(first[i]), int(lens[i])))
        assert all(n % TILE_SLOTS == 0 for lo, n in chunks if lo + n < lens[i])
    q = torch.randn(b, h, 1, d)
    k_cache, v_cache = torch.randn(b, cap, kvh, d) * 2, torch.randn(b, cap, kvh, d)
    outs, lses = [], []
    for c in range(splits):  # each chunk attended alone, as the kernel does it, then merged
        out_c, lse_c = torch.zeros(b, h, 1, d), torch.full((b, h, 1), float("-inf"))
        for i in range(b):
            lo, n = int(starts[i * splits + c]), int(used[i * splits + c])
            if n:
                k, v = (t[i : i + 1, lo : lo + n].transpose(1, 2) for t in (k_cache, v_cache))
                out_c[i : i + 1], lse_c[i : i + 1] = math_attention_with_lse(q[i : i + 1], k, v, d**-0.5)
        outs.append(out_c.view(b, kvh, h // kvh, 1, d))
        lses.append(lse_c.view(b, kvh, h // kvh, 1))
    out, lse = merge_split(torch.stack(outs), torch.stack(lses))
    skipped = torch.arange(cap).unsqueeze(0) < first.unsqueeze(1)
    bias = torch.zeros(b, cap).masked_fill(skipped, float("-inf"))
    ref, ref_lse = decode_attention_with_lse(q, k_cache, v_cache, lens, d**-0.5, slot_bias=bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)


def test_kernel_selection():
    """Which kernel a block runs: fused on CUDA (fp32 included) unless a bias or a head dim past 128
    asks for the math path; fused on a CPU (a bias included) unless a block is causal and biased at
    once, or in float64."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert select_kernel("cuda", bf16, 128, 4096, True, False) == "cudnn"
    assert select_kernel("cuda", fp16, 128, 8, False, False) == "flash"  # decode-like: few rows, no mask
    assert select_kernel("cuda", bf16, 128, 8, True, False) == "cudnn"
    assert select_kernel("cuda", fp32, 128, 7000, True, False) == "efficient"
    assert select_kernel("cuda", fp32, 128, 1, False, False) == "efficient"
    assert select_kernel("cuda", fp32, 128, 7000, False, True) == "efficient"  # a padding mask
    assert select_kernel("cuda", bf16, 64, 128, False, True) == "efficient"  # a window's band
    assert select_kernel("cuda", bf16, 64, 128, True, True) == "math"  # causal and a bias at once
    assert select_kernel("cuda", bf16, 256, 4096, True, False) == "math"
    assert select_kernel("cuda", torch.float64, 128, 4096, True, False) == "math"
    assert select_kernel("cpu", bf16, 128, 4096, True, False) == "cpu_flash"
    assert select_kernel("cpu", fp32, 256, 1, False, True) == "cpu_flash"  # a padding mask, any head dim
    assert select_kernel("cpu", fp16, 64, 4096, True, False) == "cpu_flash"
    assert select_kernel("cpu", fp32, 64, 4096, True, True) == "math"  # causal and a bias at once
    assert select_kernel("cpu", torch.float64, 64, 4096, True, False) == "math"
    assert select_kernel("mps", fp32, 64, 4096, True, False) == "math"


def test_split_kv_plans_refuse_what_they_do_not_fit():
    """A decode step's one split-KV plan serves every layer; one made for another batch is an
    error, not a wrong read. The plan exists only where the decode kernel runs (CUDA, half
    precision, Triton)."""
    lens = torch.tensor([5, 9], dtype=torch.int32)
    k_cache = torch.zeros(2, 16, 2, 8)
    assert decode_split_kv(lens, k_cache) is None  # CPU: the fp32 math path
    plan = split_kv(lens, 2)
    assert plan.batch == 2 and plan.splits == 2 and plan.used.tolist() == [5, 0, 9, 0]
    q = torch.zeros(1, 8, 1, 8)  # one sequence: the plan's two would read past its cache
    with pytest.raises(ValueError, match="does not fit queries"):
        split_kv_decode_with_lse(q, k_cache[:1], k_cache[:1], 1.0, plan)
    q = torch.zeros(2, 7, 1, 8)  # 7 query heads do not share 2 kv-heads
    with pytest.raises(ValueError, match="does not fit queries"):
        split_kv_decode_with_lse(q, k_cache, k_cache, 1.0, plan)
