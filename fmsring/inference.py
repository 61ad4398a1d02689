"""Generate text with ring attention; the flags of FMS's scripts/inference.py.

    torchrun --nproc_per_node=2 -m fmsring.inference --architecture llama \\
        --variant 3-8b --model_path ckpt/ --model_source hf --tokenizer ckpt/ \\
        --device_type cuda --default_dtype bf16 --distributed_strategy ring \\
        --prompt "Once upon a time" --max_new_tokens 64

Rank 0 prints each completion, the time to first token and the median
per-token latency.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from fms.utils.generation import generate, pad_input_ids
from fms.utils.tokenizers import get_tokenizer

import fmsring

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--architecture", default="llama")
    p.add_argument("--variant", default="micro")
    p.add_argument("--model_path", default=None)
    p.add_argument("--model_source", default=None, help="checkpoint format, e.g. hf")
    p.add_argument("--tokenizer", default="char_tokenizer", help="tokenizer name or path")
    p.add_argument("--device_type", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--default_dtype", choices=sorted(DTYPES), default=None)
    p.add_argument(
        "--distributed_strategy", default="ring", help="ring, replicated (one copy per rank), or any FMS strategy"
    )
    p.add_argument("--ring_layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--no_use_cache", action="store_true", help="re-run the whole prompt for every new token")
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    src.add_argument("--prompt_file", type=Path, help="one prompt per line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    rank, _ = fmsring.maybe_init_dist()
    torch.manual_seed(args.seed)
    model = fmsring.get_model(
        args.architecture,
        args.variant,
        model_path=args.model_path,
        source=args.model_source,
        device_type=args.device_type,
        data_type=DTYPES[args.default_dtype] if args.default_dtype else None,
        distributed_strategy=args.distributed_strategy,
        **({"ring_layout": args.ring_layout} if args.distributed_strategy == "ring" else {}),
    ).eval()
    tokenizer = get_tokenizer(args.tokenizer)
    prompts = (
        args.prompt_file.read_text().splitlines() if args.prompt_file else (args.prompt or ["Hello, ring attention!"])
    )
    device = next(model.parameters()).device
    encoded = [
        torch.tensor(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(p)), dtype=torch.long, device=device)
        for p in prompts
    ]
    ids, padding = pad_input_ids(encoded) if len(encoded) > 1 else (encoded[0].unsqueeze(0), None)
    with torch.no_grad():
        out, times = generate(
            model,
            ids,
            max_seq_len=1 << 30,
            max_new_tokens=args.max_new_tokens,
            use_cache=not args.no_use_cache,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            timing="per-token",
            extra_kwargs=padding,
        )
    texts = [tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(row[ids.shape[1] :])) for row in out]
    if rank == 0:
        for prompt, text in zip(prompts, texts):
            print(f"{prompt!r} -> {text!r}")
        per_token = statistics.median(times[1:]) * 1e3 if len(times) > 1 else float("nan")
        print(f"time to first token: {times[0] * 1e3:.1f} ms; per-token latency (median): {per_token:.2f} ms")
    return texts


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
