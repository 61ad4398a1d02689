"""Cache placement bookkeeping (pure Python, identical on every rank)."""

import random

import pytest
import torch

from fmsring.cache import RingCache, RingCacheState


def test_placement_keeps_shards_within_one_token_and_tracks_indices():
    W = random.randint(2, 6)
    fills = tuple(random.randint(3, 6) for _ in range(W))
    state = RingCacheState(
        seq_len=sum(fills), fills=fills, slot_index=torch.arange(fills[0]), capacity=max(fills) + 1, cache_id=0
    )
    for _ in range(30):
        n = random.choice([1, 1, 1, 2, 5])
        owners = state.place(n)
        mine = RingCacheState.owned(owners, 0)
        picked = list(range(n))[mine] if isinstance(mine, slice) else mine
        assert picked == [i for i, r in enumerate(owners) if r == 0]
        before = state
        state = state.advanced(0, owners, headroom=4)
        assert state.seq_len == before.seq_len + n
        assert state.slot_index.tolist()[before.fills[0] :] == [before.seq_len + i for i in picked]
        assert state.capacity >= state.fills[0]
    assert max(state.fills) - min(state.fills) <= 1


def test_capacity_is_the_same_on_every_rank_and_grows_together():
    W, headroom = 3, 2
    states = [
        RingCacheState(seq_len=7, fills=(3, 2, 2), slot_index=torch.arange(3), capacity=4, cache_id=0) for _ in range(W)
    ]
    for _ in range(12):
        owners = states[0].place(1)
        nxt = [s.advanced(r, owners, headroom) for r, s in enumerate(states)]
        assert len({s.capacity for s in nxt}) == 1
        # one free slot past every old fill: a one-token step writes on every rank
        assert nxt[0].capacity >= max(max(nxt[0].fills), max(states[0].fills) + 1)
        states = nxt


def test_growing_keeps_the_filled_slots_zeros_the_rest_and_consumes_the_old_cache():
    fill, cap = 5, 7
    layers = [tuple(torch.randn(2, cap, 3, 4) for _ in range(2)) for _ in range(3)]
    before = [tuple(t.clone() for t in layer) for layer in layers]
    state = RingCacheState(seq_len=fill, fills=(fill,), slot_index=torch.arange(fill), capacity=cap, cache_id=0)
    cache = RingCache(layers, state)
    grown = cache.extend(0, [list(range(fill, fill + 6))], headroom=0, max_position=fill + 5)
    assert grown.state.capacity == 11 and grown.state.fills == (11,) and grown.state.max_position == fill + 5
    for old, new in zip(before, grown):
        for o, n in zip(old, new):
            assert n.shape == (2, 11, 3, 4)
            assert torch.equal(n[:, :fill], o[:, :fill]) and torch.all(n[:, fill:] == 0)
    assert cache.consumed and len(cache) == 0  # the old buffers are released, not held twice
    with pytest.raises(RuntimeError, match="grown into the cache a later step returned"):
        cache.check_usable()
    grown.check_usable()


def test_a_step_that_fits_shares_the_buffers_and_leaves_the_old_cache_usable():
    layers = [tuple(torch.randn(1, 8, 2, 4) for _ in range(2))]
    state = RingCacheState(seq_len=3, fills=(3,), slot_index=torch.arange(3), capacity=8, cache_id=0)
    cache = RingCache(layers, state)
    nxt = cache.advance(0, state.place(2), headroom=4, max_position=4)
    assert nxt.state.capacity == 8 and nxt.state.fills == (5,) and nxt.state.seq_len == 5
    assert all(a is b for a, b in zip(nxt[0], cache[0]))
    assert not cache.consumed and cache.state is state
    cache.check_usable()


def test_one_token_steps_append_slot_indices_in_place_and_keep_older_views():
    """A decode step's host bookkeeping must not copy every index it holds (a concatenation did: the
    host's time per step grew with the context); an older state still reads its own indices."""
    fill = random.randint(1, 50)
    state = RingCacheState(seq_len=fill, fills=(fill,), slot_index=torch.arange(fill), capacity=fill + 1, cache_id=0)
    states = [state]
    for _ in range(200):
        states.append(states[-1].advanced(0, states[-1].place(1), headroom=3))
    moved = sum(a.slot_index.data_ptr() != b.slot_index.data_ptr() for a, b in zip(states[1:], states[2:]))
    assert moved <= 8, f"the index buffer moved {moved} times in 200 steps"  # doubling: log2(200) moves
    for s in states:
        assert s.slot_index.tolist() == list(range(s.seq_len))
    follow = states[-1].extended(0, [list(range(states[-1].seq_len, states[-1].seq_len + 3))], headroom=3)
    assert follow.slot_index.tolist() == list(range(follow.seq_len))


def test_slot_indices_read_on_a_device_follow_every_state_a_step_makes():
    """The device mirror a masked step reads the indices from (``slot_index_on``) copies only what
    was appended since: after one-token steps, follow-ups of several tokens, a buffer that
    doubles, and steps from older states that rewrite the entries a newer one had with other
    indices (two ranks: which tokens rank 0 holds depends on the branch; the newest step's are the
    ones that hold), rank 0's indices read as the host's view, from any start."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    fill = rng.randint(1, 20)
    state = RingCacheState(2 * fill, (fill, fill), torch.arange(0, 2 * fill, 2), capacity=fill + 1, cache_id=0)
    cpu = torch.device("cpu")
    history = [(state, list(range(0, 2 * fill, 2)))]  # each state beside rank 0's indices
    for _ in range(80):
        if rng.random() < 0.3:  # a step from an older state: the states made after it no longer hold
            del history[rng.randrange(len(history)) + 1 :]
        last, mine = history[-1]
        tokens = list(range(last.seq_len, last.seq_len + rng.randint(1, 4)))
        ranks = [rng.randrange(2) for _ in tokens]
        new = [[t for t, r in zip(tokens, ranks) if r == dst] for dst in range(2)]
        history.append((last.extended(0, new, headroom=2), mine + new[0]))
        state, mine = history[-1]
        assert state.slot_index_on(cpu).tolist() == mine, f"seed {seed}"
        start = rng.randint(0, len(mine))
        assert state.slot_index_on(cpu, start).tolist() == mine[start:], f"seed {seed}"
    # a last step with a token on rank 0 (the walk may end on the prefill's index, which no step
    # appended to: copied whole): its indices live in a room and are read through the mirror
    state = state.extended(0, [[state.seq_len], []], headroom=2)
    assert state.slot_index_on(cpu).tolist() == mine + [state.seq_len - 1], f"seed {seed}"
    room = state.slot_room
    assert room is not None and room.synced == len(mine) + 1, f"seed {seed}"


def test_headroom_for_n_tokens_takes_them_without_growing():
    """After a prefill sized with headroom_for(n), n more tokens -- a follow-up laid out by any layout
    in one step, or one-token steps -- fit the capacity on every rank."""
    from fmsring.cache import headroom_for, prefill_capacity
    from fmsring.layout import LAYOUTS, ShardPlan

    for _ in range(20):
        world, prompt, n = random.randint(1, 6), random.randint(6, 60), random.randint(1, 80)
        assert headroom_for(n, world, minimum=0) <= -(-n // world) + 2
        assert headroom_for(n, world) >= 256  # never less than the default
        for layout in LAYOUTS:
            plan = ShardPlan.build(prompt, world, layout)
            capacity = prefill_capacity(plan.local_lens, headroom_for(n, world, minimum=0))
            state = RingCacheState(prompt, tuple(plan.local_lens), torch.arange(plan.local_len(0)), capacity, 0)
            if n >= world:  # a follow-up of n tokens
                turn = ShardPlan.build(n, world, layout)
                new = [[prompt + i for i in turn.indices(r)] for r in range(world)]
                assert state.extended(0, new, headroom=0).capacity == capacity, (world, prompt, n, layout)
            for _ in range(n):  # or n decode steps
                state = state.advanced(0, state.place(1), headroom=0)
            assert state.capacity == capacity, (world, prompt, n, layout)


def test_capacity_is_kept_while_it_suffices_and_grows_with_headroom_once_it_does_not():
    from fmsring.cache import capacity_for

    assert capacity_for((0, 0), (5, 4), 0, 3) == 8  # a prefill: the larger shard plus headroom
    assert capacity_for((5, 4), (5, 5), 8, 3) == 8  # fits: unchanged
    assert capacity_for((5, 5), (9, 9), 8, 3) == 12  # a follow-up outgrows it
    assert capacity_for((8, 7), (8, 8), 8, 3) == 12  # fits the fills, but a one-token step needs a slot past 8
