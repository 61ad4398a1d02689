"""Which FMS models the ring runs exactly, decided from the built model itself.

The ring shards tokens: each rank runs the model on its share of them, at
their global positions, and only attention reaches other ranks' tokens. That
is exact for a model whose every module works token by token except causal
self-attention with rotary positions. A module that carries a state along the
sequence, attends both ways (an encoder), embeds an image, or embeds
positions its own way would compute something else on a share -- at best a
shape error deep in the forward, at worst a plausible wrong answer. Mamba2
layers (Bamba) are the one sequence-carrying module the ring runs: their
conv halo and scan state pass between ranks (:mod:`fmsring.ssm`).

So fmsring runs a model only if every module in it is of a class it has
checked (:data:`EXACT`). It is an allow-list, not a list of what fails: a
family FMS adds later brings classes nobody has checked and is refused until
someone has. A refusal names the module and its feature, and says what to
run instead (:func:`check`).
"""

from __future__ import annotations

from fms.models import bamba, gpt_oss, granite, granite_moe_hybrid, granite_swa, llama, mistral, mixtral, qwen3
from fms.modules import attention, embedding, feedforward, head, layernorm, positions, ssm
from fms.utils import activation
from torch import nn

INSTEAD = "load it with distributed_strategy='replicated' (the whole model on every rank) or FMS's 'tp'"

# Decoders whose forward fmsring has read: they pass every layer the position ids they are given,
# run norms, MLPs and heads token by token, and attend only through MultiHeadAttention.
_DECODERS = (
    llama.LLaMA, llama.LLaMAHeadless, llama.LLaMABlock,
    granite.Granite, granite.GraniteHeadless, granite.GraniteBlock, granite_moe_hybrid.GraniteMoeHybrid,
    mistral.Mistral, mistral.MistralHeadless, mistral.MistralBlock,  # its sliding_window is unused, as in FMS
    qwen3.Qwen3, qwen3.Qwen3Headless, qwen3.Qwen3Block,
    mixtral.Mixtral, mixtral.MixtralHeadless, mixtral.MixtralBlock,
    gpt_oss.GptOss, gpt_oss.GptOssHeadless, gpt_oss.GptOssBlock,
    granite_swa.GraniteSWA, granite_swa.GraniteSWAHeadless, granite_swa.GraniteSWABlock,
    bamba.Bamba, bamba.BambaHeadless, bamba.BambaBlock,  # its Mamba2 layers: fmsring.ssm
)  # fmt: skip
# Mamba2 layers, whose conv and scan fmsring.ssm carries across the shards (ring_tp=1, no padding mask)
_RECURRENT = (ssm.SSM, ssm.RMSNormGated, nn.Conv1d)
# Modules that work token by token (MoE routes each token alone: no capacity, nothing dropped),
# and the attention the ring drives.
_PER_TOKEN = (
    attention.MultiHeadAttention, attention.TPMultiHeadAttention, attention.FusedQKV, attention.UnfusedQKV,
    layernorm.LayerNormParameterized, nn.LayerNorm,
    feedforward.GatedLinearUnit, feedforward.TPGatedLinearUnit,
    feedforward.FeedForwardBlock, feedforward.TPFeedForwardBlock,
    feedforward.MOEFeedForward, feedforward.ConditionalFeedForward,
    head.LinearClassificationHead, head.TPLinearClassificationHead,
    nn.Embedding, embedding.TPEmbedding, nn.Linear, nn.Dropout, nn.ModuleList, nn.Identity,
    nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, activation.GELUTanh,
)  # fmt: skip
EXACT: frozenset[type] = frozenset(_DECODERS + _PER_TOKEN + _RECURRENT)
# Where a checked decoder's block keeps the sliding window it passes its attention (FMS passes a
# window, and sinks, only to layers with sinks; the op reads both from its kwargs).
_WINDOWS = {gpt_oss.GptOssBlock: "layer_sliding_window", granite_swa.GraniteSWABlock: "window_length"}

# Why a class FMS has is not run, where that is known, for the refusal to say.
_ENCODER = "attends in both directions (an encoder): the ring runs causal decoders only"
_VISION = "is a vision tower: the ring shards a token sequence, not an image"
REASONS: dict[str, str] = {
    "fms.modules.feedforward.TPConditionalFeedForward": (
        "is FMS's tensor-parallel MoE expert layer, whose forward does not take the router scores "
        "MOEFeedForward passes it (FMS 1.13.1): MoE models run with ring_tp=1"
    ),
    "fms.models.roberta.RoBERTaHeadless": _ENCODER,
    "fms.models.mpnet.MpnetHeadless": _ENCODER,
    "fms.models.siglip_vision.SiglipVision": _VISION,
    "fms.models.pixtral_vision.PixtralVisionModel": _VISION,
    "fms.models.gpt_bigcode.GPTBigCodeHeadless": (
        "embeds learned absolute positions, counted past pad tokens, and its attention has no rotary "
        "positions: the ring runs rotary-position decoders only"
    ),
}


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _attention_reason(attn: attention.MultiHeadAttention) -> str | None:
    """Why the ring cannot drive this attention layer as FMS configured it, or None."""
    if not isinstance(attn.position_encoder, positions.RotaryEmbedding):
        found = type(attn.position_encoder).__name__
        return f"has position encoder {found}: the ring runs rotary-position (RotaryEmbedding) attention only"
    return None


def refusal(model: nn.Module) -> str | None:
    """Why the ring cannot run ``model`` exactly, naming the module; None if it can.

    A module with a known reason is named first (an MoE expert layer says more
    than the Mixtral class holding it), then any class fmsring has not checked.
    """
    unchecked = []
    for path, m in model.named_modules():
        where = f"{path or 'the model'} ({type(m).__name__})"
        reason = REASONS.get(_name(type(m)))
        if reason is None and isinstance(m, attention.MultiHeadAttention):
            reason = _attention_reason(m)
        if reason is not None:
            return f"{where} {reason}"
        if type(m) not in EXACT:
            unchecked.append(where)
    if unchecked:
        return (
            f"{unchecked[0]} is not a module fmsring has checked runs exactly on a share of the tokens "
            f"({len(unchecked)} such module(s))"
        )
    return None


def window_holders(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The blocks of ``model`` that may attend through a sliding window (:mod:`fmsring.windows`), each
    with the attribute FMS reads the window from at every forward."""
    return [(m, attr) for m in model.modules() for cls, attr in _WINDOWS.items() if isinstance(m, cls)]


def windows(holders: list[tuple[nn.Module, str]]) -> tuple[int, ...]:
    """The sliding windows ``holders`` (:func:`window_holders`) hold now, each once (0: none)."""
    return tuple(sorted({w for w in (getattr(m, attr) for m, attr in holders) if w}))


def check(model: nn.Module) -> None:
    """Refuse ``model`` with a clear message unless the ring runs it exactly."""
    reason = refusal(model)
    if reason is not None:
        raise ValueError(f"ring attention cannot run {type(model).__name__} exactly: {reason}; {INSTEAD}")
