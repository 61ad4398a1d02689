"""``fmsring.generate``: FMS's ``generate`` without its silent truncation.

FMS's ``generate`` feeds the model only the last ``max_seq_len`` tokens of
its input, and ``max_seq_len`` defaults to 4096: a longer prompt loses its
beginning without a word, and the reply is that of another prompt. Here
``max_seq_len`` defaults to what the generation needs, the prompt plus every
new token, and a shorter one is refused, so a model always sees the whole
prompt (ring attention exists for long ones).
"""

from __future__ import annotations

from typing import Any

import torch
from fms.utils import generation


def generate(
    model: Any,
    input_ids: torch.Tensor,
    max_seq_len: int | None = None,
    max_new_tokens: int = 256,
    use_cache: bool = False,
    **kwargs: Any,
) -> Any:
    """``fms.utils.generation.generate`` on the whole prompt; its arguments and return value.

    Args:
        model: any model FMS's ``generate`` drives (a ring model, a plain FMS one).
        input_ids: the prompt, [batch, n] or [n] token ids.
        max_seq_len: the most tokens the model is fed in one call; default: the
            prompt plus ``max_new_tokens``. Without a cache every step re-feeds the
            prompt and the tokens so far, so it must cover those; with one, the prompt.
        max_new_tokens: tokens to generate (fewer if ``eos_token_id`` ends every row first).
        use_cache: keep the KV cache between steps.
        **kwargs: the rest of FMS's ``generate`` (``do_sample``, ``temperature``,
            ``top_k``, ``eos_token_id``, ``timing``, hooks, ``extra_kwargs``), passed unchanged.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    prompt = input_ids.shape[-1]
    fed = prompt if use_cache else prompt + max(max_new_tokens - 1, 0)  # the longest input a step feeds
    if max_seq_len is None:
        max_seq_len = prompt + max_new_tokens
    elif max_seq_len < fed:
        what = "the prompt" if use_cache else "the prompt plus the new tokens a step without a cache re-feeds"
        raise ValueError(
            f"max_seq_len={max_seq_len} is shorter than {what} ({fed} tokens): FMS's generate would feed the "
            f"model only the last {max_seq_len} of them; leave max_seq_len out (it then covers the prompt and "
            "the new tokens)"
        )
    return generation.generate(
        model, input_ids, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens, use_cache=use_cache, **kwargs
    )
