"""fmsring.chat against HF transformers, on real gloo ranks.

Each reply must be HF's greedy ``generate`` on the chat template's rendering of
the whole conversation so far (HF's own replies in it, re-rendered and
re-tokenized every turn), and the tokens the ring model holds must be, turn
after turn, that rendering: the end-of-turn token that closed a reply, the
``\\n`` after it and the next turn's markup, nothing missing and nothing twice.
Messages are fresh random draws; the checkpoint's ChatML tokenizer is like
SmolLM2-Instruct's, and its model ends replies at the end-of-turn token often.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from fmsring.demo import hf_chat
from tests.distributed import run_ranks
from tests.tiny_checkpoint import CHATML, IM_END, hf_model, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_checkpoint(tmp_path_factory.mktemp("chat"), kvheads=2, chat=True)


def fresh_messages(n: int) -> list[str]:
    """User messages: words, punctuation, a line break, the template's own markup as text."""
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.?!\n"
    messages = ["".join(random.choice(alphabet) for _ in range(random.randrange(1, 20))) for _ in range(n)]
    messages[random.randrange(n)] += f" {IM_END}"  # typed by the user; the tokenizer reads it as the special token
    return messages


def _chat(rank: int, world: int, path: str, messages: list[str], n_new: int):
    import fmsring
    from fmsring.chat import Chat

    model = fmsring.get_model("hf_pretrained", model_path=path, data_type=torch.float32, distributed_strategy="ring")
    chat = Chat(model, AutoTokenizer.from_pretrained(path))
    replies = [chat.say(m, n_new) for m in messages]
    return [(r.tokens.tolist(), r.text) for r in replies], chat.conversation.tokens.tolist(), chat.messages


@pytest.mark.parametrize("world", [1, 2])
def test_replies_are_hf_on_the_rendered_conversation(world, checkpoint):
    tok = AutoTokenizer.from_pretrained(checkpoint)
    messages, n_new = fresh_messages(4), random.randrange(4, 12)
    want = hf_chat(hf_model(checkpoint), tok, messages, n_new)
    for replies, tokens, history in run_ranks(world, _chat, checkpoint, messages, n_new):
        assert [r for r, _ in replies] == [w for w, _ in want], messages
        assert [h["content"] for h in history[::2]] == messages
        assert [h["content"] for h in history[1::2]] == [text for _, text in replies]
        rendered = tok.apply_chat_template(history, tokenize=False)
        seen = tok.decode(tokens, skip_special_tokens=False)
        assert rendered.startswith(seen), (rendered, seen)
        ended = replies[-1][0][-1] == tok.eos_token_id
        assert rendered[len(seen) :] == ("\n" if ended else f"{IM_END}\n")  # the template's tail, not fed yet
        assert tokens == tok(seen, add_special_tokens=False).input_ids


def _refusals(rank: int, world: int, path: str) -> dict[str, str]:
    import fmsring
    from fmsring.chat import Chat

    model = fmsring.get_model("hf_pretrained", model_path=path, data_type=torch.float32, distributed_strategy="ring")
    tok = AutoTokenizer.from_pretrained(path)
    errors = {}
    tok.chat_template = None
    with pytest.raises(ValueError) as exc:
        Chat(model, tok)
    errors["no template"] = str(exc.value)
    tok.chat_template = "{{ messages | length }}" + CHATML  # renders the first turns anew as the conversation grows
    chat = Chat(model, tok)
    chat.say("hi", 2)
    with pytest.raises(ValueError) as exc:
        chat.say("again", 2)
    errors["rewritten history"] = str(exc.value)
    return errors


def test_a_tokenizer_without_a_template_or_rewriting_history_is_refused(checkpoint):
    (errors,) = run_ranks(1, _refusals, checkpoint)
    assert "has no chat template" in errors["no template"] and "Conversation" in errors["no template"]
    assert "renders the earlier turns differently" in errors["rewritten history"]
