"""Needle in a haystack: does a real model find one fact in a long prompt, sharded by the ring as
unsharded, and does the ring answer with the unsharded model's very tokens?

A run is one folder, ``<out_dir>/<name>/``::

    needle.csv      one row per case (strategy, world size, length, depth), appended as it finishes
    params.json     the config, the environment, the haystack's text hash, what each launch did
    logs/           each launch's stdout/stderr (and torchrun's error file of a failed one)
    reference/      the unsharded model's answer tokens and first-token logits per case (large; not committed)
    figures/        retrieval and identical-tokens heatmaps (:mod:`fmsring.harness.needle_plots`)

Each strategy runs as one launch (``torchrun``, one process per rank): ``single`` is FMS unsharded
in one process and goes first, as every other row is compared with it; ``ring`` runs at each of
``world_sizes``; ``hf`` is HF transformers. A launch that fails, or finishes no case for
``timeout_s``, is killed whole and its unfinished cases become ``error``/``oom``/``timeout`` rows;
running the same config again runs only the cases without an ``ok`` row. Answers are greedy and
stop at the tokenizer's end-of-turn token.

From Python ``run_needle(NeedleConfig(lengths=[1024, 2048]))``; the notebook ``notebooks/needle.ipynb``
(``make needle``); or ``python -m fmsring.harness.needle --params grid.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmsring.harness import launch
from fmsring.harness.haystack import Case, Haystack, text_hash
from fmsring.harness.provenance import environment, git_sha, now, write_json
from fmsring.harness.schema import append_rows, read_rows
from fmsring.harness.settings import parse_seq_len

CSV = "needle.csv"
COLUMNS = ("strategy", "world_size", "length", "prompt_tokens", "depth", "needle_at", "needle", "answer", "retrieved",
           "identical_tokens", "logits_max_abs_diff", "prefill_s", "new_tokens", "status", "error", "seed", "model",
           "device", "dtype", "git_sha", "timestamp")  # fmt: skip
STRATEGIES = ("single", "ring", "hf")  # FMS unsharded (the reference), fmsring's ring, HF transformers
SAME_ANSWERS = ("model_path", "device", "dtype", "seed", "max_new_tokens", "ring_kwargs")  # a run folder holds one


@dataclass
class NeedleConfig:
    """One needle run; ``notebooks/needle.ipynb``'s parameters are these fields, with these defaults.

    Args:
        model_path: an HF llama checkpoint directory with a chat template; empty: the demo model (``make model``).
        lengths: prompt lengths in tokens (chat template and question included); ``8K`` reads as 8192.
            Each plus ``max_new_tokens`` must fit the model's context.
        depths: where the needle goes, percent of the haystack (0: first, 100: just before the question).
        strategies: among ``single`` (FMS unsharded, the reference), ``ring``, ``hf`` (transformers).
        world_sizes: ring's ranks (GPUs, or CPU processes).
        device: ``cpu`` (gloo) or ``cuda`` (NCCL).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        max_new_tokens: the answer's budget; it stops earlier at the end-of-turn token.
        seed: draws each case's needle value.
        ring_kwargs: ``ring_*`` options of ``fmsring.get_model``, e.g. ``{"ring_layout": "contiguous"}``.
        timeout_s: a launch that finishes no case (or loads nothing) for this long is killed.
        out_dir: folder of run folders (relative: to the checkout).
        name: the run folder; empty: ``needle-<device>-<checkpoint folder name>``.
    """

    model_path: str = ""
    lengths: list = field(default_factory=lambda: [1024, 4096])
    depths: list = field(default_factory=lambda: [0, 50, 100])
    strategies: list = field(default_factory=lambda: ["single", "ring"])
    world_sizes: list = field(default_factory=lambda: [2])
    device: str = "cpu"
    dtype: str = "float32"
    max_new_tokens: int = 32
    seed: int = 0
    ring_kwargs: dict = field(default_factory=dict)
    timeout_s: float = 900.0
    out_dir: str = "runs/local"
    name: str = ""

    def __post_init__(self):
        self.lengths = [parse_seq_len(n) for n in self.lengths]
        self.depths = [int(d) if d.is_integer() else d for d in map(float, self.depths)]  # 50, not 50.0, in rows

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @property
    def checkpoint(self) -> Path:
        from fmsring.checkpoints import demo_checkpoint

        return Path(self.model_path).expanduser() if self.model_path else demo_checkpoint()

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / (self.name or f"needle-{self.device}-{self.checkpoint.name}")

    def groups(self) -> list[tuple[str, int]]:
        """(strategy, world size) launches in order: ``single`` first (the reference), ``hf``, then ring's."""
        one = [(s, 1) for s in ("single", "hf") if s in self.strategies]
        return one + [("ring", w) for w in dict.fromkeys(self.world_sizes) if "ring" in self.strategies]

    def problems(self) -> list[str]:
        """Everything wrong with this config, each said once; [] when it can run."""
        out = [
            f"unknown strategy {s!r} (among {', '.join(STRATEGIES)})" for s in self.strategies if s not in STRATEGIES
        ]
        out += [f"a depth is 0 to 100 (percent), got {d}" for d in self.depths if not 0 <= d <= 100]
        out += [f"a world size is a positive integer, got {w!r}" for w in self.world_sizes if
                not isinstance(w, int) or w < 1]  # fmt: skip
        if not (
            self.strategies and self.lengths and self.depths and ("ring" not in self.strategies or self.world_sizes)
        ):
            out.append("the grid is empty: name strategies, lengths, depths (and world_sizes for ring)")
        if self.device not in ("cpu", "cuda") or self.dtype not in ("float32", "bfloat16", "float16"):
            out.append(f"device is cpu or cuda and dtype float32, bfloat16 or float16; got {self.device}, {self.dtype}")
        elif self.device == "cuda":
            import torch  # here: reading a run's rows (needle_plots, results) needs no torch

            if not torch.cuda.is_available():
                out.append("device cuda, but torch sees no GPU")
        if self.max_new_tokens < 1 or self.timeout_s <= 0:
            out.append("max_new_tokens and timeout_s must be positive")
        config = self.checkpoint / "config.json"
        if not config.is_file():
            return [*out, f"{self.checkpoint} is no HF checkpoint (no config.json)"]
        context = json.loads(config.read_text()).get("max_position_embeddings", math.inf)
        too_long = [n for n in self.lengths if n + self.max_new_tokens > context]
        if too_long:
            out.append(f"lengths {too_long} plus {self.max_new_tokens} new tokens pass the model's context ({context})")
        return out


# ----------------------------------------------------------------------------- the run (the notebook's process)


def run_needle(cfg: NeedleConfig, root: Path | None = None) -> Path:
    """Check the config and the prompts, then run (or resume) every launch; return the run folder.

    Args:
        cfg: the run.
        root: the checkout a relative ``out_dir`` is under (default: the current folder).
    """
    from transformers import AutoTokenizer

    if problems := cfg.problems():
        raise ValueError("the needle run cannot start:\n  " + "\n  ".join(problems))
    run_dir = (Path(root or ".") / cfg.run_dir).resolve()
    haystack = Haystack(AutoTokenizer.from_pretrained(cfg.checkpoint), cfg.seed)
    cases = [(c.length, c.depth) for c in haystack.cases(cfg.lengths, cfg.depths)]  # refuses a length too short
    config = {**dataclasses.asdict(cfg), "model_path": str(cfg.checkpoint)}
    params = json.loads((run_dir / "params.json").read_text()) if (run_dir / "params.json").exists() else None
    if params and (diff := [k for k in SAME_ANSWERS if params["config"].get(k) != config[k]]):
        raise ValueError(f"{run_dir} holds a run with another {', '.join(diff)}: pick another name for this one")
    params = params or {"name": run_dir.name, "created": now(), "text_sha256": text_hash(), "sessions": []}
    session = {"started": now(), "config": config, "environment": environment(), "launches": []}
    params["config"] = config
    params["sessions"].append(session)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "params.json", params)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for strategy, world in cfg.groups():
        todo = [c for c in cases if (strategy, world, *c) not in finished(run_dir)]
        if todo:
            session["launches"].append(_launch(cfg, run_dir, strategy, world, todo, f"{stamp}-{strategy}-w{world}"))
            write_json(run_dir / "params.json", params)
    session["finished"] = now()
    write_json(run_dir / "params.json", params)
    return run_dir


def finished(run_dir: Path) -> set[tuple[str, int, int, float]]:
    """(strategy, world size, length, depth) of the cases with an ``ok`` row: a resumed run skips them."""
    return {(r["strategy"], int(r["world_size"]), int(r["length"]), float(r["depth"]))
            for r in read_rows(run_dir / CSV) if r["status"] == "ok"}  # fmt: skip


class _Stalled(Exception):
    """No case finished for timeout_s: the launch is killed (by run_launch) and its cases marked."""


def _launch(cfg: NeedleConfig, run_dir: Path, strategy: str, world: int, todo: list, tag: str) -> dict[str, Any]:
    """One launch of ``todo``'s cases, each printed as it finishes; failure rows for those it left."""
    logs, results = run_dir / "logs", run_dir / CSV
    cmd = launch.launch_command("torchrun", world, ["-m", "fmsring.harness.needle", "--worker", str(run_dir), strategy])
    error_file = logs / f"{tag}.error.json"
    env = launch.child_env({"TORCHELASTIC_ERROR_FILE": str(error_file)})
    offset = results.stat().st_size if results.exists() else 0
    seen, last = 0, time.monotonic()
    print(f"{strategy} x{world}: {len(todo)} cases", flush=True)

    def poll(final: bool = False) -> None:
        nonlocal seen, last
        for r in read_rows(results, offset)[seen:]:
            seen, last = seen + 1, time.monotonic()
            print(f"  {int(r['length']):>6} tokens, depth {r['depth']:>3}%: {r['answer']!r} "
                  f"({'found' if r['retrieved'] == 'True' else 'missed'}, prefill {float(r['prefill_s']):.1f} s)",
                  flush=True)  # fmt: skip
        if not final and time.monotonic() - last > cfg.timeout_s:
            raise _Stalled

    try:
        out = launch.run_launch(cmd, env, logs / f"{tag}.stdout.log", logs / f"{tag}.stderr.log", math.inf, 5.0, poll)
        returncode, timed_out, seconds = out.returncode, out.timed_out, out.seconds
    except _Stalled:
        returncode, timed_out, seconds = None, True, math.nan
    poll(final=True)
    left = [c for c in todo if (strategy, world, *c) not in finished(run_dir)]
    if left:
        status, error = launch.failure_reason(error_file, returncode, timed_out, cfg.timeout_s)
        rows = [{"strategy": strategy, "world_size": world, "length": n, "depth": d, "status": status, "error": error,
                 **_provenance(cfg)} for n, d in left]  # fmt: skip
        append_rows(results, rows, COLUMNS)
        print(f"  {len(left)} cases {status}: {error}", flush=True)
    return {"strategy": strategy, "world_size": world, "cases": len(todo), "failed": len(left), "seconds": seconds,
            "returncode": returncode, "command": " ".join(cmd)}  # fmt: skip


def _provenance(cfg: NeedleConfig) -> dict[str, Any]:
    return {"seed": cfg.seed, "model": cfg.checkpoint.name, "device": cfg.device, "dtype": cfg.dtype,
            "git_sha": git_sha(), "timestamp": now()}  # fmt: skip


# ----------------------------------------------------------------------------- one launch (every rank)


def _load(strategy: str, cfg: NeedleConfig, device):
    import fms.models
    import torch

    import fmsring

    dtype = getattr(torch, cfg.dtype)
    if strategy == "hf":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(cfg.checkpoint, dtype=dtype).to(device).eval()
    kwargs = {"model_path": str(cfg.checkpoint), "device_type": device.type, "data_type": dtype}
    if strategy == "ring":
        return fmsring.get_model("hf_pretrained", distributed_strategy="ring", **kwargs, **cfg.ring_kwargs).eval()
    return fms.models.get_model("hf_pretrained", **kwargs).eval()


def answer(model, ids: tuple[int, ...], max_new_tokens: int, eos: int):
    """An FMS or ring model's greedy answer to one prompt through FMS's ``generate`` (``max_seq_len``
    covers the prompt: its default would cut a longer one): (new token ids, the first token's logits
    in fp32 on the CPU, prefill seconds: from the call to the first token)."""
    import torch
    from fms.utils.generation import generate

    first = []

    def keep(pos, logits, next_val, kwargs):
        first.append(logits[0].float().cpu())
        return next_val, kwargs

    x = torch.tensor([ids], device=next(model.parameters()).device)
    out, times = generate(model, x, max_seq_len=len(ids) + max_new_tokens, max_new_tokens=max_new_tokens,
                          do_sample=False, use_cache=True, eos_token_id=eos, timing="per-token",
                          post_iteration_hook=keep, extra_kwargs={"last_n_tokens": 1})  # fmt: skip
    return out[0, len(ids) :].tolist(), first[0], times[0]


def hf_answer(model, ids: tuple[int, ...], max_new_tokens: int, eos: int):
    """:func:`answer` of an HF transformers model, through its own ``generate``."""
    import torch
    from transformers import LogitsProcessor

    device, stamps = next(model.parameters()).device, []

    class Stamp(LogitsProcessor):  # called once per token, after its logits: the first call ends the prefill
        def __call__(self, input_ids, scores):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
            return scores

    x = torch.tensor([ids], device=device)
    start = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos, logits_processor=[Stamp()], output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    return out.sequences[0, len(ids) :].tolist(), out.logits[0][0].float().cpu(), stamps[0] - start


def worker(run_dir: Path, strategy: str) -> None:
    """Every rank of one launch: load the model, answer each case without an ok row; rank 0 appends
    its row (and, for ``single``, saves the reference the other strategies are compared with)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from fmsring.comm import maybe_init_dist

    cfg = NeedleConfig(**json.loads((run_dir / "params.json").read_text())["config"])
    torch.set_grad_enabled(False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "ring":
        maybe_init_dist(cfg.device, timeout_s=cfg.timeout_s)
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cfg.device == "cuda" else torch.device("cpu")
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.checkpoint)
    done = finished(run_dir)
    cases = [c for c in Haystack(tokenizer, cfg.seed).cases(cfg.lengths, cfg.depths)
             if (strategy, world, c.length, c.depth) not in done]  # fmt: skip
    model = _load(strategy, cfg, device)
    for case in cases:
        tokens, logits, prefill_s = (hf_answer if strategy == "hf" else answer)(
            model, case.ids, cfg.max_new_tokens, tokenizer.eos_token_id
        )
        if rank == 0:
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            row = {"strategy": strategy, "world_size": world, "length": case.length, "prompt_tokens": len(case.ids),
                   "depth": case.depth, "needle_at": round(case.needle_at, 4), "needle": case.value, "answer": text,
                   "retrieved": case.value.lower() in text.lower(), "prefill_s": round(prefill_s, 4),
                   "new_tokens": len(tokens), "status": "ok", "error": "", **_provenance(cfg)}  # fmt: skip
            append_rows(run_dir / CSV, [{**row, **_compare(run_dir, strategy, case, tokens, logits)}], COLUMNS)
    if dist.is_initialized():
        dist.destroy_process_group()


def _compare(run_dir: Path, strategy: str, case: Case, tokens: list[int], logits) -> dict[str, Any]:
    """Against the unsharded model's answer: identical tokens and the first-token logits' max abs
    difference; ``single`` saves that answer instead (nothing to compare where it is missing)."""
    import torch

    path = run_dir / "reference" / f"{case.length}_{case.depth:g}.pt"
    if strategy == "single":
        path.parent.mkdir(exist_ok=True)
        torch.save({"tokens": tokens, "logits": logits}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        return {}
    if not path.exists():
        return {}
    ref = torch.load(path)
    return {"identical_tokens": tokens == ref["tokens"],
            "logits_max_abs_diff": f"{(logits - ref['logits']).abs().max().item():.3e}"}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    p = argparse.ArgumentParser(prog="python -m fmsring.harness.needle", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", help="a YAML file of NeedleConfig fields (notebooks/needle.ipynb's parameters)")
    p.add_argument("--print-run-dir", action="store_true", help="print the run folder the config names, and exit")
    p.add_argument(
        "--worker", nargs=2, metavar=("RUN_DIR", "STRATEGY"), help="one launch's rank (run_needle starts it)"
    )
    args = p.parse_args(argv)
    if args.worker:
        return record(worker)(Path(args.worker[0]), args.worker[1])  # an exception: torchrun's error file
    import yaml

    given = yaml.safe_load(Path(args.params).read_text()) if args.params else {}
    cfg = NeedleConfig(**(given or {}))
    print(cfg.run_dir if args.print_run_dir else run_needle(cfg))


if __name__ == "__main__":
    main()
