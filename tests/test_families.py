"""Every family FMS 1.13.1 registers, under the ring: run exactly, or refused when it is loaded
(gpt-oss and Granite-SWA run exactly too: tests/test_sinks_windows.py; Bamba: tests/test_bamba.py).

A refusal names the layer or feature and says what to load instead -- never a shape
error in the forward, never a silently wrong answer. Families FMS builds from a
variant on CPU go through ``fmsring.get_model`` on two gloo ranks; the vision
families, which FMS 1.13.1 cannot build with random weights (SigLIP's
``reset_parameters`` recurses, Ministral3's variant lacks a RoPE argument), are
built on the meta device and wrapped in ``LlamaRing``, the same check.
"""

from __future__ import annotations

import random

import pytest
import torch

import fmsring
from tests.distributed import run_ranks
from tests.stepwise import block_graphs, greedy_step_errors, piece_errors

TINY = dict(nlayers=2, nheads=4, kvheads=2, src_vocab_size=96, max_expected_seq_len=256)
GQA = dict(emb_dim=64, head_dim=16, **TINY)
# (architecture, variant, overrides, ring_tp): FMS's own builds, small
REFUSED = {
    "gpt_bigcode": ("gpt_bigcode", "micro", {}, 1),
    "roberta": ("roberta", "micro", {}, 1),
    "roberta_classification": ("roberta_classification", "base", dict(nlayers=1, emb_dim=64, nheads=4), 1),
    "roberta_question_answering": ("roberta_question_answering", "base", dict(nlayers=1, emb_dim=64, nheads=4), 1),
    "bert": ("bert", "base", dict(nlayers=1, emb_dim=64, nheads=4, src_vocab_size=96), 1),
    "bert_classification": ("bert_classification", "base", dict(nlayers=1, emb_dim=64, nheads=4), 1),
    "mpnet": ("mpnet", "v2", dict(nlayers=1, emb_dim=64, nheads=4, src_vocab_size=96), 1),
    "mixtral_tp": (
        "mixtral", "8x7b", dict(TINY, dim=64, hidden_dim=96, num_experts=4), 2,
    ),
}  # fmt: skip
ENCODER = "attends in both directions"
WHY = {
    "gpt_bigcode": "learned absolute positions",
    "roberta": ENCODER,
    "roberta_classification": ENCODER,
    "roberta_question_answering": ENCODER,
    "bert": ENCODER,
    "bert_classification": ENCODER,
    "mpnet": ENCODER,
    "mixtral_tp": "TPConditionalFeedForward",
}
INSTEAD = "distributed_strategy='replicated'"


def _refusals(rank, world):
    messages = {}
    for name, (arch, variant, overrides, ring_tp) in REFUSED.items():
        try:
            fmsring.get_model(arch, variant, distributed_strategy="ring", ring_tp=ring_tp, **overrides)
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    return messages


def test_families_the_ring_cannot_run_exactly_are_refused_when_loaded():
    for messages in run_ranks(2, _refusals):
        for name, message in messages.items():
            assert message is not None, f"{name} was not refused"
            assert WHY[name] in message and INSTEAD in message, (name, message)


def _meta_models():
    from fms.models import llama, llava_next, ministral3, mistral3, siglip_vision

    class NewDecoder(llama.LLaMA):
        """A family FMS might add: LLaMA's modules, a forward nobody has checked."""

    rope = dict(rope_theta=1e6, factor=16.0, original_max_position_embeddings=256)
    with torch.device("meta"):
        return {
            "siglip_vision": siglip_vision.SiglipVision(siglip_vision.SiglipVisionConfig(nlayers=1)),
            "llava_next": llava_next.LlavaNext(llava_next.LlavaNextConfig()),
            "mistral3": mistral3.Mistral3(mistral3.Mistral3Config()),
            "ministral3_text": ministral3.Ministral3Text(ministral3.Ministral3TextConfig(rope_parameters=rope)),
            "new_decoder": NewDecoder(llama.LLaMAConfig(nlayers=1)),
        }


def _meta_refusals(rank, world):
    messages = {}
    for name, model in _meta_models().items():
        try:
            fmsring.LlamaRing(model, fmsring.RingAttentionStrategy())
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    return messages


def test_vision_families_and_unchecked_classes_are_refused_by_llama_ring():
    """The allow-list: a decoder class fmsring has not read is refused, even one built of
    modules it knows (a subclass may change the forward)."""
    why = {
        "siglip_vision": "the model (SiglipVision) is a vision tower",
        "llava_next": "vision_tower (SiglipVision) is a vision tower",
        "mistral3": "vision_tower (PixtralVisionModel) is a vision tower",
        "ministral3_text": "has position encoder CachedYarnRotaryEmbedding",
        "new_decoder": "the model (NewDecoder) is not a module fmsring has checked",
    }
    messages = run_ranks(1, _meta_refusals)[0]
    for name, message in messages.items():
        assert message is not None, f"{name} was not refused"
        assert why[name] in message and INSTEAD in message, (name, message)


def randomize(model: torch.nn.Module) -> None:
    """Every parameter drawn afresh (FMS's random init leaves some uninitialised, e.g. gpt-oss's
    expert biases), the same on every rank: norm scales near 1, the rest small."""
    from fms.modules.layernorm import LayerNormParameterized

    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in model.modules():
            for p in m.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + isinstance(m, LayerNormParameterized))


def _ring_against_fms(rank, world, arch, variant, overrides, ids, n_new):
    """The ring's prompt logits (both layouts) and greedy decode steps against the unsharded FMS
    model of the same weights: the largest absolute differences."""
    ref = fmsring.get_model(arch, variant, distributed_strategy="replicated", **overrides)
    randomize(ref)
    errs = {}
    with torch.no_grad():
        want, ref_cache = ref(ids, use_cache=True)
        for layout in ("zigzag", "contiguous"):
            ring = fmsring.get_model(arch, variant, distributed_strategy="ring", ring_layout=layout, **overrides)
            ring.model.load_state_dict(ref.state_dict())
            got, cache = ring(ids, use_cache=True)
            errs[layout] = (got - want).abs().max().item()
        errs["decode"] = max(greedy_step_errors(ring, ref, want, ref_cache, cache, n_new))
    return errs


RUN = {
    "mixtral": ("mixtral", "8x7b", dict(TINY, dim=64, hidden_dim=96, num_experts=4)),
    "granite_moe_hybrid": ("granite_moe_hybrid", "8b", dict(GQA, pad_id=0)),
    # FMS's Mistral never reads its sliding_window: the ring matches it, window or not
    "mistral_window": ("mistral", "7b", dict(GQA, sliding_window=3)),
}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("family", sorted(RUN))
def test_families_the_ring_runs_match_unsharded_fms(family, world):
    """Mixtral's MoE routes each token alone (top-k of its own scores, no capacity), so each rank
    running its share is exact; GraniteMoeHybrid is FMS's Granite."""
    arch, variant, overrides = RUN[family]
    ids = torch.randint(1, 96, (2, random.randrange(9, 40) | 1))
    for errs in run_ranks(world, _ring_against_fms, arch, variant, overrides, ids, 3):
        assert max(errs.values()) <= 1e-4, errs


def test_the_ring_op_refuses_attention_kwargs_it_does_not_know():
    """A family that passes its attention something new (say ALiBi slopes) gets an error, not a
    ring that ignores it; the sinks and window FMS passes are known (tests/test_sinks_windows.py)."""
    from fmsring import attention_op

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(TypeError, match=r"does not know the keyword argument\(s\) \['alibi_slopes'\]"):
        attention_op._compute_op(q, q, q, 4, 4, 0.0, None, attn_name="ring", ring=None, alibi_slopes=q)


def _followups_compiled_whole(rank, world, arch, variant, overrides, ids, cuts):
    """The prompt ``ids[:, :cuts[0]]`` then follow-ups up to each later cut on one rank, every
    decoder layer of a short follow-up compiled whole (forced onto CPU), against the unsharded
    FMS model of the same weights on the whole sequence: the largest absolute difference of the
    logits of every piece, how many graphs dynamo holds for the FMS decoder block, and the graph
    breaks."""
    from torch._dynamo.utils import counters

    from fmsring import fusion

    fusion.FUSE_DEVICES.add("cpu")
    counters.clear()
    ref = fmsring.get_model(arch, variant, distributed_strategy="replicated", **overrides)
    randomize(ref)
    ring = fmsring.get_model(arch, variant, distributed_strategy="ring", ring_cache_headroom=ids.shape[1], **overrides)
    ring.model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        want = ref(ids)
    err = piece_errors(lambda: ring, ids, cuts[:-1], want, {"whole": {}})["whole"]
    return err, block_graphs(ring), dict(counters["graph_break"])


@pytest.mark.parametrize(
    "family",
    [  # fast: GraniteMoeHybrid's experts routed in the graph (Mixtral's route alike, Mistral never reads its window)
        pytest.param(f, marks=() if f == "granite_moe_hybrid" else pytest.mark.slow) for f in sorted(RUN)
    ],
)
def test_short_followups_compiled_whole_match_unsharded_fms(family):
    """Short follow-ups on one rank run each decoder layer as one compiled graph
    (``fmsring.modes.followup.compiles_whole``) through each family's own block -- Mixtral's and
    GraniteMoeHybrid's experts routed per token inside the graph -- compiled twice (then dynamic)
    with no graph break, and give the unsharded FMS model's logits."""
    arch, variant, overrides = RUN[family]
    cuts = [random.randrange(5, 20)]
    for n in random.sample(range(2, 9), 3):  # lengths apart: the second one compiles the count dynamic
        cuts.append(cuts[-1] + n)
    ids = torch.randint(1, 96, (2, cuts[-1]))
    ((err, graphs, breaks),) = run_ranks(1, _followups_compiled_whole, arch, variant, overrides, ids, cuts)
    assert err <= 1e-4, err
    assert graphs == 2 and not breaks, (graphs, breaks)
