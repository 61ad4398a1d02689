"""``make demo``: a short chat with a real model on two CPU ranks, each reply beside HF transformers'.

    python -m fmsring.demo        # or: make demo, which fetches the model first

Every exactness test runs on random weights; this runs a real instruct model,
SmolLM2-135M-Instruct (:mod:`fmsring.checkpoints`), through the command a
user runs -- ``fmsring.inference --chat`` under torchrun, gloo ranks holding
the conversation's KV cache sharded between turns -- then HF transformers'
greedy ``generate``, in one process, on the conversation the chat template
renders (its own replies in it), and says whether each reply has the same
tokens. Started without torchrun, it starts itself under torchrun. Exit
status 1 if a reply differs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from fmsring import inference
from fmsring.chat import Reply
from fmsring.checkpoints import SMOLLM2, CheckpointError, demo_checkpoint

# questions a 135M instruct model answers sensibly, each leaning on the one before
QUESTIONS = ("What is the capital of France?", "What is a famous landmark there?", "How tall is it?")


def cli_args(checkpoint: str, questions: Sequence[str], max_new_tokens: int) -> list[str]:
    """``fmsring.inference``'s flags for the chat: the checkpoint on CPU ranks, one --prompt a turn."""
    argv = ["--architecture", "hf_pretrained", "--model_path", checkpoint, "--tokenizer", checkpoint]
    argv += ["--device_type", "cpu", "--chat", "--max_new_tokens", str(max_new_tokens)]
    return argv + [arg for q in questions for arg in ("--prompt", q)]


def hf_chat(model: Any, tokenizer: Any, questions: Sequence[str], max_new_tokens: int) -> list[tuple[list[int], float]]:
    """HF transformers' greedy reply to each question in turn, each generated from scratch on the chat
    template's rendering of the whole conversation so far, its earlier replies in it.

    Args:
        model: an HF causal LM; tokenizer: its HF tokenizer, with a chat template.
        questions: the user's messages.
        max_new_tokens: the most tokens a reply has; it stops earlier at the tokenizer's eos token.

    Returns:
        Per question, the reply's tokens (the eos token last, if reached) and the seconds ``generate`` took.
    """
    eos = tokenizer.eos_token_id
    messages: list[dict[str, str]] = []
    replies = []
    for text in questions:
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )["input_ids"]
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        seconds = time.perf_counter() - start
        reply = out[0, ids.shape[1] :].tolist()
        content = tokenizer.decode(reply[:-1] if reply[-1] == eos else reply, skip_special_tokens=False)
        messages.append({"role": "assistant", "content": content})
        replies.append((reply, seconds))
    return replies


def report(
    questions: Sequence[str], ours: Sequence[Reply], theirs: list[tuple[list[int], float]], tokenizer: Any, world: int
) -> bool:
    """Print each turn's two replies and timings; whether every reply has HF's tokens."""
    same_all = True
    for i, (question, reply, (hf_tokens, hf_s)) in enumerate(zip(questions, ours, theirs, strict=True), 1):
        tokens = reply.tokens.tolist()
        hf_text = tokenizer.decode(hf_tokens[:-1] if hf_tokens[-1] == tokenizer.eos_token_id else hf_tokens)
        print(f"\nturn {i}: {question!r}")
        print(
            f"  fmsring, {world} ranks: {reply.text!r}\n    {len(tokens)} tokens; {reply.ttft_s * 1e3:.1f} ms to first "
            f"token, then {reply.per_token_s * 1e3:.1f} ms per token"
        )
        print(
            f"  HF transformers:   {hf_text!r}\n    {len(hf_tokens)} tokens; {hf_s * 1e3:.1f} ms in all "
            f"({hf_s / len(hf_tokens) * 1e3:.1f} ms per token)"
        )
        same = tokens == hf_tokens
        first = next((j for j, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), min(len(tokens), len(hf_tokens)))
        print("  the same tokens" if same else f"  the tokens differ from token {first + 1} on")
        same_all &= same
    return same_all


def run_ranks(args: argparse.Namespace) -> int:
    """On each torchrun rank: the chat through ``fmsring.inference``; then, on rank 0, HF's and the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # a loading bar between the two sets of replies says nothing
    checkpoint = str(demo_checkpoint())
    argv = cli_args(checkpoint, QUESTIONS, args.max_new_tokens)
    world = int(os.environ["WORLD_SIZE"])
    if int(os.environ["RANK"]) == 0:
        print(
            f"fmsring.demo: SmolLM2-135M-Instruct ({SMOLLM2.layers} layers, {SMOLLM2.heads} heads, "
            f"{SMOLLM2.kv_heads} kv-heads), greedy, on {world} CPU ranks (gloo) through the chat template:"
        )
        print(f"$ torchrun --standalone --nproc_per_node={world} -m fmsring.inference {shlex.join(argv)}", flush=True)
    replies = inference.main(argv)
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank != 0:
        return 0
    print(
        f"\nHF transformers' generate (one process, {torch.get_num_threads()} thread(s)) on the conversation "
        "the chat template renders, its own replies in it:"
    )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    same = report(QUESTIONS, replies, hf_chat(model, tokenizer, QUESTIONS, args.max_new_tokens), tokenizer, world)
    print(
        f"\nfmsring's replies are HF transformers', token for token, in all {len(QUESTIONS)} turns"
        if same
        else "\nfmsring's replies differ from HF transformers'"
    )
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fmsring.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks (default 2)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="the most tokens a reply has (default 64)")
    args = p.parse_args(argv)
    if "RANK" in os.environ:
        return run_ranks(args)
    try:
        demo_checkpoint()  # before starting any rank: a missing model is one line saying how to fetch it
    except CheckpointError as e:
        p.exit(1, f"fmsring.demo: error: {e}\n")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    flags = ["--max_new_tokens", str(args.max_new_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # torchrun's default, unannounced
    return subprocess.run([*launch, "-m", "fmsring.demo", *flags], check=False, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
