"""fmsring.harness.flops: FLOP counts and floors by hand."""

from __future__ import annotations

import math

import fms.models
import pytest
import torch

from fmsring.harness.flops import FlopShape, Rates, floor_ms, flop_shape, model_flops


def test_flops_formula():
    shape = FlopShape(linear_params=1000, head_params=100, attn_width=8)
    # prefill of 4 tokens: 2*4*1000 linear + 2*100 head + 2*8*(4*5/2) attention
    assert model_flops(shape, batch=1, new_tokens=4) == 8000 + 200 + 160
    # one decode token after 10 cached: sees 11 keys
    assert model_flops(shape, batch=2, new_tokens=1, context=10) == 2 * 2 * (1000 + 100 + 8 * 11)


def test_flop_shape_of_the_micro_llama():
    """By hand: 2 layers of emb 192, 4 heads of 48, MLP 512 wide, vocab 256, fp32."""
    meta = fms.models.get_model("llama", "micro", device_type="meta", distributed_strategy="none", nlayers=2)
    s = flop_shape(meta, element_size=4)
    per_layer = 192 * 3 * 192 + 192 * 192 + 192 * 2 * 512 + 512 * 192  # qkv, dense, gate+up, down
    assert s.linear_params == 2 * per_layer and s.head_params == 256 * 192
    assert s.attn_width == 2 * 4 * (48 + 48)
    assert s.kv_bytes_per_token == 2 * 4 * (48 + 48) * 4
    norms = 2 * 2 * 192 + 192
    assert s.weight_bytes == (2 * per_layer + 256 * 192 + norms) * 4  # every weight but the embedding
    assert s.head_bytes == 256 * 192 * 4 and s.kv_heads == 4


def test_floor_formulas_with_given_rates():
    shape = FlopShape(linear_params=10**9, head_params=10**8, attn_width=4096, weight_bytes=2 * 10**9,
                      kv_bytes_per_token=10**5, head_bytes=2 * 10**8, kv_heads=8)  # fmt: skip
    rates = Rates(matmul_tflops=500.0, attention_tflops=400.0, memory_gbps=4000.0)
    L = 8192
    linear = 2.0 * (1e9 * L + 1e8)
    attention = 2.0 * 4096 * L * (L + 1) / 2
    one = (linear / 500e12 + attention / 400e12) * 1e3
    assert floor_ms(shape, rates, 1, 1, "prefill", 1, L) == pytest.approx(one)
    for cp, tp in ((4, 1), (1, 4), (2, 2)):
        assert floor_ms(shape, rates, cp, tp, "prefill", 1, L) == pytest.approx(one / 4)
    # a follow-up of 512 on 8192 cached: ring shards the new tokens as tp shards the weights, both divide
    lin, att = 2.0 * (1e9 * 512 + 1e8), 2.0 * 4096 * (512 * L + 512 * 513 / 2)
    for cp, tp in ((2, 1), (1, 2)):
        assert floor_ms(shape, rates, cp, tp, "followup", 1, 512, L) == pytest.approx(
            (lin / 2 / 500e12 + att / 2 / 400e12) * 1e3
        )
    # a short follow-up is bounded by reading the weights the GPU holds: all of them for ring,
    # for tp 1/W of the layers and the whole (replicated) LM head
    assert floor_ms(shape, rates, 2, 1, "followup", 1, 1, 16) == pytest.approx(2e9 / 4000e9 * 1e3)
    assert floor_ms(shape, rates, 1, 2, "followup", 1, 1, 16) == pytest.approx((0.9e9 + 0.2e9) / 4000e9 * 1e3)
    # decode at 8192 + 16 (the middle of 32 steps): bytes read per GPU over 4 TB/s
    cache = (L + 16) * 1e5
    gbps = 4000e9
    assert floor_ms(shape, rates, 1, 1, "decode", 1, L, 0, 32) == pytest.approx((2e9 + cache) / gbps * 1e3)
    assert floor_ms(shape, rates, 4, 1, "decode", 1, L, 0, 32) == pytest.approx((2e9 + cache / 4) / gbps * 1e3)
    tp4 = (1.8e9 / 4 + 0.2e9 + cache / 4) / gbps * 1e3
    assert floor_ms(shape, rates, 1, 4, "decode", 1, L, 0, 32) == pytest.approx(tp4)
    assert floor_ms(shape, rates, 2, 2, "decode", 1, L, 0, 32) == pytest.approx(
        (1.8e9 / 2 + 0.2e9 + cache / 4) / gbps * 1e3
    )
    # 8 kv-heads over tp 16: every rank still holds a whole kv-head, 1/8 of the cache, not 1/16
    assert floor_ms(shape, rates, 1, 16, "decode", 1, L, 0, 32) == pytest.approx(
        (1.8e9 / 16 + 0.2e9 + cache / 8) / gbps * 1e3
    )
    assert math.isnan(floor_ms(shape, None, 2, 1, "prefill", 1, L))


def test_an_moe_token_counts_and_reads_only_the_experts_it_is_routed_to():
    """gpt-oss with 2 of 4 experts per token: the linear FLOPs count half the experts; a decode
    step of one token reads half of them, of 4 tokens 1 - (1/2)^4 of them; a prefill all."""
    meta = fms.models.get_model("gpt_oss", "20b", device_type="meta", distributed_strategy="none", nlayers=1,
                                emb_dim=64, hidden_dim=32, nheads=2, kvheads=1, head_dim=16, src_vocab_size=96,
                                num_experts=4, top_k_experts=2)  # fmt: skip
    moe = next(m for m in meta.modules() if type(m).__name__ == "MOEFeedForward")
    experts = moe.cond_ffn.w13.numel() + moe.cond_ffn.w2.numel()
    s = flop_shape(meta, element_size=4)
    others = sum(m.weight.numel() for m in meta.modules() if isinstance(m, torch.nn.Linear)) - s.head_params
    assert s.linear_params == others + experts // 2
    assert s.expert_bytes == experts * 4 and s.expert_share == 0.5
    rates = Rates(matmul_tflops=1.0, attention_tflops=1.0, memory_gbps=1.0)
    cache = (8 + 1) * s.kv_bytes_per_token
    for batch, unread in ((1, 0.5), (4, 0.5**4)):
        expected = (s.weight_bytes - unread * experts * 4 + batch * cache) / 1e9 * 1e3
        assert floor_ms(s, rates, 1, 1, "decode", batch, 8, 0, 2) == pytest.approx(expected)
    weights_once = s.weight_bytes / 1e9 * 1e3
    assert floor_ms(s, rates, 1, 1, "prefill", 1, 1) == pytest.approx(weights_once)
