"""Fused (torch.compile'd) elementwise work against FMS's eager modules.

On CUDA the fused code is what runs; here it is forced onto CPU so the
compiled graphs are checked for real. fp32 throughout, so the only
difference allowed is fp32 reassociation inside the fused reductions:
1e-5 relative to the logits' scale is ~100 ulp of fp32, far below any
real error (a wrong rotation or norm moves logits by O(1)).
"""

import copy
import random

import fms.models
import pytest
import torch
from fms.modules.layernorm import LayerNormParameterized
from torch._dynamo.utils import counters

from fmsring import fusion
from fmsring.fusion import (
    FusedGatedLinearUnit,
    FusedLayerNorm,
    FusedRotaryEmbedding,
    chunk_feedforward,
    fuse_elementwise,
)
from fmsring.merge import merge_stacked, merge_stacked_auto, pack_partial, pack_partial_auto
from tests.distributed import run_ranks
from tests.stepwise import block_graphs, graphs
from tests.tiny_checkpoint import VOCAB, fms_model, hf_model


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(fusion, "FUSE_DEVICES", {"cpu"})
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compiled_frames() -> int:
    return counters["frames"]["ok"]


def test_fused_model_matches_fms(fused_on_cpu):
    torch.manual_seed(random.randrange(2**31))
    ref = fms.models.get_model("llama", "micro", device_type="cpu", data_type=torch.float32, nlayers=3, kvheads=2)
    ref.eval()
    model = fuse_elementwise(copy.deepcopy(ref))
    chunk_feedforward(model, 5)  # chunking wraps the fused MLP, as in LlamaRing
    b, n = 2, random.randint(20, 40)
    ids = torch.randint(0, ref.config.src_vocab_size, (b, n))
    positions = torch.randint(1, 4, (b, n)).cumsum(1)  # gaps: RoPE sees relative distances only
    with torch.no_grad():
        for kwargs in ({}, {"position_ids": positions}):
            want, got = ref(ids, **kwargs), model(ids, **kwargs)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
        # one cached decode step: RoPE at an offset, norms and MLP on one token
        want, want_cache = ref(ids, use_cache=True)
        got, got_cache = model(ids, use_cache=True)
        nxt = want[:, -1:].argmax(-1)
        want, _ = ref(nxt, past_key_value_states=want_cache, use_cache=True)
        got, _ = model(nxt, past_key_value_states=got_cache, use_cache=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    # norm, MLP and RoPE really ran compiled, and once for all layers: a graph
    # per layer (8 here, x3) would hit dynamo's recompile limit on a 32-layer
    # model and leave the rest eager without a word
    assert 3 <= _compiled_frames() <= 12
    # the norm's one graph serves the prompt's rows and the step's one row (the final norm runs
    # outside a step's whole-layer graph): a second would be compiled, or loaded, at a first step
    assert graphs(LayerNormParameterized.forward) == 1


def test_fuse_swaps_exact_fms_classes_only():
    class OwnNorm(LayerNormParameterized):
        pass

    model = fms.models.get_model("llama", "micro", device_type="cpu", data_type=torch.float32, nlayers=1)
    block = model.base_model.layers[0]
    block.ln = OwnNorm(block.ln.normalized_shape)
    fuse_elementwise(model)
    assert type(block.ln) is OwnNorm
    assert type(block.ff_ln) is FusedLayerNorm
    assert type(block.ff_sub_layer) is FusedGatedLinearUnit
    assert type(block.attn.position_encoder) is FusedRotaryEmbedding


def test_fused_merge_helpers_match_eager(fused_on_cpu):
    world, b, h, d = random.randint(2, 4), 2, 4, 8
    outs = torch.randn(world, b, h, 1, d)
    lses = torch.randn(world, b, h, 1)
    lses[0, 0, 0, 0] = float("-inf")  # a shard that saw no key
    torch.testing.assert_close(pack_partial_auto(outs[0], lses[0]), pack_partial(outs[0], lses[0]))
    want = merge_stacked(outs, lses, torch.bfloat16)
    got = merge_stacked_auto(outs, lses, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=0)  # <= one bf16 ulp apart
    assert _compiled_frames() >= 2


def test_a_machine_that_cannot_compile_gets_a_way_out(fused_on_cpu):
    q = torch.randn(4, 8)
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True})
    with no_compiler, pytest.raises(RuntimeError, match=r"FUSE_DEVICES.discard\('cpu'\)"):
        pack_partial_auto(q, q[:, 0])
    fusion.FUSE_DEVICES.discard("cpu")  # what the message says: eager from here on
    torch.testing.assert_close(pack_partial_auto(q, q[:, 0]), pack_partial(q, q[:, 0]))


def _fused_decode(rank, world, path, prompts, n_new, ring_tp):
    """Greedy decode of each prompt in turn on the ring, every layer of a decode step compiled
    whole (forced onto CPU); per prompt, the logits of its last token and of each step, and how
    many graphs dynamo holds for the decoder block after it; then the graph breaks."""
    fusion.FUSE_DEVICES.add("cpu")
    model = fms_model(path, torch.float32, "ring", ring_tp=ring_tp)
    assert all(isinstance(b, fusion.FusedDecoderBlock) for b in model.model.base_model.layers)
    per_prompt = []
    with torch.no_grad():
        for ids in prompts:
            logits = []
            out, cache = model(ids, use_cache=True, last_n_tokens=1)
            for _ in range(n_new):
                logits.append(out[:, -1])
                out, cache = model(out[:, -1:].argmax(-1), past_key_value_states=cache, use_cache=True, last_n_tokens=1)
            logits.append(out[:, -1])
            per_prompt.append((torch.stack(logits, 1), block_graphs(model)))
    return per_prompt, dict(counters["graph_break"])


@pytest.mark.parametrize("world,ring_tp", [(2, 1), (2, 2)])
def test_decode_step_compiled_whole_matches_hf(checkpoints, world, ring_tp):
    """Decode steps whose decoder layers each run as one compiled graph (the ring's all-gather
    and FMS's TP all-reduce inside it) give HF's logits for the greedy continuation of prompts
    of three lengths, so three cache capacities. The layers share one compilation (a graph per
    layer would hit dynamo's recompile limit on 32 layers), a second capacity compiles once
    more with the capacity dynamic and a third none (one per capacity would hit the limit
    after 8 prompt lengths), and nothing breaks the graph."""
    path = checkpoints["gqa"]
    n_new = 4
    lens = [random.randrange(9, 14)]
    lens += [lens[-1] + random.randrange(4, 9) for _ in range(2)]
    prompts = [torch.randint(0, VOCAB, (2, n)) for n in lens]
    results = run_ranks(world, _fused_decode, path, prompts, n_new, ring_tp)
    hf = hf_model(path)
    for i, ids in enumerate(prompts):
        tokens = torch.cat([ids, results[0][0][i][0][:, :-1].argmax(-1)], dim=1)
        with torch.no_grad():
            want = hf(tokens).logits[:, ids.shape[1] - 1 :]
        for per_prompt, _ in results:
            assert (per_prompt[i][0] - want).abs().max() <= 1e-4, f"prompt of {lens[i]} tokens"
    for per_prompt, breaks in results:
        assert [graphs for _, graphs in per_prompt] == [1, 2, 2], lens
        assert not breaks
