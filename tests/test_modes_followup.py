"""Follow-ups on the sharded cache and chunked prefill, on real gloo ranks.

The reference is HF transformers' full forward over the whole conversation so
far (independent code): a follow-up's logits must be the logits HF gives the
same tokens with everything before them in context. Tiny random checkpoints
written with ``save_pretrained``; fresh random inputs every run (the seed is
printed on failure). float32 tolerance as in test_model: 1e-4 max abs.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.distributed import run_ranks
from tests.stepwise import block_graphs
from tests.tiny_checkpoint import VOCAB, fms_model, hf_model

MODES = ("auto", "pass_kv", "pass_q")


def _conversation(rank, world, ckpts, turns):
    """Every (kind, layout, mode): the logits of every turn's tokens, a turn at a time on the cache."""
    from fmsring.layout import LAYOUTS

    out = {}
    for kind, path in ckpts.items():
        for layout in LAYOUTS:
            for mode in MODES:
                ring = fms_model(path, torch.float32, "ring", ring_layout=layout, ring_followup=mode)
                logits, cache = ring(turns[0], use_cache=True)
                got = [logits]
                for turn in turns[1:]:
                    logits, cache = ring(turn, past_key_value_states=cache, use_cache=True)
                    got.append(logits)
                out[(kind, layout, mode)] = (got, cache.state.fills)
    return out


def _hf_turn_logits(path, turns):
    with torch.no_grad():
        full = hf_model(path)(torch.cat(turns, dim=1)).logits
    bounds = torch.tensor([0, *[t.shape[1] for t in turns]]).cumsum(0).tolist()
    return [full[:, a:b] for a, b in zip(bounds, bounds[1:])]


def _check_conversation(world, checkpoints, lengths):
    turns = [torch.randint(0, VOCAB, (2, n)) for n in lengths]
    want = {kind: _hf_turn_logits(path, turns) for kind, path in checkpoints.items()}
    results = run_ranks(world, _conversation, checkpoints, turns)
    for rank, res in enumerate(results):
        assert len(res) == 2 * 2 * len(MODES)
        for (kind, layout, mode), (got, fills) in res.items():
            for i, (g, w) in enumerate(zip(got, want[kind])):
                assert g.shape == w.shape, (rank, kind, layout, mode, i)
                err = (g - w).abs().max().item()
                assert err <= 1e-4, (rank, kind, layout, mode, f"turn {i} of {lengths}", err)
            assert sum(fills) == sum(lengths)
            assert max(fills) - min(fills) <= 2 * len(lengths), fills  # shards stay balanced
    assert all(torch.equal(a[0][-1], b[0][-1]) for a, b in zip(results[0].values(), results[-1].values()))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_followups_match_hf_over_the_whole_conversation(world, checkpoints):
    """A prompt, then follow-ups of 1, 2, W-1, an odd number and more tokens than the prompt."""
    prompt = random.randrange(world, 3 * world + 2)
    odd = random.randrange(world + 1, 4 * world + 3) | 1
    lengths = [prompt, 1, 2, *([world - 1] if world > 2 else []), odd, prompt + random.randrange(3, 9)]
    _check_conversation(world, checkpoints, lengths)


@pytest.mark.parametrize("world", [2, 4])
def test_prompt_shorter_than_the_world_then_long_followups(world, checkpoints):
    """Too few tokens to shard run replicated on an empty cache; the follow-ups then shard."""
    _check_conversation(world, checkpoints, [random.randrange(1, world), random.randrange(2 * world, 5 * world), 3])


def _chunked(rank, world, path, ids, chunk):
    ring = fms_model(path, torch.float32, "ring", ring_prefill_chunk=chunk, ring_cache_headroom=1)
    every, cache = ring(ids[:, :-1], use_cache=True)
    prompt_state = cache.state
    tail = ring(ids[:, :-1], last_n_tokens=5)
    step, cache = ring(ids[:, -1:], past_key_value_states=cache, use_cache=True)
    return torch.cat([every, step], dim=1), tail, prompt_state, cache.state


@pytest.mark.parametrize("world", [2, 3])
def test_chunked_prefill_matches_hf(world, checkpoints):
    """Chunks that do not divide the prompt (the last one shorter than the world joins the one before);
    all logits, the last few, and a decode step on the chunked cache."""
    chunk = random.randrange(world, 11)
    n = chunk * random.randrange(3, 6) + random.randrange(1, world)  # a remainder too short to shard
    ids = torch.randint(0, VOCAB, (2, n + 1))
    path = checkpoints["gqa"]
    with torch.no_grad():
        want = hf_model(path)(ids).logits
    for every, tail, prompt_state, state in run_ranks(world, _chunked, path, ids, chunk):
        assert (every - want).abs().max() <= 1e-4
        assert (tail - want[:, n - 5 : n]).abs().max() <= 1e-4
        assert sum(prompt_state.fills) == n and sum(state.fills) == n + 1
        # sized once for the whole prompt (plus the headroom of 1): neither a chunk nor the step grew it
        assert prompt_state.capacity == max(prompt_state.fills) + 1 == state.capacity


def _generate_after_followup(rank, world, path, prompt, turn, n_new):
    ring = fms_model(path, torch.float32, "ring", ring_cache_headroom=2)
    _, cache = ring(prompt, use_cache=True)
    logits, cache = ring(turn, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
    tokens = []
    for _ in range(n_new):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits, cache = ring(nxt, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
    return torch.cat(tokens, dim=1)


def test_greedy_generation_after_a_followup_matches_hf(checkpoints):
    path, world, n_new = checkpoints["gqa"], 3, 9
    prompt = torch.randint(0, VOCAB, (1, random.randrange(world, 20)))
    turn = torch.randint(0, VOCAB, (1, random.randrange(world, 20)))
    with torch.no_grad():
        full = torch.cat([prompt, turn], dim=1)
        want = hf_model(path).generate(full, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    for got in run_ranks(world, _generate_after_followup, path, prompt, turn, n_new):
        assert torch.equal(got, want[:, full.shape[1] :])


def _padded_followup(rank, world, path, ids, mask, positions, turn):
    ring = fms_model(path, torch.float32, "ring")
    _, cache = ring(ids, mask=mask, position_ids=positions, use_cache=True)
    b, n, total = turn.shape[0], turn.shape[1], ids.shape[1] + turn.shape[1]
    prompt_keys = mask[:, -1, :] if mask.dtype == torch.bool else mask[:, -1, :] == 0  # FMS's masks are additive
    keys = torch.cat([prompt_keys, torch.ones(b, n, dtype=torch.bool)], dim=1)  # the prompt's padding, then new
    causal = torch.ones(n, total, dtype=torch.bool).tril(total - n)
    turn_mask = keys.unsqueeze(1) & causal
    turn_pos = positions[:, -1:] + 1 + torch.arange(n)
    logits, _ = ring(turn, past_key_value_states=cache, use_cache=True, mask=turn_mask, position_ids=turn_pos)
    return logits


def test_padded_batch_followup_matches_hf(checkpoints):
    from fms.utils.generation import pad_input_ids

    path, world = checkpoints["mha"], 2
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (random.randrange(8, 20), random.randrange(2, 7))]
    ids, kw = pad_input_ids(prompts)
    turn = torch.randint(0, VOCAB, (2, random.randrange(2, 9)))
    hf = hf_model(path)
    for got in run_ranks(world, _padded_followup, path, ids, kw["mask"], kw["position_ids"], turn):
        for i, p in enumerate(prompts):
            with torch.no_grad():
                want = hf(torch.cat([p, turn[i]]).unsqueeze(0)).logits[0, len(p) :]
            assert (got[i] - want).abs().max() <= 1e-4


def _record_kernels(rank, world, path, prompt, turn):
    """The attention calls of one unmasked follow-up, per forced mode."""
    import fmsring.ring
    import fmsring.windows
    from fmsring.kernels import attention_with_lse

    calls = []

    def recording(q, k, v, scale, causal=False, bias=None):
        calls.append({"rows": q.shape[2], "keys": k.shape[2], "causal": causal, "bias": bias is not None})
        return attention_with_lse(q, k, v, scale, causal, bias)

    fmsring.windows.attention_with_lse = recording  # every block a mode plans
    fmsring.ring.attention_with_lse = recording  # a masked prefill's
    out = {}
    for mode in ("pass_kv", "pass_q"):
        ring = fms_model(path, torch.float32, "ring", ring_followup=mode)
        _, cache = ring(prompt, use_cache=True)
        calls.clear()
        ring(turn, past_key_value_states=cache, use_cache=True)
        out[mode] = list(calls)
    return out


def test_unmasked_followup_runs_fused_kernels_without_a_dense_mask(checkpoints):
    """No attention call of a follow-up carries a bias (the T x P mask of the old path), no call
    has more query rows than a rank's share, and each would run a fused kernel in bf16, on a GPU or a CPU."""
    from fmsring.kernels import select_kernel

    world, n_layers = 2, 2
    prompt, turn = torch.randint(0, VOCAB, (1, 40)), torch.randint(0, VOCAB, (1, 24))
    for res in run_ranks(world, _record_kernels, checkpoints["gqa"], prompt, turn):
        for mode, calls in res.items():
            assert calls and len(calls) % n_layers == 0, mode
            for c in calls:
                assert not c["bias"] and c["rows"] <= 24 // world, (mode, c)
                assert select_kernel("cuda", torch.bfloat16, 16, c["rows"], c["causal"], c["bias"]) != "math"
                assert select_kernel("cpu", torch.bfloat16, 16, c["rows"], c["causal"], c["bias"]) == "cpu_flash"


def _rope_sizes_while_decoding(rank, world, path, ids, steps):
    ring = fms_model(path, torch.float32, "ring")
    logits, cache = ring(ids, use_cache=True, last_n_tokens=1)
    sizes = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits, cache = ring(nxt, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
        sizes.append(ring.rope.sizes(nxt.device))
    return sizes


def test_decoding_past_the_rope_table_regrows_it_rarely(checkpoints):
    """Past the checkpoint's table every step needs a longer one; growing by doubling regrows it (and
    recaptures a decode graph) a few times, not at every token. Logits past the table: test_model."""
    from tests.tiny_checkpoint import MAX_POS

    ids = torch.randint(0, VOCAB, (1, MAX_POS - 2))
    for sizes in run_ranks(2, _rope_sizes_while_decoding, checkpoints["gqa"], ids, 3 * MAX_POS):
        assert sizes[-1][0] >= 4 * MAX_POS - 2
        assert len(set(sizes)) <= 3, sorted(set(sizes))


def _followups_compiled_whole(rank, world, path, turns, bound, headroom):
    """The turns on the ring with every decoder layer able to compile whole (forced onto CPU),
    follow-ups of up to ``bound`` tokens compiled whole, the cache made with ``headroom`` free
    slots: every turn's logits, how many graphs dynamo holds for the decoder block after each
    turn, and the graph breaks."""
    from torch._dynamo.utils import counters

    from fmsring import fusion
    from fmsring.modes import followup

    fusion.FUSE_DEVICES.add("cpu")
    followup.WHOLE_LAYER_TOKENS = bound
    counters.clear()
    ring = fms_model(path, torch.float32, "ring", ring_cache_headroom=headroom)
    logits, cache = ring(turns[0], use_cache=True)
    got, graphs = [logits], []
    for turn in turns[1:]:
        logits, cache = ring(turn, past_key_value_states=cache, use_cache=True)
        got.append(logits)
        graphs.append(block_graphs(ring))
    return got, graphs, dict(counters["graph_break"])


def _check_compiled_whole(world, path, lengths, bound, headroom):
    turns = [torch.randint(0, VOCAB, (2, n)) for n in lengths]
    want = _hf_turn_logits(path, turns)
    results = run_ranks(world, _followups_compiled_whole, path, turns, bound, headroom)
    for got, _, breaks in results:
        for i, (g, w) in enumerate(zip(got, want)):
            assert (g - w).abs().max() <= 1e-4, f"turn {i} of {lengths}"
        assert not breaks
    return [graphs for _, graphs, _ in results]


def _graphs_expected(lengths: list[int], bound: int) -> list[int]:
    """The graphs dynamo holds for the decoder block after each follow-up of ``lengths[1:]`` on a
    cache with room for all: the first short one compiles its shapes; the next, on more cached
    tokens, compiles once more with what changed dynamic (the cached length, and the new tokens'
    count if it changed too); a later one whose count first differs, once more; then none."""
    graphs, first, dynamic_count = [], None, False
    for n in lengths[1:]:
        count = graphs[-1] if graphs else 0
        if n <= bound:
            if first is None:
                first, count = n, 1
            elif count == 1:
                count, dynamic_count = 2, n != first
            elif not dynamic_count and n != first:
                count, dynamic_count = count + 1, True
        graphs.append(count)
    return graphs


@pytest.mark.parametrize("world", [1, 2])
def test_short_followups_compiled_whole_match_hf(world, checkpoints):
    """On one rank, follow-ups of up to ``WHOLE_LAYER_TOKENS`` run each decoder layer as one
    compiled graph: HF's logits at every turn, with a graph for the first follow-up and one more
    for each shape that first changes (:func:`_graphs_expected`), three at most whatever the
    lengths (a graph per follow-up would hit dynamo's recompile limit in a conversation of eight
    turns), and no graph break; a longer follow-up runs module by module. On two ranks no
    follow-up compiles whole (its attention exchanges queries and partials). The cache has room
    for every turn."""
    bound = random.randrange(5, 9)
    short = [random.randrange(2, bound + 1) for _ in range(4)]
    lengths = [random.randrange(4, 12), *short[:2], bound + random.randrange(1, 4), *short[2:]]
    want = _graphs_expected(lengths, bound) if world == 1 else [0] * 5
    for graphs in _check_compiled_whole(world, checkpoints["gqa"], lengths, bound, sum(lengths)):
        assert graphs == want, (lengths, graphs)
        assert max(graphs) <= 3


def test_short_followups_on_a_growing_cache_compile_a_bounded_number_of_times(checkpoints):
    """A cache with one free slot grows at every follow-up and is left full by some: its capacity
    turns dynamic at the second follow-up with the cached length, the new tokens' count when it
    first changes, and a follow-up that fills the cache to its last slot compiles once more (the
    compiler tells a full cache from one with room), so a long conversation holds at most four
    graphs, past which none is added, and still gives HF's logits."""
    bound = random.randrange(4, 7)
    lengths = [random.randrange(4, 10), *(random.randrange(2, bound + 1) for _ in range(9))]
    (graphs,) = _check_compiled_whole(1, checkpoints["gqa"], lengths, bound, 1)
    assert graphs[:2] == [1, 2] and max(graphs) <= 4 and graphs == sorted(graphs), (lengths, graphs)
