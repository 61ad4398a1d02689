"""A real model through the ring: SmolLM2-135M-Instruct (the demo checkpoint, `make model`) on real text.

Random weights prove the ring exact; a trained model is where a user would notice if it were not
(peaked softmaxes, large activations, tied embeddings). A prompt of ~1K tokens of real prose, cut at
a random place of Python's language reference (a different cut every run, by the test's seed), is
run at 2 ranks in the contiguous layout and at 4 in zigzag (each layout at every world size on
random weights: test_model): the logits must match HF transformers' and the unsharded FMS
model's, and greedy generation must give HF's tokens. A missing model fails, saying how to fetch it.
"""

from __future__ import annotations

import random
from pydoc_data.topics import topics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fmsring
from fmsring.checkpoints import demo_checkpoint
from tests.distributed import run_ranks

NEW_TOKENS = 12
TOL = 2e-4  # fp32 logits of magnitude ~20: the orders of summation differ, nothing else may


def real_text_prompt(tokenizer, n_tokens: int) -> list[int]:
    """``n_tokens`` token ids of the language reference from a random offset (the test's seed)."""
    text = "\n\n".join(topics[k] for k in sorted(topics))
    start = random.randrange(len(text) - 8 * n_tokens)
    ids = tokenizer(text[start : start + 8 * n_tokens], add_special_tokens=False).input_ids
    assert len(ids) >= n_tokens, "8 characters per token should cover the prompt"
    return ids[:n_tokens]


def _ring(rank: int, world: int, path: str, layout: str, ids: list[int], positions: list[int]) -> tuple:
    x = torch.tensor([ids])
    model = fmsring.get_model(
        "hf_pretrained", model_path=path, data_type=torch.float32, distributed_strategy="ring", ring_layout=layout
    )
    with torch.no_grad():
        logits = model(x)[0, positions]
        tokens = fmsring.generate(model, x, max_new_tokens=NEW_TOKENS, use_cache=True, do_sample=False)
    return logits, tokens[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def references():
    """HF's and unsharded FMS's answers on one prompt, computed once in this process."""
    from fms.models import get_model

    path = str(demo_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(path)
    n = random.randrange(900, 1100)  # odd and even lengths alike, over the ranks' shards
    ids = real_text_prompt(tokenizer, n)
    positions = sorted(random.sample(range(n - 1), 63)) + [n - 1]
    x = torch.tensor([ids])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fms = get_model("hf_pretrained", model_path=path, data_type=torch.float32, distributed_strategy=None).eval()
    with torch.no_grad():
        hf_logits = hf(x).logits[0, positions]
        fms_logits = fms(x)[0, positions]
        hf_tokens = hf.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False)[0, n:].tolist()
    assert (hf_logits - fms_logits).abs().max() <= TOL, "plain FMS disagrees with HF: not the ring's doing"
    return path, ids, positions, hf_logits, fms_logits, hf_tokens


@pytest.mark.parametrize(
    "world,layout",
    [pytest.param(2, "contiguous", marks=pytest.mark.slow), (4, "zigzag")],  # fast: 4 ranks, zigzag
)
def test_demo_model_matches_hf_and_unsharded_fms(world, layout, references):
    path, ids, positions, hf_logits, fms_logits, hf_tokens = references
    logits, tokens = run_ranks(world, _ring, path, layout, ids, positions)[0]
    where = f"world {world}, {layout}, {len(ids)} tokens"
    assert (logits - hf_logits).abs().max().item() <= TOL, f"logits differ from HF's ({where})"
    assert (logits - fms_logits).abs().max().item() <= TOL, f"logits differ from unsharded FMS's ({where})"
    assert tokens == hf_tokens, f"greedy tokens differ from HF's ({where})"
