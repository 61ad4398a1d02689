"""A tiny LLaMA checkpoint directory with its own tokenizer, as a user's checkpoint has one,
and Hugging Face greedy references to hold fmsring's tokens against.

The tokenizer is character level (printable ASCII and newline, no merges) and,
like LLaMA's, prepends its BOS token; or, with ``chat``, like SmolLM2-Instruct's:
ChatML's two special tokens (BOS ``<|im_start|>``, EOS ``<|im_end|>``), none
added by the tokenizer, and ChatML's chat template. The model's vocabulary is
exactly the tokenizer's size.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, UNK = "<s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHARS = ["\n", *map(chr, range(32, 127))]
VOCAB = 2 + len(CHARS)  # the model's vocabulary: the tokenizer's ids
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_POS = 64
# the weights' seed, which tests/conftest.py sets once per session and prints with a failure
SEED_ENV = "FMSRING_CHECKPOINT_SEED"


def write_tokenizer(path: str, chat: bool = False) -> PreTrainedTokenizerFast:
    specials = [IM_START, IM_END, UNK] if chat else [BOS, UNK]
    vocab = {tok: i for i, tok in enumerate([*specials, *CHARS])}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=UNK))
    tok.decoder = decoders.Fuse()  # characters join without spaces
    if chat:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=IM_START, eos_token=IM_END, unk_token=UNK, chat_template=CHATML
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, unk_token=UNK)
    fast.save_pretrained(path)
    return fast


def write_checkpoint(path, kvheads: int = 2, max_pos: int = MAX_POS, heads: int = 4, chat: bool = False) -> str:
    """A 2-layer GQA (by default) LLaMA with a tokenizer, saved the way HF saves them; its random
    weights drawn from ``$FMSRING_CHECKPOINT_SEED`` where set, else from torch's generator.

    Args:
        path: the directory.
        kvheads, heads: its attention's kv-heads and heads (16 dimensions each; the widths follow them).
        max_pos: its RoPE table's size.
        chat: a ChatML tokenizer (see the module's docstring), and the end-of-turn token's logit
            scaled up, so that replies often end at it, as an instruct model's do.
    """
    path = str(path)
    tokenizer = write_tokenizer(path, chat)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16 * heads,
        intermediate_size=40 * heads,  # 160 for 4 heads; splits over whatever TP splits the heads
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kvheads,
        max_position_embeddings=max_pos,
        rope_theta=10000.0,
        initializer_range=0.15,  # wide logit gaps: greedy ties would make token checks flaky
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=None,  # no early stop: every reply has its full length
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        if os.environ.get(SEED_ENV):
            torch.manual_seed(int(os.environ[SEED_ENV]))
        model = LlamaForCausalLM(cfg)
    if chat:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] *= 2
    model.save_pretrained(path)
    return path


def hf_model(path: str, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()


def fms_model(path: str, dtype: torch.dtype = torch.float32, strategy: str = "replicated", **kw):
    """The checkpoint through fmsring.get_model (``"ring"``, or the plain FMS model on every rank)."""
    import fmsring

    return fmsring.get_model("hf_pretrained", model_path=path, data_type=dtype, distributed_strategy=strategy, **kw)


def hf_greedy(hf: LlamaForCausalLM, ids: list[int], n_new: int, eos_token_id: int | None = None) -> list[int]:
    """HF's greedy continuation of ``ids``, recomputed from scratch: ``n_new`` tokens, or up to and
    including ``eos_token_id``."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=n_new,
            min_new_tokens=n_new if eos_token_id is None else 0,
            do_sample=False,
            eos_token_id=eos_token_id,
        )
    return out[0, len(ids) :].tolist()


def hf_conversation(
    hf: LlamaForCausalLM, turns: list[list[int]], n_new: list[int], eos_token_id: int | None = None
) -> list[list[int]]:
    """Each turn's greedy reply of ``n_new[i]`` tokens (or up to ``eos_token_id``), HF generate run on the
    whole conversation so far."""
    context: list[int] = []
    replies = []
    for turn, n in zip(turns, n_new, strict=True):
        context += turn
        replies.append(hf_greedy(hf, context, n, eos_token_id))
        context += replies[-1]
    return replies
