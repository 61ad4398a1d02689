"""fmsring.harness.haystack: the needle prompts, counted with the demo model's real tokenizer (`make model`)."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from fmsring.checkpoints import demo_checkpoint
from fmsring.harness import haystack
from fmsring.harness.haystack import NEEDLE, QUESTION, Haystack


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_checkpoint())


def test_the_text_is_varied_prose_in_a_fixed_order():
    paras = haystack.paragraphs()
    assert paras == haystack.paragraphs() and len(paras) > 500
    assert len(set(paras)) > 0.95 * len(paras)  # real text, not a filler repeated
    assert sum(map(len, paras)) > 150_000
    assert not any(p.startswith(" ") or "\n" in p or p.endswith(":") for p in paras)  # no code, no dangling intros
    assert not any(set(p) <= set("*=-^~") for p in paras)  # no heading underlines


@pytest.mark.parametrize("length", [200, 1000, 4096])
def test_a_prompt_fills_its_length_through_the_chat_template(tokenizer, length: int):
    case = Haystack(tokenizer).case(length, 50)
    assert length - 160 < len(case.ids) <= length  # short by less than a (long) sentence
    rendered = tokenizer.decode(case.ids)
    assert rendered.startswith("<|im_start|>system") and rendered.endswith("<|im_start|>assistant\n")
    assert rendered.count("<|im_start|>user\n") == 1  # one user message
    assert case.text.endswith("\n\n" + QUESTION)
    assert case.text.count(case.value) == 1 and case.text.count(NEEDLE.format(case.value)) == 1
    assert rendered.count(case.value) == 1


def test_the_needle_lands_at_the_sentence_boundary_nearest_its_depth(tokenizer):
    stack = Haystack(tokenizer)
    cases = {d: stack.case(2048, d) for d in (0, 10, 25, 50, 75, 90, 100)}
    first, last = cases[0], cases[100]
    assert first.text.startswith(NEEDLE.format(first.value)) and first.needle_at == 0
    assert last.text.endswith(f"{NEEDLE.format(last.value)}\n\n{QUESTION}") and last.needle_at == 1
    for depth, case in cases.items():
        assert abs(case.needle_at - depth / 100) < 0.03, (depth, case.needle_at)
        before = case.text[: case.text.index(NEEDLE.format(case.value))]
        assert before == "" or before.endswith((". ", "\n\n", ") ", '" ', "? ")), before[-40:]  # a sentence ends there
        share = len(tokenizer(before).input_ids) / len(tokenizer(case.text[: -len(QUESTION)]).input_ids)
        assert abs(share - depth / 100) < 0.03, (depth, share)  # counted in the prompt's own tokens too
    positions = [c.text.index(NEEDLE.format(c.value)) for c in cases.values()]
    assert positions == sorted(positions)


def test_cases_are_deterministic_by_seed(tokenizer):
    a = Haystack(tokenizer, seed=7).cases([512, 1024], [0, 50])
    b = Haystack(tokenizer, seed=7).cases([1024, 512], [0, 50])
    assert a == b and [(c.length, c.depth) for c in a] == [(512, 0), (512, 50), (1024, 0), (1024, 50)]
    other = Haystack(tokenizer, seed=8).cases([512, 1024], [0, 50])
    assert [c.value for c in a] != [c.value for c in other]
    assert all(re.fullmatch(r"[a-z]+-[a-z]+-\d{4}", c.value) for c in a)
    assert len({c.value for c in a}) == len(a)  # a needle per case
    assert haystack.needle_value(7, 512, 0) == a[0].value  # the same for every strategy and rank


def test_a_prompt_past_the_text_wraps_around(tokenizer):
    stack = Haystack(tokenizer)
    stack._source = [["Alpha is first.", "It has two sentences."], ["Beta is second."]]  # a text of ~20 tokens
    case = stack.case(400, 50)
    assert 400 - 40 < len(case.ids) <= 400
    assert case.text.count("Beta is second.") > 10 and case.text.count(case.value) == 1


def test_bad_cases_are_refused(tokenizer):
    stack = Haystack(tokenizer)
    with pytest.raises(ValueError, match="percentage"):
        stack.case(1024, 101)
    with pytest.raises(ValueError, match="hold no haystack"):
        stack.case(60, 50)
    tokenizer_without_template = type("T", (), {"chat_template": None})()
    with pytest.raises(ValueError, match="no chat template"):
        Haystack(tokenizer_without_template)
