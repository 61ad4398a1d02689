"""Needle-in-a-haystack prompts: real text, one fact hidden at a depth, a question after it.

The haystack is Python's language reference as every CPython 3.11/3.12 ships it
(``pydoc_data.topics``, ~465K characters): real, varied prose, so the needle is not
the one sentence that differs from a filler repeated around it. Its paragraphs are
taken in sorted topic order (headings, code and repeats left out, whitespace
collapsed) and cut into sentences; a prompt longer than that prose (~160K
characters, ~36K tokens of SmolLM2's) wraps around to its start. The needle is a
fact whose value (``amber-falcon-7391``) is drawn per case from the seed, so no
model can know it beforehand and a case's prompt is the same on every rank and
every run. It goes at the sentence boundary nearest the depth (0%: before the
first sentence, 100%: after the last), the question after the haystack, all of
it one user message through the model's chat template; lengths are the tokens of
that whole prompt, counted with the model's tokenizer.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

NEEDLE = "The secret passphrase for the vault is '{}'."
QUESTION = "What is the secret passphrase for the vault? Answer with the passphrase only."
ADJECTIVES = ("amber", "brisk", "cobalt", "dusty", "ember", "frosty", "golden", "hollow", "ivory", "jade", "lunar",
              "misty", "noble", "olive", "quiet", "rusty", "silver", "tawny", "velvet", "wild")  # fmt: skip
ANIMALS = ("badger", "condor", "dingo", "falcon", "gecko", "heron", "ibex", "jackal", "koala", "lemur", "marten",
           "newt", "ocelot", "puffin", "quail", "raven", "stoat", "tapir", "walrus", "yak")  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(*])")


def paragraphs() -> list[str]:
    """The language reference's prose paragraphs, in sorted topic order, whitespace collapsed, each
    once (topics share sections); left out: headings, indented code and grammar, and fragments (a
    paragraph of fewer than five words, or not ending a sentence: an entry's signature, an intro to code)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text, lines = " ".join(block.split()), block.splitlines()
            heading = len(lines) > 1 and set(lines[1].strip()) <= set("*=-^~")
            prose = len(text.split()) >= 5 and re.search(r"[.!?][\"')]?$", text)
            if prose and not block[0].isspace() and not heading:
                out.append(text)
    return list(dict.fromkeys(out))


def needle_value(seed: int, length: int, depth: float) -> str:
    """The needle's value for one case: ``<adjective>-<animal>-<4 digits>``, the same for every strategy."""
    rng = random.Random(f"{seed}/{length}/{depth:g}")  # a str seed is hashed (sha512): stable across runs
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(ANIMALS)}-{rng.randrange(1000, 10000)}"


def text_hash() -> str:
    """The haystack's text, hashed: which CPython's reference a run used (3.11's and 3.12's differ)."""
    return hashlib.sha256("\n\n".join(paragraphs()).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Case:
    """One prompt: ``ids`` (the whole chat-templated prompt, ``len(ids) <= length``), the needle's
    ``value``, and where the needle landed (``needle_at``: fraction of the haystack's tokens before it)."""

    length: int
    depth: float
    value: str
    ids: tuple[int, ...]
    needle_at: float
    text: str  # the user message


class Haystack:
    """Prompts of the language reference for one tokenizer (an HF tokenizer with a chat template).

    Args:
        tokenizer: counts the tokens and renders the chat template (``apply_chat_template``).
        seed: draws each case's needle value.
    """

    def __init__(self, tokenizer, seed: int = 0):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template: needle prompts are one user message through it")
        self.tokenizer = tokenizer
        self.seed = seed
        self._sentences: list[tuple[int, str]] = []  # (paragraph number, sentence), the text cut so far
        self._tokens: list[int] = []  # tokens of each sentence on its own (an estimate of its share)
        self._paragraphs = 0  # paragraphs cut so far (past the text's end: wrapped around)

    @cached_property
    def _source(self) -> list[list[str]]:
        return [_SENTENCE_END.split(p) for p in paragraphs()]

    def _extend(self, tokens: int) -> None:
        """Cut sentences until they hold ``tokens`` tokens (wrapping around the text)."""
        while sum(self._tokens) < tokens:
            new = self._source[self._paragraphs % len(self._source)]
            self._sentences += [(self._paragraphs, s) for s in new]
            self._tokens += [len(ids) + 1 for ids in self.tokenizer(new, add_special_tokens=False).input_ids]
            self._paragraphs += 1

    def render(self, message: str) -> list[int]:
        """``message`` as the one user turn of the chat template, with the assistant's turn opened."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                  add_generation_prompt=True)  # fmt: skip
        return self.tokenizer(text, add_special_tokens=False).input_ids  # the template holds its special tokens

    def _message(self, n: int, depth: float, value: str) -> tuple[str, float]:
        """The user message of the first ``n`` sentences with the needle nearest ``depth`` percent."""
        before = [0, *accumulate(self._tokens[:n])]
        at = min(range(n + 1), key=lambda b: abs(before[b] - depth / 100 * before[n]))
        needle = (self._sentences[at][0] if at < n else self._sentences[n - 1][0] if n else 0, NEEDLE.format(value))
        parts: list[tuple[int, str]] = [*self._sentences[:at], needle, *self._sentences[at:n]]
        paras: dict[int, list[str]] = {}
        for p, s in parts:
            paras.setdefault(p, []).append(s)
        haystack = "\n\n".join(" ".join(s) for s in paras.values())
        return f"{haystack}\n\n{QUESTION}", before[at] / max(before[n], 1)

    def case(self, length: int, depth: float) -> Case:
        """The prompt of ``length`` tokens at most (short of it by less than a sentence) with the
        needle at ``depth`` percent of the haystack.

        Args:
            length: tokens of the whole prompt, chat template and question included.
            depth: where the needle goes, 0 (first) to 100 (last, just before the question).
        """
        if not 0 <= depth <= 100:
            raise ValueError(f"a depth is a percentage, 0 to 100; got {depth}")
        value = needle_value(self.seed, length, depth)
        bare = len(self.render(self._message(0, depth, value)[0]))
        if length <= bare:
            raise ValueError(f"{length} tokens hold no haystack: the needle, the question and the template take {bare}")
        self._extend(length)
        n = max(1, sum(1 for t in accumulate(self._tokens) if t <= length - bare))  # the estimate, then exact

        def fit(k: int) -> bool:
            return len(self.render(self._message(k, depth, value)[0])) <= length

        while n > 0 and not fit(n):
            n -= 1
        while n < len(self._tokens) and fit(n + 1):
            n += 1
        message, at = self._message(n, depth, value)
        return Case(length, depth, value, tuple(self.render(message)), at, message)

    def cases(self, lengths: list[int], depths: list[float]) -> list[Case]:
        """Every (length, depth), shortest first."""
        return [self.case(n, d) for n in sorted(set(lengths)) for d in dict.fromkeys(depths)]
