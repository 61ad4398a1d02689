"""Generate text with ring attention; the flags of FMS's scripts/inference.py.

    torchrun --standalone --nproc_per_node=2 -m fmsring.inference --architecture hf_pretrained \\
        --model_path "$CKPT" --tokenizer "$CKPT" --prompt "Once upon a time" --max_new_tokens 64

Rank 0 prints each completion, the time to first token and the median
per-token latency. --turns FILE and --interactive hold a conversation whose
KV cache stays sharded over the ranks between turns (fmsring.conversation);
with --chat each turn (or --prompt) is a user message, rendered by the
tokenizer's chat template, and a reply ends at its end-of-turn token
(fmsring.chat). Without --chat a prompt or a conversation's first turn gets
the special tokens the tokenizer adds itself (a BOS for LLaMA's, none for
ChatML's), later turns none. Refusals (bad flags, options the model does
not fit) are one line, from rank 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from fms.utils.generation import pad_input_ids
from fms.utils.tokenizers import BaseTokenizer, get_tokenizer
from torch import nn

import fmsring
from fmsring.allocator import configure_allocator
from fmsring.cache import headroom_for
from fmsring.chat import Chat, Reply
from fmsring.conversation import Conversation
from fmsring.loading import check_model_path

PROG = "fmsring.inference"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_PRETRAINED = "hf_pretrained"
DEFAULT_PROMPT = "Hello, ring attention!"


# How long a rank other than 0 waits, having met an error, before it exits: long enough for rank 0
# to meet the same error and say it, short enough that an error only that rank met ends the run soon.
RANK0_GRACE_S = 10.0


def die(message: str, status: int = 1) -> NoReturn:
    """Exit with ``message`` as one line on stderr, printed by rank 0 only: under torchrun every rank
    runs this command and meets the same error, and the message says what to do (no traceback).

    The other ranks wait up to :data:`RANK0_GRACE_S` before exiting: torchrun stops every rank as soon
    as one exits with an error, and a rank that left first stopped rank 0, on a loaded machine still
    loading the model, before it had said anything. Rank 0's exit ends their wait."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: error: {message}", file=sys.stderr)
    else:
        time.sleep(RANK0_GRACE_S)
    raise SystemExit(status)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        die(f"{message} (--help lists the flags)", 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--architecture",
        default="llama",
        help=f"an FMS architecture (with --variant), or {HF_PRETRAINED}: a Hugging Face checkpoint, "
        "configured by its own config.json",
    )
    p.add_argument(
        "--variant",
        default=None,
        help=f"the FMS configuration, e.g. micro (a tiny random LLaMA) or 3-8b; with {HF_PRETRAINED}, "
        "a Hugging Face model id to download instead of --model_path",
    )
    p.add_argument("--model_path", default=None, help="checkpoint directory or file")
    p.add_argument("--model_source", default=None, help="checkpoint format for FMS architectures, e.g. hf")
    p.add_argument(
        "--tokenizer",
        default="char_tokenizer",
        help="tokenizer name or path, e.g. the checkpoint directory (default: char_tokenizer, FMS's "
        "one-token-per-character tokenizer of 256 ids, which fits only the micro variant)",
    )
    p.add_argument("--device_type", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--default_dtype", choices=sorted(DTYPES), default=None, help="default: torch's, float32")
    p.add_argument(
        "--distributed_strategy", default="ring", help="ring, replicated (one copy per rank), or any FMS strategy"
    )
    p.add_argument("--ring_layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument(
        "--ring_tp",
        type=int,
        default=1,
        help="ring x tensor parallel: weights sharded over groups of this many contiguous ranks (keep them "
        "inside a node), the ring over world / ring_tp",
    )
    p.add_argument("--max_new_tokens", type=int, default=32, help="per prompt, or per turn of a conversation")
    p.add_argument("--no_use_cache", action="store_true", help="re-run the whole prompt for every new token")
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chat",
        action="store_true",
        help="a conversation through the tokenizer's chat template: each --prompt, --turns block or "
        "--interactive line (without its final newline) is a user message; replies stop at the "
        "end-of-turn token",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt; repeat for a batch (with --chat: for turns)")
    src.add_argument("--prompt_file", type=Path, help="one prompt per line")
    src.add_argument(
        "--turns",
        type=Path,
        help="a conversation: blocks of text separated by blank lines, the first the prompt, each next "
        "one a follow-up on the kept cache, its text (final newline included) appended as written (batch 1)",
    )
    src.add_argument(
        "--interactive", action="store_true", help="a conversation read from stdin, one turn a line (its newline kept)"
    )
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject what FMS would reject later (after loading the weights) or with a less direct message."""
    if args.architecture == HF_PRETRAINED:
        if (args.variant is None) == (args.model_path is None):
            p.error(
                f"--architecture {HF_PRETRAINED} takes --model_path (a local checkpoint directory) "
                "or --variant (a Hugging Face model id), exactly one of them"
            )
        if args.model_source is not None:
            p.error(f"--architecture {HF_PRETRAINED} reads Hugging Face checkpoints only: drop --model_source")
    elif args.variant is None:
        p.error(
            f"--architecture {args.architecture} needs --variant (e.g. micro, a tiny random model); "
            f"for a Hugging Face checkpoint directory use --architecture {HF_PRETRAINED} --model_path DIR"
        )
    try:
        check_model_path(args.architecture, args.model_path)
    except FileNotFoundError as e:
        p.error(f"--model_path: {e}")
    tokenizer = Path(args.tokenizer).expanduser()
    if args.tokenizer != "char_tokenizer" and _is_path(args.tokenizer) and not tokenizer.exists():
        p.error(f"--tokenizer: no such {'file' if tokenizer.suffix == '.model' else 'directory'}: {args.tokenizer}")
    if args.chat and args.prompt_file:
        p.error("--chat takes its user messages from --prompt, --turns or --interactive, not --prompt_file")
    if args.chat or args.turns or args.interactive:
        mode = "--chat" if args.chat else "--turns" if args.turns else "--interactive"
        if args.distributed_strategy != "ring":
            p.error(f"{mode} keeps the ring's sharded cache between turns: it needs --distributed_strategy ring")
        if args.no_use_cache:
            p.error(f"{mode} keeps the KV cache between turns: drop --no_use_cache")
        if args.turns and not args.turns.is_file():
            p.error(f"--turns {args.turns}: no such file")
        if args.turns and not split_turns(args.turns.read_text()):
            p.error(f"--turns {args.turns} holds no text")
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if args.ring_tp != 1 and args.distributed_strategy != "ring":
        p.error("--ring_tp shards the ring's weights: it needs --distributed_strategy ring")
    if args.ring_tp < 1:
        p.error("--ring_tp must be at least 1")


def _is_path(name: str) -> bool:
    """Whether a tokenizer name can only be a local path: a Hugging Face repo id is NAME or ORG/NAME."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def load_model(args: argparse.Namespace) -> nn.Module:
    return fmsring.get_model(
        args.architecture,
        args.variant,
        model_path=args.model_path,
        source=args.model_source,
        device_type=args.device_type,
        data_type=DTYPES[args.default_dtype] if args.default_dtype else None,
        distributed_strategy=args.distributed_strategy,
        **(ring_options(args) if args.distributed_strategy == "ring" else {}),
    ).eval()


def ring_options(args: argparse.Namespace) -> dict:
    """The ring's options from the flags. The generation length is known here, so the cache is
    sized once for the prompt plus every new token instead of growing (a full copy of the cache)
    mid-generation; a conversation still grows when its turns outrun it."""
    ring_world = max(int(os.environ.get("WORLD_SIZE", 1)) // max(args.ring_tp, 1), 1)
    headroom = headroom_for(args.max_new_tokens, ring_world)
    return {"ring_layout": args.ring_layout, "ring_tp": args.ring_tp, "ring_cache_headroom": headroom}


def tokenizer_size(tokenizer: BaseTokenizer) -> int:
    """Ids the tokenizer can produce (FMS's HF wrapper's own vocab_size() is broken in 1.13.1)."""
    inner = getattr(tokenizer, "tokenizer", None)  # FMS's HF wrapper holds the HF tokenizer, which has a len()
    return len(inner) if inner is not None and hasattr(inner, "__len__") else tokenizer.vocab_size()


def check_vocab(tokenizer: BaseTokenizer, name: str, model: nn.Module) -> None:
    """A tokenizer with more ids than the model's embedding has rows fails deep in the
    first forward (an index error on CPUs, a device-side assert on GPUs): say so first."""
    n_tok, n_model = tokenizer_size(tokenizer), model.config.src_vocab_size
    if n_tok > n_model:
        die(
            f"tokenizer {name!r} has {n_tok} token ids but the model's vocabulary has {n_model}: pass the "
            "checkpoint's tokenizer, --tokenizer PATH (the default, char_tokenizer, fits only the micro variant)"
        )


def encode(tokenizer: BaseTokenizer, text: str, first: bool) -> list[int]:
    """``text``'s ids; before the first text of a sequence the special tokens the tokenizer adds itself
    (a Hugging Face tokenizer's ``add_special_tokens``: LLaMA's a BOS, ChatML's none, so a text already
    starting with the tokenizer's markup gets nothing twice); FMS's own tokenizers a BOS, as FMS's script."""
    hf = getattr(tokenizer, "tokenizer", None)  # FMS's HF wrapper holds the HF tokenizer
    if hf is not None:
        return hf(text, add_special_tokens=first).input_ids
    # FMS flags its tokenize/convert API deprecated, yet its char tokenizer has no other; silenced so
    # every run does not print the warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
    return ([tokenizer.bos_token_id] if first and tokenizer.bos_token_id is not None else []) + ids


def decode(tokenizer: BaseTokenizer, ids: torch.Tensor) -> str:
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None:
        return hf.decode(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids))


def print_timing(ttft_s: float, per_token_s: float) -> None:
    print(f"time to first token: {ttft_s * 1e3:.1f} ms; per-token latency (median): {per_token_s * 1e3:.2f} ms")
    sys.stdout.flush()  # a conversation's reader waits for it


def complete(args: argparse.Namespace, model: nn.Module, tokenizer: BaseTokenizer, rank: int) -> list[str]:
    """One generate() over the prompts, left-padded into a batch."""
    prompts = args.prompt_file.read_text().splitlines() if args.prompt_file else (args.prompt or [DEFAULT_PROMPT])
    device = next(model.parameters()).device
    encoded = [torch.tensor(encode(tokenizer, p, first=True), dtype=torch.long, device=device) for p in prompts]
    ids, padding = pad_input_ids(encoded) if len(encoded) > 1 else (encoded[0].unsqueeze(0), None)
    with torch.no_grad():
        out, times = fmsring.generate(
            model,
            ids,
            max_new_tokens=args.max_new_tokens,
            use_cache=not args.no_use_cache,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            timing="per-token",
            extra_kwargs=padding,
        )
    texts = [decode(tokenizer, row[ids.shape[1] :]) for row in out]
    if rank == 0:
        per_token = statistics.median(times[1:]) if len(times) > 1 else float("nan")
        for prompt, text in zip(prompts, texts):
            print(f"{prompt!r} -> {text!r}")
        print_timing(times[0], per_token)
    return texts


def split_turns(text: str) -> list[str]:
    """A --turns file's blocks: runs of lines between blank (or whitespace-only) lines, each block's
    text exactly as written, its lines' newlines (the last one's too) included."""
    blocks, block = [], ""
    for line in text.splitlines(keepends=True):
        if line.strip():
            block += line
        elif block:
            blocks.append(block)
            block = ""
    return blocks + [block] if block else blocks


def read_turns(args: argparse.Namespace) -> Iterator[str]:
    """The conversation's turns: the --prompt values (with --chat), the --turns blocks, or stdin's lines."""
    if args.turns:
        yield from split_turns(args.turns.read_text())
        return
    if not args.interactive:
        yield from args.prompt or [DEFAULT_PROMPT]
        return
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line


def shared_turns(turns: Iterator[str] | None) -> Iterator[str]:
    """Rank 0's turns on every rank. Only rank 0 reads: torchrun hands stdin to rank 0
    alone. The broadcast has its own gloo group with a long timeout, since it waits
    for a person typing, while the model's group keeps its short one."""
    group = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    while True:
        box = [next(turns, None) if turns is not None else None]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is None:
            return
        yield box[0]


def converse(args: argparse.Namespace, model: nn.Module, tokenizer: BaseTokenizer, rank: int) -> list[Reply]:
    """A conversation on one kept, sharded cache: each turn is one follow-up step. With --chat each turn
    is a user message (its final newline dropped) rendered by the chat template; without, its text is
    appended to the conversation as it is."""
    sampling = {"do_sample": args.do_sample, "temperature": args.temperature, "top_k": args.top_k}
    if args.chat:
        chat = Chat(model, tokenizer.tokenizer, **sampling)

        def say(text: str) -> tuple[str, Reply]:
            message = text.removesuffix("\n")
            return message, chat.say(message, args.max_new_tokens)
    else:
        conversation = Conversation(model, **sampling)

        def say(text: str) -> tuple[str, Reply]:
            first = not conversation.tokens.numel()
            turn = conversation.say(encode(tokenizer, text, first), args.max_new_tokens)
            return text, Reply(turn.tokens, turn.ttft_s, turn.token_s, decode(tokenizer, turn.tokens))

    replies: list[Reply] = []
    for text in shared_turns(read_turns(args) if rank == 0 else None):
        shown, reply = say(text)
        replies.append(reply)
        if rank == 0:
            print(f"{shown!r} -> {reply.text!r}")
            print_timing(reply.ttft_s, reply.per_token_s)
    return replies


def main(argv: list[str] | None = None) -> list[str] | list[Reply]:
    """Run the command; the completions' texts, or a conversation's replies."""
    args = parse_args(argv)
    configure_allocator()  # before CUDA allocates: no stall near the memory limit
    rank, _ = fmsring.maybe_init_dist(args.device_type)
    torch.manual_seed(args.seed)
    tokenizer = get_tokenizer(args.tokenizer)  # before the weights: a bad path fails fast
    if args.chat and getattr(getattr(tokenizer, "tokenizer", None), "chat_template", None) is None:
        die(
            f"--chat renders the conversation with the tokenizer's chat template, and {args.tokenizer!r} has "
            "none: pass an instruct model's checkpoint directory, --tokenizer DIR"
        )
    try:
        model = load_model(args)
    except (ValueError, OSError) as e:  # refusals (ring_tp that does not fit, a bad option): say them once
        die(str(e))
    check_vocab(tokenizer, args.tokenizer, model)
    if args.chat or args.turns or args.interactive:
        return converse(args, model, tokenizer, rank)
    return complete(args, model, tokenizer, rank)


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
