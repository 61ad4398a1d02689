"""Bad input gets a clear error on every rank -- never a hang or a wrong answer."""

from __future__ import annotations

import pytest
import torch

import fmsring
from tests.distributed import run_ranks


def test_ring_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        fmsring.get_model("llama", "micro", distributed_strategy="ring")
    with pytest.raises(RuntimeError, match="process group"):
        fmsring.RingAttentionStrategy()


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown distributed_strategy 'rng'"):
        fmsring.get_model("llama", "micro", distributed_strategy="rng")
    with pytest.raises(ValueError, match="unknown ring_layout 'spiral'"):
        fmsring.get_model("llama", "micro", distributed_strategy="ring", ring_layout="spiral")
    with pytest.raises(ValueError, match=r"unknown ring option\(s\) \['ring_pp'\]"):
        fmsring.get_model("llama", "micro", distributed_strategy="ring", ring_pp=2)
    with pytest.raises(RuntimeError, match="ring_tp needs an initialised torch.distributed process group"):
        fmsring.get_model("llama", "micro", distributed_strategy="ring", ring_tp=2)
    with pytest.raises(ValueError, match="unknown ring_followup 'pass_x'"):
        fmsring.get_model("llama", "micro", distributed_strategy="ring", ring_followup="pass_x")


def test_a_missing_checkpoint_path_says_so():
    for strategy in ("ring", "replicated", None):
        with pytest.raises(FileNotFoundError, match="^no such directory: /no/such$"):
            fmsring.get_model("hf_pretrained", model_path="/no/such", distributed_strategy=strategy)
    with pytest.raises(FileNotFoundError, match="^no such file or directory: /no/such.pth$"):
        fmsring.get_model("llama", "micro", model_path="/no/such.pth")


def test_generate_feeds_the_whole_prompt_or_refuses():
    """FMS's generate keeps only the last max_seq_len tokens (4096 unless told): fmsring's covers the
    prompt and the new tokens unless told, and refuses a window that would cut what a step feeds."""
    from fms.utils.generation import generate

    model = fmsring.get_model("llama", "micro", nlayers=1)
    ids = torch.randint(0, 256, (1, 9))
    with pytest.raises(ValueError, match=r"max_seq_len=8 is shorter than the prompt \(9 tokens\)"):
        fmsring.generate(model, ids, max_seq_len=8, max_new_tokens=2, use_cache=True)
    with pytest.raises(ValueError, match=r"the new tokens a step without a cache re-feeds \(11 tokens\)"):
        fmsring.generate(model, ids, max_seq_len=10, max_new_tokens=3)
    for use_cache in (True, False):
        ours = fmsring.generate(model, ids, max_new_tokens=3, use_cache=use_cache, do_sample=False)
        assert torch.equal(
            ours, generate(model, ids, max_seq_len=12, max_new_tokens=3, use_cache=use_cache, do_sample=False)
        )


def _bad_chunk(rank, world):
    try:
        fmsring.get_model("llama", "micro", distributed_strategy="ring", nlayers=1, ring_prefill_chunk=world - 1)
    except ValueError as e:
        return str(e)
    return None


def test_prefill_chunk_smaller_than_the_world_is_a_clear_error_on_every_rank():
    for message in run_ranks(3, _bad_chunk):
        assert message is not None and "at least one token per rank" in message


def _expect_errors(rank, world):
    from fms.utils.generation import generate

    torch.manual_seed(0)
    model = fmsring.get_model("llama", "micro", distributed_strategy="ring", nlayers=1)
    ids = torch.randint(0, 256, (1, 9))
    cases = {
        "different_ids": lambda: model(torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(rank))),
        "empty": lambda: model(ids[:, :0]),
        "float_ids": lambda: model(ids.float()),
        "wrong_device": lambda: model(ids.to("meta")),
        "bad_mask": lambda: model(ids, mask=torch.zeros(1, 4, 9)),
        "bad_positions": lambda: model(ids, position_ids=torch.arange(8).unsqueeze(0)),
        "foreign_attn": lambda: model(ids, attn_name="sdpa_causal"),
        "unknown_kwarg": lambda: model(ids, attn_algorithm="math"),
        "plain_list_cache": lambda: model(
            ids[:, :1], past_key_value_states=list(model(ids, use_cache=True)[1]), use_cache=True
        ),
        "contiguous_cache": lambda: generate(
            model, ids, max_new_tokens=2, use_cache=True, do_sample=False, contiguous_cache=True
        ),
    }
    got = {}
    for name, call in cases.items():
        try:
            call()
            got[name] = None
        except Exception as e:  # noqa: BLE001 -- the test records what each case raised
            got[name] = (type(e).__name__, str(e))
    # after all that, the group still works: a good call gives the right shape
    got["recovered"] = tuple(model(ids, last_n_tokens=1).shape)
    return got


def test_bad_inputs_raise_on_every_rank():
    expected = {
        "different_ids": ("ValueError", "different inputs"),
        "empty": ("ValueError", "no tokens"),
        "float_ids": ("TypeError", "integer tensor"),
        "wrong_device": ("ValueError", "is on meta"),
        "bad_mask": ("ValueError", "mask must be"),
        "bad_positions": ("ValueError", "position_ids has shape"),
        "foreign_attn": ("ValueError", "always uses ring attention"),
        "unknown_kwarg": ("TypeError", "takes no keyword argument(s) ['attn_algorithm']"),
        "plain_list_cache": ("TypeError", "RingCache"),
        "contiguous_cache": ("TypeError", "contiguous_cache"),
    }
    for got in run_ranks(2, _expect_errors, timeout=300):
        assert got.pop("recovered") == (1, 1, 256)
        for name, (kind, text) in expected.items():
            assert got[name] is not None, f"{name} did not raise"
            assert got[name][0] == kind and text in got[name][1], (name, got[name])


def _reuse_grown_cache(rank, world):
    torch.manual_seed(0)
    model = fmsring.get_model("llama", "micro", distributed_strategy="ring", nlayers=1, ring_cache_headroom=1)
    ids = torch.randint(0, 256, (1, 9))
    _, cache = model(ids, use_cache=True)
    kept = model(ids[:, :1], past_key_value_states=cache, use_cache=True)[1]  # fits: shares the buffers
    _, grown = model(ids[:, :6], past_key_value_states=cache, use_cache=True)  # outgrows the capacity
    try:
        model(ids[:, :1], past_key_value_states=cache, use_cache=True)
        error = None
    except RuntimeError as e:
        error = str(e)
    step = model(ids[:, :1], past_key_value_states=grown, use_cache=True)[1]
    return kept.state.capacity, grown.state.capacity, cache.consumed, error, step.state.seq_len


def test_a_cache_that_a_step_grew_is_consumed_and_says_so_on_every_rank():
    """A step that outgrows the cache moves its buffers into the cache it returns (no second copy
    held); the one it was given then raises instead of holding buffers its state does not describe."""
    for kept_cap, grown_cap, consumed, error, seq_len in run_ranks(2, _reuse_grown_cache):
        assert grown_cap > kept_cap and consumed
        assert error is not None and "grown into the cache a later step returned" in error
        assert seq_len == 9 + 6 + 1
