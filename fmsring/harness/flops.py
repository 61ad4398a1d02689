"""Work per measured call and the floor it implies: FLOP counts, bytes a decode
step must read, and the least time a strategy's share of them can take at the
rates measured on the device in use (:mod:`fmsring.rates`).

The counts come from the unsharded model on the meta device, so TP's sharding
does not shrink them, and no weights are needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fms.modules.attention import MultiHeadAttention
from fms.modules.feedforward import MOEFeedForward
from torch import nn

from fmsring.rates import Rates


@dataclass(frozen=True)
class FlopShape:
    """What the counts need: linear weights a token passes through (head apart; of an
    MoE layer's experts only the ones it is routed to), sum over layers of heads*(dk+dv),
    bytes of all the weights (of which ``head_bytes`` are the LM head's, which FMS's TP
    keeps whole on every rank, and ``expert_bytes`` MoE experts', of which a token
    reads ``expert_share``), K/V bytes per cached token and the kv-heads per layer (a
    TP rank holds at least one)."""

    linear_params: int
    head_params: int
    attn_width: int
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0
    head_bytes: int = 0
    kv_heads: int = 0
    expert_bytes: int = 0
    expert_share: float = 1.0


def flop_shape(model: nn.Module, element_size: int) -> FlopShape:
    """Read from an unsharded (meta) model; ``element_size``: bytes per weight and per K/V value.

    Weight bytes are every parameter but the embedding tables (a look-up reads
    one row per token); a head tied to the embedding is a linear and counts. An MoE
    layer's experts (FMS's ``MOEFeedForward``: stacked expert weights, not linears)
    count in the linear FLOPs by the share of them each token is routed to.
    """
    head = getattr(model, "head", None)
    head_ids = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    linear = sum(m.weight.numel() for m in linears if id(m) not in head_ids)
    head_params = sum(m.weight.numel() for m in linears if id(m) in head_ids)
    attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    width = sum(m.nheads * (m.emb_kq_per_head + m.emb_v_per_head) for m in attns)
    kv_values = sum(m.kvheads * (m.emb_kq_per_head + m.emb_v_per_head) for m in attns)
    read = {id(m.weight) for m in linears}
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    params = {id(p): p for p in model.parameters()}
    weights = sum(p.numel() for i, p in params.items() if i not in embedded or i in read)
    kv_heads = max((m.kvheads for m in attns), default=0)
    moes = [
        (m.cond_ffn.w13.numel() + m.cond_ffn.w2.numel(), m) for m in model.modules() if isinstance(m, MOEFeedForward)
    ]
    experts = sum(n for n, _ in moes)
    routed = sum(n * m.num_activated_experts / m.cond_ffn.num_experts for n, m in moes)
    return FlopShape(
        linear + round(routed), head_params, width, weights * element_size, kv_values * element_size,
        head_params * element_size, kv_heads, experts * element_size, routed / experts if experts else 1.0,
    )  # fmt: skip


def flop_parts(
    shape: FlopShape, batch: int, new_tokens: int, context: int = 0, logit_tokens: int = 1
) -> tuple[float, float]:
    """(linear, attention) FLOPs of ``new_tokens`` tokens per sequence after ``context`` cached ones.

    One multiply-add = 2 FLOPs. Linears: 2 * params * tokens, the LM head only on
    the ``logit_tokens`` whose logits are computed. Causal attention: QK^T and PV
    cost 2*(dk+dv) per head per visible (query, key) pair; a prefill of L sees
    L(L+1)/2 pairs, i.e. the familiar 2*2*b*h*d*L^2/2 per layer. Embedding
    look-ups, norms and softmax are left out.
    """
    linear = 2.0 * batch * (shape.linear_params * new_tokens + shape.head_params * logit_tokens)
    pairs = new_tokens * context + new_tokens * (new_tokens + 1) / 2
    return linear, 2.0 * batch * shape.attn_width * pairs


def model_flops(shape: FlopShape, batch: int, new_tokens: int, context: int = 0, logit_tokens: int = 1) -> float:
    """Forward FLOPs (linear + attention, see :func:`flop_parts`)."""
    return sum(flop_parts(shape, batch, new_tokens, context, logit_tokens))


def decode_steps(decode_tokens: int) -> int:
    """One-token steps a decode run makes after its prefill: ``decode_tokens`` drained, then as
    many streamed (:mod:`fmsring.harness.timing`)."""
    return 2 * decode_tokens


def decode_context(seq_len: int, decode_tokens: int) -> int:
    """The context a decode row's per-token numbers stand for: the middle of its drained steps."""
    return seq_len + decode_tokens // 2


def phase_flops(
    shape: FlopShape | None, phase: str, batch: int, seq_len: int, cached_len: int, decode_tokens: int
) -> float:
    """Prefill: the whole prompt, one logit row. Decode: one token at the mid-run context.
    Followup: ``seq_len`` new tokens after ``cached_len`` cached ones, one logit row."""
    if shape is None:
        return math.nan
    if phase == "decode":
        return model_flops(shape, batch, 1, context=decode_context(seq_len, decode_tokens))
    return model_flops(shape, batch, seq_len, context=cached_len)


def held_bytes(shape: FlopShape, cp: int, tp: int, cached_tokens: int, tokens: int | None = None) -> float:
    """Bytes one GPU of a cp x tp mesh reads per forward of ``tokens`` tokens (None: enough
    to route to every expert): its 1/tp of the layer weights and the whole LM head (FMS's
    TP replicates it), plus its share of ``cached_tokens`` K/V -- 1/cp of the tokens and
    its kv-heads (1/tp of them, at least one). Of MoE experts, the share ``tokens`` tokens
    are expected to reach, each routed independently."""
    unread = 0.0 if tokens is None else shape.expert_bytes * (1 - shape.expert_share) ** tokens
    weights = (shape.weight_bytes - unread - shape.head_bytes) / tp + shape.head_bytes
    kv_share = max(shape.kv_heads // tp, 1) / shape.kv_heads if shape.kv_heads else 1 / tp
    return weights + cached_tokens * shape.kv_bytes_per_token * kv_share / cp


def floor_ms(
    shape: FlopShape | None,
    rates: Rates | None,
    cp: int,
    tp: int,
    phase: str,
    batch: int,
    seq_len: int,
    cached_len: int = 0,
    decode_tokens: int = 0,
) -> float:
    """The least time this row's call can take on this hardware (ms); NaN without rates.

    ``cp`` x ``tp`` is how the strategy splits the work (schema.mesh_sizes):
    single 1 x 1, tp 1 x W, torch_cp W x 1, ring W/T x T.
    Prefill and followup: each GPU's share of the linear FLOPs at the matmul rate
    plus its share of the attention FLOPs at the attention rate, and never less
    than reading the weights the GPU holds once (what bounds a short follow-up).
    Decode, per token: the bytes each GPU must read (:func:`held_bytes`) over the
    memory bandwidth.
    """
    if shape is None or rates is None:
        return math.nan
    gpus = max(cp * tp, 1)
    if phase == "decode":
        held = held_bytes(shape, cp, tp, batch * decode_context(seq_len, decode_tokens), tokens=batch)
        return held / (rates.memory_gbps * 1e9) * 1e3
    linear, attention = flop_parts(shape, batch, seq_len, context=cached_len)
    compute = linear / gpus / (rates.matmul_tflops * 1e12) + attention / gpus / (rates.attention_tflops * 1e12)
    seconds = max(compute, held_bytes(shape, cp, tp, 0) / (rates.memory_gbps * 1e9))
    return seconds * 1e3 if math.isfinite(seconds) else math.nan
