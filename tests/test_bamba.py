"""Bamba (hybrid Mamba2 + attention) through the ring, exactly as FMS (:mod:`fmsring.ssm`).

FMS's own Bamba, tiny (three layers, the middle one attention; Mamba2 chunks of 8 tokens, two
groups), every weight drawn by the test, held to the unsharded FMS model of the same weights
(float32, 1e-4): prompt logits at world sizes 1-4 and both layouts, prompts shorter and longer
than a chunk, odd lengths, and a chunk boundary on a rank boundary; greedy ``generate()`` with
and without cache (prefill, then FMS's Mamba2 recurrence on every rank); follow-ups on a kept
cache (pass-KV, pass-Q, both layouts, replicated steps, chunked prefill), which go on from the
cached state and conv window. The decays are drawn slow, so a state passed out of order or not
at all, or a conv halo not passed, is caught by the same comparison
(:func:`test_a_broken_state_pass_is_caught`). Padded batches and ``ring_tp`` > 1 are refused.

Not against HF transformers: FMS 1.13.1's Bamba adapter does not load a small transformers 5.x
``BambaForCausalLM`` checkpoint cleanly (shape mismatch), so the ring is held to what FMS computes.
"""

from __future__ import annotations

import contextlib
import random
from unittest import mock

import pytest
import torch

from tests.distributed import run_ranks
from tests.stepwise import piece_errors

CHUNK = 8
CONFIG = dict(
    emb_dim=64, head_dim=16, nlayers=3, nheads=4, kvheads=2, src_vocab_size=96, max_expected_seq_len=256,
    attn_layer_indices=[1], mamba_n_heads=8, state_size=8, n_groups=2, chunk_size=CHUNK,
)  # fmt: skip


def randomize(model: torch.nn.Module) -> None:
    """Every parameter drawn afresh, the same on every rank: norm scales near 1, the rest small,
    and A = -exp(A_log) small, so a state carries far along the sequence."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + name.endswith(("ln.weight", "norm.weight")))
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 0.05 + 0.01))
    assert not any(p.isnan().any() for p in model.parameters())


def _models(model_options: dict | None = None, **ring_options):
    """FMS's model and the ring's of the same random weights (``model_options``: e.g. device and
    dtype, for both)."""
    import fmsring

    options = {**CONFIG, **(model_options or {})}
    ref = fmsring.get_model("bamba", "9_8b", distributed_strategy="replicated", **options)
    randomize(ref)
    ring = fmsring.get_model("bamba", "9_8b", distributed_strategy="ring", **options, **ring_options)
    ring.model.load_state_dict(ref.state_dict())
    return ref, ring


def _prompt_errors(rank, world, prompts, broken, piece=None):
    """Prompt logits' max error against FMS per layout and length (``piece``: the scan's pieces
    cut to that many tokens, as a long segment's are)."""
    from fmsring import ssm

    ref, _ = _models()
    errs = {}
    pieces = mock.patch.object(ssm, "piece_len", lambda _ssm: piece) if piece else contextlib.nullcontext()
    with torch.no_grad(), broken_state_pass(ssm, broken), pieces:
        for layout in ("zigzag", "contiguous"):
            _, ring = _models(ring_layout=layout)
            for ids in prompts:
                expected = ref(ids, use_cache=True)[0]
                errs[layout, ids.shape[1]] = (ring(ids) - expected).abs().max().item()
    return errs


def broken_state_pass(ssm, broken: str | None):
    """What :mod:`fmsring.ssm` passes between segments, broken on purpose: the segments chained in
    reverse sequence order, every incoming state zero, or every conv halo zero (None: as it is)."""
    if broken is None:
        return contextlib.nullcontext()
    real = ssm._by_sequence

    def wrong(pieces, parts):
        segs = real(pieces, parts)
        if broken == "reversed":
            return segs[::-1]
        halos = parts[0].dim() == 4  # the conv tails [segments, b, conv_dim, k]; else the states
        if halos == (broken == "zero_halo"):
            return [(s, n, torch.zeros_like(t)) for s, n, t in segs]
        return segs

    return mock.patch.object(ssm, "_by_sequence", wrong)


def _prompts(world: int) -> list[torch.Tensor]:
    """Shorter than a chunk, odd and several chunks long, and one whose contiguous shards end on
    chunk boundaries (world x chunk tokens)."""
    lengths = [random.randrange(world, CHUNK), random.randrange(3 * CHUNK, 6 * CHUNK) | 1, world * CHUNK]
    return [torch.randint(1, 96, (2, n)) for n in lengths]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_prompt_logits_match_fms(world):
    for errs in run_ranks(world, _prompt_errors, _prompts(world), None):
        assert max(errs.values()) <= 1e-4, errs


@pytest.mark.parametrize("world", [1, 2])
def test_segments_longer_than_the_scan_can_hold_run_in_pieces(world):
    """A segment past what FMS's scan holds in memory runs in pieces that pass state and conv halo
    on as ranks do; pieces of 11 tokens (no whole chunks) still match FMS."""
    for errs in run_ranks(world, _prompt_errors, _prompts(world), None, 11):
        assert max(errs.values()) <= 1e-4, errs


def test_the_scan_runs_at_most_what_its_memory_budget_holds():
    """Bamba-9.8B's scan holds 5 rows of 128 heads x 256 fp32 a token (640 KiB): 8 GiB hold 51 of its
    256-token chunks, and a budget under one chunk still runs one chunk at a time."""
    from types import SimpleNamespace

    from fmsring import ssm

    shapes = SimpleNamespace(chunk_size=256, nheads=128, ssm_state_size=128, head_dim=64)
    assert ssm.piece_len(shapes) == 51 * 256
    with mock.patch.object(ssm, "SCAN_SCRATCH_BYTES", 2**20):
        assert ssm.piece_len(shapes) == 256


@pytest.mark.parametrize("broken", ["reversed", "zero_state", "zero_halo"])
def test_a_broken_state_pass_is_caught(broken):
    """The comparison above fails when the states are chained out of order or not passed, or
    when the conv halo is not passed."""
    ids = torch.randint(1, 96, (2, 5 * CHUNK + 1))
    for errs in run_ranks(3, _prompt_errors, [ids], broken):
        assert min(errs.values()) > 1e-3, errs


def _generate(rank, world, ids, n_new):
    from fms.utils.generation import generate

    import fmsring

    ref, ring = _models()
    kw = dict(max_seq_len=ids.shape[1] + n_new, max_new_tokens=n_new, do_sample=False)
    out = {"fms": generate(ref, ids, use_cache=True, **kw)}
    out["ring_cache"] = fmsring.generate(ring, ids, use_cache=True, **kw)
    out["ring_no_cache"] = fmsring.generate(ring, ids, use_cache=False, **kw)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_greedy_generate_matches_fms_with_and_without_cache(world):
    ids = torch.randint(1, 96, (2, random.randrange(2 * CHUNK, 3 * CHUNK)))
    for out in run_ranks(world, _generate, ids, CHUNK + 3):
        assert torch.equal(out["ring_cache"], out["fms"]) and torch.equal(out["ring_no_cache"], out["fms"])


def _state_addresses(rank, world, ids, steps):
    """Where every Mamba2 state lives after the prefill and after each one-token step."""
    _, ring = _models()
    seen = []
    with torch.no_grad():
        _, cache = ring(ids, use_cache=True)
        for _ in range(steps + 1):
            seen.append([(u.conv_state.data_ptr(), u.ssm_state.data_ptr()) for u in cache if not isinstance(u, tuple)])
            _, cache = ring(ids[:, -1:], past_key_value_states=cache, use_cache=True, last_n_tokens=1)
    return seen


@pytest.mark.parametrize("world", [1, 2])
def test_decode_steps_advance_the_mamba_states_in_place(world):
    """A captured decode step replays on the addresses it was captured with: the states a step
    advances must stay where they are (FMS's own step moves the conv window to a new tensor;
    greedy generation above checks the values)."""
    ids = torch.randint(1, 96, (2, random.randrange(2 * CHUNK, 3 * CHUNK)))
    for seen in run_ranks(world, _state_addresses, ids, 3):
        assert seen[0] and all(step == seen[0] for step in seen), seen


def _followup_errors(rank, world, ids, cuts):
    """Each way of feeding ``ids`` in pieces on a kept cache, against FMS's logits of the whole."""
    ref, _ = _models()
    with torch.no_grad():
        want = ref(ids, use_cache=True)[0]
    modes = {
        "pass_kv": dict(ring_followup="pass_kv"),
        "pass_q": dict(ring_followup="pass_q"),
        "contiguous": dict(ring_layout="contiguous"),
        "chunked": dict(ring_prefill_chunk=cuts[1]),
    }
    return piece_errors(lambda **options: _models(**options)[1], ids, cuts, want, modes)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_followups_match_fms(world):
    """A prompt of two tokens (from three ranks on, shorter than the ring: every rank runs it
    whole), a follow-up of several chunks, one of two tokens (replicated there), a one-token step
    and a last follow-up: each piece's logits as FMS's over the whole; and a chunked prefill (a
    prefill, then follow-ups)."""
    cuts = [2, 2 + 3 * CHUNK + 1, 2 + 3 * CHUNK + 3, 2 + 3 * CHUNK + 4]
    ids = torch.randint(1, 96, (2, cuts[-1] + random.randrange(CHUNK, 2 * CHUNK)))
    for errs in run_ranks(world, _followup_errors, ids, cuts):
        assert max(errs.values()) <= 1e-4, errs


def _bf16_errors(rank, world, ids):
    ref, _ = _models()
    fms, ring = _models(dict(data_type=torch.bfloat16))
    with torch.no_grad():
        want = ref(ids)
        return [((m(ids).float() - want).norm() / want.norm()).item() for m in (fms, ring)]


def test_in_bfloat16_the_ring_is_as_close_to_float32_as_fms_is():
    """In bf16 a random-weight Bamba's logits drift from its float32 ones through every layer, the more
    the deeper (at 9.8B's 32 layers the bench's 2% check of the ring against FMS's bf16 fails at 1K
    and 2K tokens on one GPU, though in float32 the two agree). What holds is that the ring's bf16
    logits are as close to FMS's float32 ones as FMS's own bf16 logits are."""
    ids = torch.randint(1, 96, (2, random.randrange(40, 120)))
    for fms_err, ring_err in run_ranks(2, _bf16_errors, ids):
        assert fms_err > 1e-3, "bf16 rounding should show"
        assert ring_err <= 1.5 * fms_err, (ring_err, fms_err)


def _compiled_decode(rank, world, ids, n_new):
    """Greedy steps with every decoder layer of a step compiled whole (forced onto CPU), as a GPU
    decodes: the Mamba2 blocks' one-token recurrence inside their graphs. Returns each step's
    error against FMS, dynamo's graph breaks and its graphs after the first step and the last."""
    from torch._dynamo.utils import counters

    from fmsring import fusion

    fusion.FUSE_DEVICES.add("cpu")
    ref, ring = _models()
    errs, graphs = [], []
    with torch.no_grad():
        _, cache = ring(ids, use_cache=True, last_n_tokens=1)
        want, ref_cache = ref(ids, use_cache=True)
        for _ in range(n_new):
            nxt = want[:, -1:].argmax(-1)
            got, cache = ring(nxt, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
            want, ref_cache = ref(nxt, past_key_value_states=ref_cache, use_cache=True)
            errs.append((got[:, -1] - want[:, -1]).abs().max().item())
            graphs.append(counters["stats"]["unique_graphs"])
    return errs, sum(counters["graph_break"].values()), graphs[0], graphs[-1]


def test_decode_with_whole_mamba_blocks_compiled_matches_fms():
    """A Mamba2 block's step compiles whole without a graph break, and later steps reuse the first
    step's graphs: FMS's block bumps a Python int of the cache every step, which the compiled
    graph would guard on (a graph per step, then dynamic ones) were it inside it."""
    ids = torch.randint(1, 96, (2, random.randrange(3, 30)))
    for errs, breaks, graphs, graphs_later in run_ranks(2, _compiled_decode, ids, 6):
        assert max(errs) <= 1e-4, errs
        assert breaks == 0 and graphs_later == graphs, (breaks, graphs, graphs_later)


def _refusals(rank, world):
    import fmsring

    ref, ring = _models()
    ids = torch.randint(1, 96, (1, 12))
    said = {}
    calls = {
        "padded": lambda: ring(ids, mask=torch.ones(1, 12, 12, dtype=torch.bool).tril()),
        "tp": lambda: fmsring.get_model("bamba", "9_8b", distributed_strategy="ring", ring_tp=2, **CONFIG),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as err:
            call()
        said[name] = str(err.value)
    return said


def test_what_is_not_supported_is_refused():
    for said in run_ranks(2, _refusals):
        assert "padding mask" in said["padded"] and "ring_tp=1" in said["tp"]
