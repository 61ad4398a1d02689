"""fmsring.conversation against an independent reference, on real gloo ranks.

Each turn's greedy reply must equal HF transformers' ``generate`` run from
scratch on the whole conversation so far (the turns and the earlier replies),
while the ring model only ever sees each turn as one follow-up step on the
cache it kept. Turns are fresh random draws: one token, fewer tokens than
ranks, empty, odd lengths, longer than the prompt; the conversation outgrows
the checkpoint's RoPE table and the cache's preallocated slots. Replies that
stop at an end-of-turn token hold it, and the next turn is fed after it.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.distributed import run_ranks
from tests.tiny_checkpoint import VOCAB, hf_conversation, hf_model, write_checkpoint

MAX_POS = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), kvheads=2, max_pos=MAX_POS)


def fresh_turns(world: int) -> tuple[list[list[int]], list[int]]:
    """A prompt and follow-ups of the shapes that stress the follow-up step, and each turn's reply length."""
    prompt_len = random.randrange(world + 2, 13)
    lengths = [
        prompt_len,
        1,
        world - 1,  # fewer tokens than ranks (none at one rank)
        random.randrange(3, 10) | 1,
        0,  # continues the previous reply
        prompt_len + random.randrange(1, 7),
    ]
    turns = [[random.randrange(VOCAB) for _ in range(n)] for n in lengths]
    n_new = [random.randrange(2, 6)] + [random.randrange(1, 5) for _ in lengths[1:]]
    return turns, n_new


def _converse(rank: int, world: int, path: str, turns: list[list[int]], n_new: list[int], eos: int):
    import fmsring
    from fmsring.conversation import Conversation

    model = fmsring.get_model(
        "hf_pretrained", model_path=path, data_type=torch.float32, distributed_strategy="ring", ring_cache_headroom=2
    )
    greedy = Conversation(model)
    replies, timings = [], []
    for turn, n in zip(turns, n_new):
        reply = greedy.say(turn, max_new_tokens=n)
        replies.append(reply.tokens.tolist())
        timings.append((reply.ttft_s, len(reply.token_s), reply.per_token_s))
    stopping = Conversation(model)
    stopped = [stopping.say(turn, max_new_tokens=n, eos_token_id=eos).tokens.tolist() for turn, n in zip(turns, n_new)]
    sampling = Conversation(model, do_sample=True, temperature=1.5, top_k=0)
    sampled = []
    for i, (turn, n) in enumerate(zip(turns, n_new)):
        torch.manual_seed(1000 * rank + i)  # ranks drift apart between turns: the conversation must align them
        sampled.append(sampling.say(turn, max_new_tokens=n).tokens.tolist())
    return replies, greedy.tokens.tolist(), timings, sampled, stopped, stopping.tokens.tolist()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_turns_match_hf_on_the_whole_conversation(world, checkpoint):
    """Greedy replies of their full length; then replies that stop at an end-of-turn token (one the
    greedy replies hold, so that some stop early) and enter the conversation with it, as HF's do."""
    turns, n_new = fresh_turns(world)
    hf = hf_model(checkpoint)
    want = hf_conversation(hf, turns, n_new)
    eos = random.choice([t for reply in want for t in reply])
    want_stopped = hf_conversation(hf, turns, n_new, eos_token_id=eos)
    results = run_ranks(world, _converse, checkpoint, turns, n_new, eos)
    for rank, (replies, tokens, timings, _, stopped, stopped_tokens) in enumerate(results):
        assert replies == want, (rank, turns)
        assert stopped == want_stopped, (rank, turns, eos)
        assert stopped_tokens == [t for turn, reply in zip(turns, stopped) for t in turn + reply]
        assert tokens == [t for turn, reply in zip(turns, replies) for t in turn + reply]
        for (ttft, n_later, per_token), n in zip(timings, n_new):
            assert ttft > 0 and n_later == n - 1
            assert math.isnan(per_token) if n == 1 else per_token > 0
    sampled = [r[3] for r in results]
    assert all(s == sampled[0] for s in sampled), "ranks sampled different tokens"
    assert [len(s) for s in sampled[0]] == n_new


def _bad_turns(rank: int, world: int, path: str) -> dict[str, str]:
    import fmsring
    from fmsring.conversation import Conversation

    model = fmsring.get_model("hf_pretrained", model_path=path, data_type=torch.float32, distributed_strategy="ring")
    chat = Conversation(model)
    errors = {}
    for name, ids, n_new in [
        ("batch", torch.zeros(2, 5, dtype=torch.long), 3),
        ("empty prompt", [], 3),
        ("floats", [1.0, 2.0], 3),
        ("no new tokens", [1, 2, 3], 0),
    ]:
        with pytest.raises((ValueError, TypeError)) as exc:
            chat.say(ids, n_new)
        errors[name] = str(exc.value)
    chat.say([3, 4, 5], 2)
    with pytest.raises(IndexError):
        chat.say([VOCAB + 5], 2)  # fails inside the model, after the cache was handed to the turn
    with pytest.raises(RuntimeError) as exc:
        chat.say([3], 2)
    errors["after a failed turn"] = str(exc.value)
    return errors


def test_bad_turns_raise_clear_errors(checkpoint):
    from fms.models import get_model

    from fmsring.conversation import Conversation

    plain = get_model("hf_pretrained", model_path=checkpoint)
    with pytest.raises(TypeError, match="distributed_strategy='ring'"):
        Conversation(plain)
    (errors,) = run_ranks(1, _bad_turns, checkpoint)
    assert "batch 1" in errors["batch"] and "Padded batches" in errors["batch"]
    assert "at least one token" in errors["empty prompt"]
    assert "must be ints" in errors["floats"]
    assert "max_new_tokens" in errors["no new tokens"]
    assert "start a new Conversation" in errors["after a failed turn"]
