"""A chat through the tokenizer's chat template, on a ring model's kept, sharded KV cache.

An instruct model answers well only on the text its chat template renders
(``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`` for ChatML),
and a reply ends at the template's end-of-turn token. ``Chat`` renders the
whole conversation with the template at every turn and feeds the
:class:`~fmsring.conversation.Conversation` only what the rendering adds
after the tokens the model already holds: the end-of-turn token that closed
the last reply (generated, not yet fed) and the template's text between
turns, the ``\\n`` after it included. So the token stream the model has seen
is, at every turn, the template's rendering of the conversation so far; a
template that renders earlier turns differently as the conversation grows is
refused rather than fed a conversation it would not render.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fmsring.conversation import Conversation, Turn
from fmsring.model import LlamaRing


@dataclass(frozen=True)
class Reply(Turn):
    """A chat turn's reply: its tokens and timings (:class:`~fmsring.conversation.Turn`; the
    end-of-turn token last, when the reply reached it) and ``text``, the reply as the template
    renders it in later turns: its tokens decoded, without the end-of-turn token."""

    text: str


class Chat:
    """A conversation of user messages and the model's replies, rendered by the tokenizer's chat template.

    Every rank makes the same calls with the same messages, as for the model itself.

    Args:
        model: a ring model (``fmsring.get_model(..., distributed_strategy="ring")``).
        tokenizer: a Hugging Face tokenizer with a chat template (``AutoTokenizer``;
            FMS's ``get_tokenizer`` holds one in ``.tokenizer``). Its ``eos_token_id``
            is the end-of-turn token a reply stops at.
        **sampling: :class:`~fmsring.conversation.Conversation`'s ``do_sample``,
            ``temperature``, ``top_k`` (greedy by default).
    """

    def __init__(self, model: LlamaRing, tokenizer: Any, **sampling: Any):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no chat template: Chat needs a Hugging Face tokenizer that has "
                "one (AutoTokenizer.from_pretrained(checkpoint) of an instruct model); for plain text, feed "
                "token ids to fmsring.conversation.Conversation"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no eos token: a reply would never end at its turn's end")
        self.conversation = Conversation(model, **sampling)
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = []
        self._seen = ""  # the text of every token the model holds: the last rendering plus the last reply

    def say(self, text: str, max_new_tokens: int) -> Reply:
        """Send a user message; the model's reply, which the conversation keeps.

        Args:
            text: the user's message, as the template's ``content``.
            max_new_tokens: the most tokens the reply has; it stops earlier at the end-of-turn token.
        """
        if not isinstance(text, str):
            raise TypeError(f"a chat message is a str, got {type(text).__name__}")
        messages = [*self.messages, {"role": "user", "content": text}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not rendered.startswith(self._seen):
            raise ValueError(
                "the chat template renders the earlier turns differently now that the conversation has grown "
                "(it rewrites past messages), so the kept cache no longer holds the conversation it renders; "
                "start a new Chat per exchange, or render and feed token ids to a Conversation yourself"
            )
        # the template adds its own special tokens (BOS among them, if it has one): none from the tokenizer
        ids = self.tokenizer(rendered[len(self._seen) :], add_special_tokens=False).input_ids
        eos = self.tokenizer.eos_token_id
        turn = self.conversation.say(ids, max_new_tokens, eos_token_id=eos)
        tokens = turn.tokens.tolist()
        content = self._decode(tokens[:-1] if tokens[-1] == eos else tokens)
        self._seen = rendered + self._decode(tokens)
        self.messages = [*messages, {"role": "assistant", "content": content}]
        return Reply(tokens=turn.tokens, ttft_s=turn.ttft_s, token_s=turn.token_s, text=content)

    def _decode(self, ids: list[int]) -> str:
        """The text of ``ids`` as they are: special tokens kept, spaces not tidied."""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
