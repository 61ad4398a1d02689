"""LlamaRing against independent references, on real gloo ranks.

References: HF transformers ``LlamaForCausalLM`` (independent code) and the
unsharded FMS model, both on a tiny random checkpoint this test writes with
``save_pretrained``. Inputs are fresh random draws every run.

The unsharded FMS reference runs with ``use_cache=True``: FMS 1.13.1's
no-cache SDPA path guesses the K/V layout from its shape and transposes
wrongly when seq_len == kvheads (seen here: 0.6 max error vs HF at L=2).

Tolerances: float32 max abs error <= 1e-4 (the issue's bound; ring reorders
fp32 sums, measured ~2e-6). bfloat16: both ring and the unsharded FMS model
round activations to bf16 (8-bit mantissa, ~0.4% per rounding) at the same
places, ring only reorders fp32 accumulations, so ring's error against the
float32 HF logits, as ||ring - hf|| / ||hf||, must stay within 1.5x the
unsharded bf16 model's own (and under 3e-2). Measured over 96 fresh cases:
the ratio was at most 1.10, both errors ~1e-2. The max abs error is not used
here: over thousands of logits it is a noisy statistic (its ratio reached
1.6 on those draws and 1.9 once in CI).
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.distributed import run_ranks
from tests.tiny_checkpoint import MAX_POS, VOCAB, fms_model, hf_model  # prompts go past MAX_POS


def hf_padded_logits(hf, prompts):
    """HF logits for left-padded prompts, each row's real positions only."""
    out = []
    for p in prompts:
        with torch.no_grad():
            out.append(hf(p.unsqueeze(0)).logits[0])
    return out


# ---------------------------------------------------------------- logits


def _logit_errors(rank, world, ckpts, inputs, prompts, dtype):
    from fms.utils.generation import pad_input_ids

    from fmsring.layout import LAYOUTS

    errs = {}
    for kind, path in ckpts.items():
        hf = hf_model(path)
        fms_ref = fms_model(path, dtype)
        for layout in LAYOUTS:
            ring = fms_model(path, dtype, "ring", ring_layout=layout)
            with torch.no_grad():
                for x in inputs:
                    want = hf(x).logits
                    got = ring(x).float()
                    tail = ring(x, last_n_tokens=3).float()
                    key = (kind, layout, tuple(x.shape))
                    errs[key] = {
                        "ring_vs_hf": (got - want).abs().max().item(),
                        "tail_vs_full": (tail - got[:, -3:]).abs().max().item(),
                        "shape": tuple(got.shape),
                    }
                    if x.shape[1] <= MAX_POS:  # plain FMS cannot go past its RoPE table
                        ref = fms_ref(x, use_cache=True)[0].float()
                        errs[key]["ring_vs_fms"] = (got - ref).abs().max().item()
                        errs[key]["fms_vs_hf"] = (ref - want).abs().max().item()
                        errs[key]["ring_vs_hf_rel"] = ((got - want).norm() / want.norm()).item()
                        errs[key]["fms_vs_hf_rel"] = ((ref - want).norm() / want.norm()).item()
                ids, kw = pad_input_ids(prompts)
                got = ring(ids, **kw).float()
                want = hf_padded_logits(hf, prompts)
                errs[(kind, layout, "padded")] = {
                    "ring_vs_hf": max((got[i, -len(p) :] - want[i]).abs().max().item() for i, p in enumerate(prompts)),
                }
    return errs


def fresh_inputs(world):
    lengths = sorted({world, 2 * world + 1, random.randrange(9, 40) | 1, random.randrange(MAX_POS + 1, MAX_POS + 30)})
    inputs = [torch.randint(0, VOCAB, (1 if i % 2 else 2, L)) for i, L in enumerate(lengths)]
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (random.randrange(world + 3, 30), random.randrange(world, 12))]
    return inputs, prompts


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_float32_logits_match_hf_and_fms(world, checkpoints):
    inputs, prompts = fresh_inputs(world)
    errs = run_ranks(world, _logit_errors, checkpoints, inputs, prompts, torch.float32)
    for rank_errs in errs:
        assert len(rank_errs) == 2 * 2 * (len(inputs) + 1)
        for key, e in rank_errs.items():
            assert e["ring_vs_hf"] <= 1e-4, (key, e)
            assert e.get("ring_vs_fms", 0.0) <= 1e-4, (key, e)
            assert e.get("tail_vs_full", 0.0) <= 1e-5, (key, e)
    assert errs[0] == errs[-1], "ranks returned different logits"


@pytest.mark.parametrize("world", [2, 3])
def test_bfloat16_logits_as_close_as_unsharded_bf16(world, checkpoints):
    inputs, prompts = fresh_inputs(world)
    checked = 0
    for e in run_ranks(world, _logit_errors, checkpoints, inputs, prompts, torch.bfloat16)[0].values():
        if "fms_vs_hf_rel" in e:
            assert e["ring_vs_hf_rel"] <= 1.5 * e["fms_vs_hf_rel"], e
            assert e["ring_vs_hf_rel"] <= 3e-2, e
            checked += 1
    assert checked >= 2 * 2 * 3


# ---------------------------------------------------------------- generation


def _generate(rank, world, path, ids, pad_kw, n_new, do_sample, ring_kw=None):
    from fms.utils.generation import generate

    from fmsring.layout import LAYOUTS

    torch.manual_seed(1000 + rank)  # different streams per rank: ring must align them
    out = {}
    for layout in LAYOUTS:
        ring = fms_model(path, torch.float32, "ring", ring_layout=layout, ring_cache_headroom=3, **(ring_kw or {}))
        for use_cache in (False, True):  # no-cache first: its prefills alone must align the RNG
            with torch.no_grad():
                res = generate(
                    ring,
                    ids,
                    max_new_tokens=n_new,
                    use_cache=use_cache,
                    do_sample=do_sample,
                    max_seq_len=10_000,
                    extra_kwargs=dict(pad_kw) if pad_kw else None,
                )
            out[(layout, use_cache)] = res[:, ids.shape[1] :]
    return out


def reference_tokens(path, prompts, n_new):
    """HF greedy generate and FMS single-process greedy generate, per prompt."""
    from fms.utils.generation import generate

    hf, fms_ref = hf_model(path), fms_model(path)
    hf_out, fms_out = [], []
    with torch.no_grad():
        for p in prompts:
            hf_out.append(
                hf.generate(p.unsqueeze(0), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[0, len(p) :]
            )
            fms_out.append(
                generate(fms_ref, p.unsqueeze(0), max_new_tokens=n_new, use_cache=True, do_sample=False)[0, len(p) :]
            )
    return torch.stack(hf_out), torch.stack(fms_out)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_greedy_generation_matches_hf_and_fms(world, checkpoints):
    from fms.utils.generation import pad_input_ids

    path = checkpoints["gqa"]
    n_new = 5 * world + 2  # wraps the round-robin cache placement five times
    prompts = [
        torch.randint(0, VOCAB, (n,)) for n in (random.randrange(2 * world, 40), random.randrange(world, 2 * world + 3))
    ]
    ids, kw = pad_input_ids(prompts)
    hf_tok, fms_tok = reference_tokens(path, prompts, n_new)
    assert torch.equal(hf_tok, fms_tok)
    single = run_ranks(world, _generate, path, prompts[0].unsqueeze(0), None, n_new, False)
    padded = run_ranks(world, _generate, path, ids, kw, n_new, False)
    for rank in range(world):
        for key in single[rank]:
            assert torch.equal(single[rank][key][0], hf_tok[0]), (rank, key)
            assert torch.equal(padded[rank][key], hf_tok), (rank, key)


def test_sampled_tokens_agree_on_every_rank(checkpoints):
    ids = torch.randint(0, VOCAB, (2, 23))
    outs = run_ranks(3, _generate, checkpoints["mha"], ids, None, 12, True)
    for key in outs[0]:
        assert all(torch.equal(o[key], outs[0][key]) for o in outs), key


# ---------------------------------------------------------------- random-init variants


def _random_init(rank, world):
    import copy

    import fmsring

    torch.manual_seed(rank)  # a careless launcher: every rank seeded differently
    ring = fmsring.get_model("llama", "micro", distributed_strategy="ring", nlayers=2, kvheads=2)
    plain = copy.deepcopy(ring.model)
    ids = torch.randint(0, 256, (1, 29), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        err = (ring(ids) - plain(ids, use_cache=True)[0]).abs().max().item()
    return err, sum(p.double().sum().item() for p in ring.parameters())


def test_random_init_variants_are_identical_on_every_rank():
    res = run_ranks(3, _random_init)
    assert all(err <= 1e-4 for err, _ in res)
    assert len({checksum for _, checksum in res}) == 1


# ---------------------------------------------------------------- multi-token continuation


def _continue(rank, world, path, ids, cut):
    ring = fms_model(path, torch.float32, "ring", ring_cache_headroom=2)
    with torch.no_grad():
        head, cache = ring(ids[:, :cut], use_cache=True)
        mid, cache = ring(ids[:, cut:-1], past_key_value_states=cache, use_cache=True)
        last, cache = ring(ids[:, -1:], past_key_value_states=cache, use_cache=True)
    return torch.cat([head, mid, last], dim=1), cache.state.fills


def test_cached_continuation_of_several_tokens_matches_hf(checkpoints):
    """A cache extended by 7 tokens at once (spread over ranks, outgrowing the
    buffers) then by one gives HF's logits for the whole sequence."""
    path = checkpoints["gqa"]
    ids = torch.randint(0, VOCAB, (2, random.randrange(20, 40)))
    with torch.no_grad():
        want = hf_model(path)(ids).logits
    for got, fills in run_ranks(3, _continue, path, ids, ids.shape[1] - 8):
        assert (got - want).abs().max() <= 1e-4
        assert sum(fills) == ids.shape[1] and max(fills) - min(fills) <= 2


def test_chunked_feedforward_is_exact_and_keeps_state_dict_keys(checkpoints):
    from fmsring.fusion import ChunkedFeedForward, chunk_feedforward

    model = fms_model(checkpoints["gqa"])
    keys = list(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, random.randrange(20, 60)))
    with torch.no_grad():
        want = model(ids, use_cache=True)[0]
        chunk_feedforward(model, 7)
        got = model(ids, use_cache=True)[0]
    assert sum(isinstance(m, ChunkedFeedForward) for m in model.modules()) == 2
    assert list(model.state_dict()) == keys
    assert (got - want).abs().max() <= 1e-5


# ---------------------------------------------------------------- host syncs


def _count_input_checks(rank, world, path, ids, pad_kw, n_new):
    from fms.utils.generation import generate

    import fmsring.model

    calls = []
    check = fmsring.model.check_same_on_all_ranks
    fmsring.model.check_same_on_all_ranks = lambda *a: calls.append(1) or check(*a)
    ring = fms_model(path, torch.float32, "ring", ring_check_inputs=True)
    with torch.no_grad():
        out = generate(ring, ids, max_new_tokens=n_new, use_cache=True, do_sample=False, extra_kwargs=dict(pad_kw))
    return len(calls), out


def test_input_check_runs_once_per_generate_not_per_token(checkpoints):
    """The all-ranks input check (an all-reduce and a host sync) runs on the prompt, not on
    every decoded token -- padding's position ids and mask included."""
    from fms.utils.generation import pad_input_ids

    prompts = [torch.randint(0, VOCAB, (n,)) for n in (random.randrange(6, 20), random.randrange(2, 6))]
    ids, kw = pad_input_ids(prompts)
    for calls, _ in run_ranks(2, _count_input_checks, checkpoints["gqa"], ids, kw, 6):
        assert calls == 1
