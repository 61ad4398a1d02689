"""GPU-only paths: the fused attention kernels, the captured decode step, the
fused elementwise work. Marked ``cuda``: skipped without a GPU, run by
``make test-gpu`` on one.

References are the fp32 math path (kernels) and the same model run eagerly or
unsharded (model paths); bf16 tolerances as the harness judges them.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _as_close_as_plain(got: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor) -> tuple[bool, float, float]:
    """The ring's bf16 logits against fp32 math on the same weights (``truth``), allowed what the
    plain model's own bf16 logits miss it by, half again (or 2%, where both are closer): comparing
    the two bf16 models directly adds their rounding errors, which on some draws passed 2%."""
    ring_err, plain_err = _rel(got, truth), _rel(plain, truth)
    return ring_err <= max(2e-2, 1.5 * plain_err), ring_err, plain_err


@pytest.mark.parametrize("kvh", [8, 32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_block_kernels_match_fp32_math(kvh, causal, token_major, dtype):
    """cuDNN and flash blocks in bf16, memory-efficient ones in fp32 (GQA packed or expanded), with
    heads-major K/V as the ring sends them and token-major as pass-Q reads the cache."""
    from fmsring.kernels import attention_with_lse, math_attention_with_lse, select_kernel

    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for lq in (random.randrange(1, 16), random.randrange(100, 700)):
        lk = lq if causal else random.randrange(lq, 2000)
        q = torch.randn(2, 32, lq, 128, device="cuda", dtype=dtype)
        kv = torch.randn(2, 2, lk, kvh, 128, device="cuda", dtype=dtype)
        k, v = (kv[i].transpose(1, 2) if token_major else kv[i].transpose(1, 2).contiguous() for i in range(2))
        out, lse = attention_with_lse(q, k, v, 128**-0.5, causal)
        ref_out, ref_lse = math_attention_with_lse(q, k, v, 128**-0.5, causal)
        assert select_kernel("cuda", q.dtype, 128, lq, causal, False) != "math"
        assert _rel(out, ref_out) < tol, (lq, lk)
        assert (lse.float() - ref_lse).abs().max() < tol


@pytest.mark.parametrize("kvh", [8, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocks_with_a_bias_and_window_bands_take_the_efficient_kernel(kvh, dtype):
    """A block with an additive bias (a padded batch's mask: whole rows hidden, odd key counts) and a
    window's band attended tile by tile both take the memory-efficient kernel and match fp32 math."""
    from fmsring.kernels import attention_with_lse, math_attention_with_lse, select_kernel
    from fmsring.windows import LayerAttention, band, band_attention

    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    lq, lk = random.randrange(100, 700), random.randrange(700, 2000)
    q = torch.randn(2, 32, lq, 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, kvh, lk, 64, device="cuda", dtype=dtype) for _ in range(2))
    bias = torch.zeros(2, lq, lk, device="cuda").masked_fill_(torch.rand(2, lq, lk, device="cuda") < 0.3, float("-inf"))
    bias[1, : lq // 3] = float("-inf")  # rows that see nothing: the empty partial
    assert select_kernel("cuda", dtype, 64, lq, False, True) == "efficient"
    out, lse = attention_with_lse(q, k, v, 0.125, bias=bias)
    ref_out, ref_lse = math_attention_with_lse(q, k, v, 0.125, bias=bias)
    assert torch.isneginf(lse[1, :, : lq // 3]).all() and (out[1, :, : lq // 3] == 0).all()
    seen = torch.isfinite(ref_lse)
    assert _rel(out.float()[seen], ref_out[seen]) < tol and (lse - ref_lse)[seen].abs().max() < tol
    layer, index = LayerAttention(None, random.randrange(50, 300)), torch.arange(lk)
    out, lse = band_attention(q, k, v, 0.125, band(layer, index[-lq:], index, "cuda"))
    ref_out, ref_lse = math_attention_with_lse(
        q, k, v, 0.125, bias=layer.bias(index[-lq:].cuda(), index.cuda(), causal=True)
    )
    assert _rel(out.float(), ref_out) < tol and (lse - ref_lse).abs().max() < tol


def test_flash_window_matches_its_reference_and_a_prefill_band():
    """Flash attention's own window (GQA, bf16) against its fp32 reference at random offsets of
    the keys' last row behind the queries'; and a whole prompt's window layer through it
    (:func:`fmsring.windows.windowed_blocks` at world 1) against the dense causal band."""
    from fmsring.kernels import flash_window_with_lse, math_attention_with_lse, takes_flash_window
    from fmsring.layout import BlockCall
    from fmsring.windows import LayerAttention, windowed_blocks
    from tests.test_sinks_windows import flash_window_reference

    window, lq = random.randrange(20, 300), random.randrange(100, 700)
    right = random.randrange(0, window)
    lk = random.randrange(max(window, lq - right), 2000)  # the first query row sees a key too
    q = torch.randn(2, 32, lq, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 8, lk, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert takes_flash_window(q)
    out, lse = flash_window_with_lse(q, k, v, 0.125, window - 1 - right, right)
    ref_out, ref_lse = flash_window_reference(q, k, v, 0.125, window - 1 - right, right)
    assert _rel(out.float(), ref_out) < 1e-2 and (lse - ref_lse).abs().max() < 1e-2, (window, lq, lk, right)
    n, layer = random.randrange(1000, 3000), LayerAttention(None, window)
    q = torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    index = torch.arange(n)
    ((_, (out, lse)),) = windowed_blocks(q, k, v, 0.125, (BlockCall(0, n, 0, n, True),), layer, index, index)
    ref_out, ref_lse = math_attention_with_lse(q, k, v, 0.125, bias=layer.bias(index.cuda(), index.cuda(), True))
    assert _rel(out.float(), ref_out) < 1e-2 and (lse - ref_lse).abs().max() < 1e-2, (window, n)


@pytest.mark.parametrize("h,kvh", [(32, 8), (8, 2), (4, 4)])
def test_split_kv_decode_matches_the_unsplit_kernel_and_fp32_math(h, kvh):
    """The decode kernel at LLaMA-3-8B's head dim and GQA shapes at several chunk counts (1 =
    unsplit), over a preallocated cache: a partly used, an empty and a full one; the plan a decode
    step makes for itself; and the merge into bf16 (tests/test_decode_kernel.py covers odd shapes)."""
    from fmsring.kernels import decode_attention_with_lse, math_attention_with_lse, split_kv_decode_with_lse
    from fmsring.split_kv import split_kv

    b, cap = 3, 4096 + 37
    lens = torch.tensor([random.randrange(1, cap), 0, cap], dtype=torch.int32, device="cuda")
    q = torch.randn(b, h, 1, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(b, cap, kvh, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    unsplit = split_kv_decode_with_lse(q, kc, vc, 128**-0.5, split_kv(lens, 1))
    for splits in (1, 3, 8, 64):
        out, lse = split_kv_decode_with_lse(q, kc, vc, 128**-0.5, split_kv(lens, splits))
        assert _rel(out, unsplit[0]) < 1e-2 and (lse - unsplit[1]).nan_to_num().abs().max() < 1e-3
        for i, n in enumerate(lens.tolist()):
            if n == 0:
                assert torch.all(lse[i] == float("-inf")) and torch.all(out[i] == 0)
                continue
            k, v = kc[i : i + 1, :n].transpose(1, 2), vc[i : i + 1, :n].transpose(1, 2)
            ref, ref_lse = math_attention_with_lse(q[i : i + 1], k, v, 128**-0.5)
            assert _rel(out[i : i + 1], ref) < 1e-2 and (lse[i : i + 1] - ref_lse).abs().max() < 1e-2
    auto = decode_attention_with_lse(q, kc, vc, lens, 128**-0.5)
    assert _rel(auto[0], unsplit[0]) < 1e-2
    # merged straight into the query's dtype and the output projection's layout, as a step at world 1 takes it
    half, half_lse = split_kv_decode_with_lse(q, kc, vc, 128**-0.5, split_kv(lens, 8), out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.transpose(1, 2).is_contiguous()
    assert _rel(half.float(), unsplit[0]) < 1e-2 and (half_lse - unsplit[1]).nan_to_num().abs().max() < 1e-3


@pytest.fixture(scope="module")
def one_rank_group():
    import torch.distributed as dist

    import fmsring

    fmsring.maybe_init_dist("cuda")
    yield
    dist.destroy_process_group()


def _models(**ring_kw):
    import fmsring

    kw = dict(architecture="llama", variant="micro", device_type="cuda", data_type=torch.bfloat16, nlayers=2)
    torch.manual_seed(0)
    ring = fmsring.get_model(**kw, distributed_strategy="ring", **ring_kw)
    torch.manual_seed(0)
    plain = fmsring.get_model(**kw, distributed_strategy="replicated")
    return ring, plain


def test_ring_prefill_followups_and_captured_decode_on_one_gpu(one_rank_group):
    """Prefill, a pass-KV and a pass-Q follow-up, and decode steps (whole layers compiled, captured
    and eager): the plain FMS model's logits within bf16 tolerance, and the captured step's tokens
    equal to the eager step's."""
    ring, plain = _models()
    ids = torch.randint(0, 256, (1, random.randrange(300, 700)), device="cuda")
    with torch.no_grad():
        want = plain(ids, use_cache=True)[0]
        got, cache = ring(ids[:, :-40], use_cache=True)
        assert _rel(got, want[:, :-40]) < 2e-2
        for mode, (lo, hi) in (("pass_kv", (-40, -20)), ("pass_q", (-20, None))):
            ring.followup = mode
            got, cache = ring(ids[:, lo:hi], past_key_value_states=cache, use_cache=True)
            assert _rel(got, want[:, lo:hi]) < 2e-2, mode
    tokens = {}
    truth = copy.deepcopy(plain).float()
    for graphs in (True, False):
        ring.cuda_graphs = graphs
        with torch.no_grad():
            logits, step_cache = ring(ids, use_cache=True, last_n_tokens=1)
            ref_cache = plain(ids, use_cache=True)[1]
            truth_cache = truth(ids, use_cache=True)[1]
            out = []
            for _ in range(8):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out.append(nxt)
                logits, step_cache = ring(nxt, past_key_value_states=step_cache, use_cache=True, last_n_tokens=1)
                ref, ref_cache = plain(nxt, past_key_value_states=ref_cache, use_cache=True)
                want, truth_cache = truth(nxt, past_key_value_states=truth_cache, use_cache=True)
                close = _as_close_as_plain(logits[:, -1], ref[:, -1], want[:, -1])
                assert close[0], (graphs, close)
        tokens[graphs] = torch.cat(out, dim=1)
    assert torch.equal(tokens[True], tokens[False])


def test_padded_batch_decodes_on_the_captured_step(one_rank_group):
    """Prompts of different lengths, left-padded as FMS's generate pads them: each decode step
    carries the padding mask (extended as FMS extends it), which the step reads at its cache
    slots and the decode kernel adds to the scores -- captured as a CUDA graph like an unpadded
    step. The plain FMS model given the same tokens and mask agrees at every step."""
    from fms.utils.generation import pad_input_ids

    ring, plain = _models()
    lens = (random.randrange(300, 500), random.randrange(20, 200))
    ids, kw = pad_input_ids([torch.randint(0, 256, (n,), device="cuda") for n in lens])
    mask, pos = kw["mask"], kw["position_ids"]
    with torch.no_grad():
        logits, cache = ring(ids, position_ids=pos, mask=mask, use_cache=True, last_n_tokens=1)
        ref, ref_cache = plain(ids, position_ids=pos, mask=mask, use_cache=True)
        for _ in range(6):
            nxt = ref[:, -1].argmax(-1, keepdim=True)  # both models get the same tokens
            mask = torch.cat([mask[:, -1:], torch.zeros(mask.shape[0], 1, 1, device="cuda")], dim=2)
            pos = pos[:, -1:] + 1
            logits, cache = ring(nxt, position_ids=pos, mask=mask, past_key_value_states=cache, use_cache=True,
                                 last_n_tokens=1)  # fmt: skip
            ref, ref_cache = plain(nxt, position_ids=pos, mask=mask, past_key_value_states=ref_cache, use_cache=True)
            assert _rel(logits[:, -1], ref[:, -1]) < 2e-2, lens
    assert ring.graphs.current is not None and ring.graphs.current.inputs.slot_bias is not None


@pytest.mark.parametrize("family", ["gpt_oss", "granite_swa"])
def test_sinks_and_windows_prefill_and_decode_on_the_captured_step(one_rank_group, family):
    """gpt-oss and Granite-SWA in bf16 on one GPU: the windowed layers' prefill attends through
    flash attention's own window, and the captured decode step reads the window and the
    sink through the split-KV kernel's bias, many steps past the window. The plain FMS model of
    the same weights agrees with the prompt's logits and every step's."""
    from tests.test_sinks_windows import _models

    window = random.randrange(40, 90)
    options = dict(device_type="cuda", data_type=torch.bfloat16, max_expected_seq_len=1024)
    plain, ring = _models(family, window, options)
    ids = torch.randint(1, 96, (1, random.randrange(300, 700)), device="cuda")
    with torch.no_grad():
        want, ref_cache = plain(ids, use_cache=True)
        got, cache = ring(ids, use_cache=True)
        assert _rel(got, want) < 2e-2, (family, window, ids.shape)
        for step in range(window + 8):
            nxt = want[:, -1:].argmax(-1)
            got, cache = ring(nxt, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
            want, ref_cache = plain(nxt, past_key_value_states=ref_cache, use_cache=True)
            assert _rel(got[:, -1], want[:, -1]) < 2e-2, (family, window, ids.shape, step)
    assert ring.graphs.current is not None and ring.graphs.current.inputs.slot_index is not None


def test_bamba_decodes_on_the_captured_step(one_rank_group):
    """Bamba in bf16 on one GPU: the captured decode step advances the Mamba2 states in place on
    every replay, against the plain FMS model of the same weights, step by step. The bound is
    loose for bf16's sake: this model's steps differ from FMS's by a few percent on a GPU, while
    a replay on stale states misses by tens of percent or more (restoring the states after a step
    on CPU ranks showed 30-150%)."""
    from tests.test_bamba import _models

    plain, ring = _models(dict(device_type="cuda", data_type=torch.bfloat16))
    ids = torch.randint(1, 96, (1, random.randrange(40, 200)), device="cuda")
    with torch.no_grad():
        want, ref_cache = plain(ids, use_cache=True)
        got, cache = ring(ids, use_cache=True)
        assert _rel(got, want) < 2e-2, ids.shape
        for step in range(12):
            nxt = want[:, -1:].argmax(-1)
            got, cache = ring(nxt, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
            want, ref_cache = plain(nxt, past_key_value_states=ref_cache, use_cache=True)
            assert _rel(got[:, -1], want[:, -1]) < 0.1, (ids.shape, step)
    assert ring.graphs.current is not None


def test_decode_on_many_cache_sizes_compiles_a_bounded_number_of_times(one_rank_group):
    """Prompts of four lengths, so four cache capacities and two split-KV chunk counts: the
    captured steps match the plain FMS model, and the decoder layer compiled whole holds a
    bounded number of graphs, not one per capacity: at most one per shape that can change (the
    first capacity's static graph, the capacity dynamic, the chunk count dynamic once it leaves
    1), and a capacity after those compiles nothing new. How torch splits that work between
    graphs differs between torch versions; the bound does not."""
    from tests.stepwise import block_graphs

    torch._dynamo.reset()
    ring, plain = _models()
    graphs = []
    # within FMS micro's 1024-position RoPE table (the plain model's never grows); from the third
    # prompt on, its n + 256 slots of headroom are more than 1024, cut into two chunks
    for lo, hi in ((200, 300), (400, 600), (800, 900), (900, 1000)):
        n = random.randrange(lo, hi)
        ids = torch.randint(0, 256, (1, n), device="cuda")
        with torch.no_grad():
            logits, cache = ring(ids, use_cache=True, last_n_tokens=1)
            ref_cache = plain(ids, use_cache=True)[1]
            for _ in range(3):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                logits, cache = ring(nxt, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
                ref, ref_cache = plain(nxt, past_key_value_states=ref_cache, use_cache=True)
                assert _rel(logits[:, -1], ref[:, -1]) < 2e-2, n
        graphs.append(block_graphs(ring))
    assert graphs == sorted(graphs) and 1 <= graphs[-1] <= 3, graphs
    assert graphs[-1] == graphs[-2], graphs  # the last capacity (chunk count as before) compiled nothing


def test_chunked_prefill_on_one_gpu(one_rank_group):
    ring, plain = _models(ring_prefill_chunk=128)
    ids = torch.randint(0, 256, (1, random.randrange(400, 900)), device="cuda")
    with torch.no_grad():
        assert _rel(ring(ids), plain(ids, use_cache=True)[0]) < 2e-2


def test_decode_steps_never_wait_for_the_device(one_rank_group):
    """A captured decode step with the input check on and position ids given (as generate passes
    them with padding) runs with CUDA's sync debug mode set to fail on any host sync."""
    ring, _ = _models(ring_check_inputs=True)
    ids = torch.randint(0, 256, (2, 300), device="cuda")
    pos = torch.arange(300, device="cuda").expand(2, -1)
    with torch.no_grad():
        logits, cache = ring(ids, position_ids=pos, use_cache=True, last_n_tokens=1)
        nxt, nxt_pos = logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:] + 1
        ring(nxt, position_ids=nxt_pos, past_key_value_states=cache, use_cache=True, last_n_tokens=1)  # captures
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                logits, cache = ring(nxt, position_ids=nxt_pos, past_key_value_states=cache, use_cache=True,
                                     last_n_tokens=1)  # fmt: skip
                nxt, nxt_pos = logits[:, -1].argmax(-1, keepdim=True), nxt_pos + 1
        finally:
            torch.cuda.set_sync_debug_mode("default")


_FIRST_GENERATION = """
import torch, fmsring
fmsring.maybe_init_dist("cuda")
model = fmsring.get_model(architecture="llama", variant="micro", device_type="cuda", data_type=torch.bfloat16,
                          nlayers=2, distributed_strategy="ring")
with torch.no_grad():
    logits, cache = model(torch.randint(0, 256, (1, 300), device="cuda"), use_cache=True, last_n_tokens=1)
    for _ in range(2):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits, cache = model(nxt, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
torch.cuda.synchronize()
"""


def test_a_second_process_compiles_no_kernel(tmp_path: Path):
    """Two processes generate over one inductor cache, Triton's own home empty and
    ``TRITON_CACHE_DIR`` unset, as two runs of a user's script: the second, which loads the
    compiled layers from the first's cache, compiles no Triton kernel (no new cubin anywhere
    under either). Before 0e8603f it compiled fmsring's decode kernels again, into Triton's
    default dir, where the first process had put them in inductor's."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "RANK", "WORLD_SIZE")}
    env |= {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TRITON_HOME": str(tmp_path / "triton_home")}
    runs = []
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _FIRST_GENERATION], env=env, cwd=ROOT, check=True, timeout=600)
        runs.append({p.relative_to(tmp_path) for p in tmp_path.rglob("*.cubin")})
    assert any(p.name == "_split_kv_decode_kernel.cubin" for p in runs[0]), runs[0]
    assert runs[1] == runs[0], sorted(runs[1] - runs[0])
