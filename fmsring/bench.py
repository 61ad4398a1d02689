"""Time single-GPU, ring, tensor-parallel and torch context-parallel inference side by side.

Run it under ``torchrun --nproc_per_node=N -m fmsring.bench ...`` (or as one plain
process). Every strategy runs on the same machine, with the same seeded random
weights and prompts, and each (strategy, seq_len, phase) becomes one CSV row,
appended by rank 0 as soon as it is measured, so a crash keeps finished rows.
A config that runs out of memory or raises becomes an ``oom``/``error`` row and
the run goes on; all ranks agree on every config's status first, so no rank
waits in a collective another rank skipped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fms.models
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fms.modules.attention import MultiHeadAttention
from torch import nn

import fmsring
from fmsring.comm import maybe_init_dist
from fmsring.fusion import fuse_elementwise
from fmsring.layout import LAYOUTS

COLUMNS = (
    "strategy",
    "world_size",
    "seq_len",
    "batch",
    "dtype",
    "layout",
    "phase",
    "latency_ms",
    "latency_ms_min",
    "latency_ms_max",
    "ttft_ms",
    "peak_mem_gib",
    "tflops_per_gpu",
    "max_abs_err",
    "rel_err",
    "same_next_token",
    "status",
    "error",
    "model",
    "device",
    "repeats",
    "gpu_name",
    "gpu_count",
    "git_sha",
    "torch_version",
    "cuda_version",
    "nccl_version",
    "timestamp",
)
STRATEGIES = ("single", "ring", "tp", "torch_cp")
PHASES = ("prefill", "decode")
DTYPES = ("float32", "bfloat16", "float16")
STATUSES = ("ok", "skipped", "oom", "error")  # in order of severity: the worst rank's wins
NAN = float("nan")
_PLAIN_SDPA = F.scaled_dot_product_attention  # taken before any CP context can patch it


@dataclass
class ModelSpec:
    """Which model to build and where: an FMS architecture/variant with seeded random
    weights, or a checkpoint (model_path + source). Shared by the bench and the sweep."""

    architecture: str = "llama"
    variant: str | None = "micro"
    model_path: str | None = None
    source: str | None = None  # checkpoint format for model_path, e.g. "hf"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra get_model kwargs, e.g. {"nlayers": 2}
    device: str = "cpu"  # cpu (gloo) or cuda (nccl)
    dtype: str = "float32"


@dataclass
class BenchConfig(ModelSpec):
    """Everything one benchmark run needs; the CLI flags map onto these fields one to one."""

    strategies: tuple[str, ...] = ("single", "ring")
    phases: tuple[str, ...] = ("prefill",)
    seq_lens: tuple[int, ...] = (128, 256)
    batch: int = 1
    layout: str = "zigzag"
    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 32
    ring_kwargs: dict[str, Any] = field(default_factory=dict)  # extra fmsring.get_model kwargs for ring only
    fuse_peers: bool = False  # give single/tp/torch_cp the elementwise fusion ring has
    out: str | None = None
    check: bool = True
    timeout_s: float = 1800.0
    seed: int = 0


# ----------------------------------------------------------------------------- CLI


def parse_seq_len(text: str) -> int:
    """'4096', '8K', '128k', '1M' -> tokens (K = 1024), so sweeps read like papers."""
    text = text.strip()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    value = int(digits) * scale
    if value <= 0:
        raise argparse.ArgumentTypeError(f"sequence length must be positive: {text!r}")
    return value


def _csv_list(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def _seq_lens(text: str) -> tuple[int, ...]:
    return tuple(parse_seq_len(s) for s in text.split(",") if s.strip())


def _json_dict(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m fmsring.bench",
        description="Benchmark single / ring / tp / torch_cp inference and append CSV rows (launch with torchrun for N>1).",
    )
    p.add_argument("--architecture", default=d.architecture)
    p.add_argument("--variant", default=d.variant)
    p.add_argument("--model-path", default=d.model_path, help="checkpoint to load; random weights (seeded) if omitted")
    p.add_argument("--source", default=d.source, help="checkpoint format, e.g. hf")
    p.add_argument(
        "--model-kwargs", type=_json_dict, default={}, help="JSON object passed to get_model, e.g. '{\"nlayers\":2}'"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--strategies", type=_csv_list(STRATEGIES), default=d.strategies, help=",".join(STRATEGIES))
    p.add_argument("--phases", type=_csv_list(PHASES), default=d.phases, help=",".join(PHASES))
    p.add_argument("--seq-lens", type=_seq_lens, default=d.seq_lens, help="comma list; K/M suffixes, e.g. 8K,128K")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--layout", choices=LAYOUTS, default=d.layout, help="ring token layout")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs per config")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs per config")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="greedy steps timed per decode run")
    p.add_argument(
        "--ring-kwargs",
        type=_json_dict,
        default={},
        help="JSON object of ring-only get_model options, e.g. '{\"ring_cuda_graphs\": false}'",
    )
    p.add_argument(
        "--fuse-peers",
        action=argparse.BooleanOptionalAction,
        default=d.fuse_peers,
        help="apply fmsring.fusion.fuse_elementwise to the peers' FMS models too, to see what ring gains beyond it",
    )
    p.add_argument("--out", default=d.out, help="CSV to append rows to (rank 0 writes)")
    p.add_argument(
        "--check", action=argparse.BooleanOptionalAction, default=d.check, help="compare logits with `single`"
    )
    p.add_argument(
        "--timeout-s", type=float, default=d.timeout_s, help="collective/barrier timeout; must exceed one config's run"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seeds weights and prompts (identical on every rank)")
    return p


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    ns = build_parser().parse_args(argv)
    cfg = BenchConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(BenchConfig)})
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.batch < 1 or cfg.decode_tokens < 1:
        build_parser().error("--repeats, --batch and --decode-tokens must be >= 1 and --warmup >= 0")
    return cfg


# ----------------------------------------------------------------------------- process group


@dataclass
class DistEnv:
    """This process's place in the run. ``ctrl`` is a gloo group for the control
    plane (status agreement, barriers), so waiting never occupies a GPU stream."""

    rank: int
    world: int
    device: torch.device
    ctrl: dist.ProcessGroup
    owns_group: bool


def setup_dist(cfg: BenchConfig) -> DistEnv:
    """Join torchrun's group (or make a 1-rank one, which ring needs too), with cfg.timeout_s."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    owns = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    timeout = timedelta(seconds=cfg.timeout_s)
    if owns and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == ("nccl" if torch.cuda.is_available() else "gloo"):
            maybe_init_dist(timeout_s=cfg.timeout_s)
        else:  # e.g. --device cpu on a GPU host: maybe_init_dist would pick NCCL
            dist.init_process_group(backend, timeout=timeout)
    elif owns:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else dist.group.WORLD
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), device, ctrl, owns)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _align(env: DistEnv, all_ranks: bool) -> None:
    """Drain this GPU and line the ranks up, so a repeat's time is not another rank's lag."""
    _sync(env.device)
    if all_ranks and env.world > 1:
        dist.barrier(group=env.ctrl)


# ----------------------------------------------------------------------------- models


def _model_args(cfg: BenchConfig, device: str | None = None) -> dict[str, Any]:
    return dict(
        architecture=cfg.architecture,
        variant=cfg.variant,
        model_path=cfg.model_path,
        source=cfg.source,
        device_type=device or cfg.device,
        data_type=cfg.dtype,
        **cfg.model_kwargs,
    )


def load_model(strategy: str, cfg: BenchConfig, env: DistEnv) -> nn.Module:
    """The model for one strategy, with the same seeded weights as every other strategy.

    "none" (any unknown name) keeps FMS from switching to TP when world > 1.
    """
    torch.manual_seed(cfg.seed)
    if strategy == "ring":
        model = fmsring.get_model(
            **_model_args(cfg),
            distributed_strategy="ring",
            ring_layout=cfg.layout,
            ring_check_inputs=False,
            **cfg.ring_kwargs,
        )
    elif strategy == "tp":
        model = fms.models.get_model(**_model_args(cfg), distributed_strategy="tp")
        if cfg.model_path is None:
            _copy_full_weights(model, cfg, env)
    else:
        model = fms.models.get_model(**_model_args(cfg), distributed_strategy="none")
    if cfg.fuse_peers and strategy != "ring":
        fuse_elementwise(model)
    return model.eval()


def _copy_full_weights(tp_model: nn.Module, cfg: BenchConfig, env: DistEnv) -> None:
    """Give the TP model the unsharded model's random weights, sharded by FMS's own loader.

    FMS initialises each TP shard with its own random draw, so without this TP
    would run a different network and the exactness check would be meaningless.
    """
    from fms.utils import serialization

    torch.manual_seed(cfg.seed)
    full = fms.models.get_model(**_model_args(cfg), distributed_strategy="none")
    state = dict(full.state_dict())
    del full
    serialization.load_state_dict_into_model(
        model=tp_model,
        state_dict=state,
        architecture=cfg.architecture,
        source="fms",
        dtype=getattr(torch, cfg.dtype),
        distributed_strategy="tp",
        initial_device=env.device,
        rank=env.rank,
    )
    del state
    _free_memory()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "src_vocab_size", None)
    if vocab is None:
        vocab = model.head.out_features  # type: ignore[union-attr]
    return int(vocab)


def make_input_ids(cfg: BenchConfig, seq_len: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Random prompt drawn on the CPU from a seeded generator: identical on every rank and strategy."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + seq_len)
    return torch.randint(0, vocab, (cfg.batch, seq_len), generator=gen).to(device)


# ----------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopShape:
    """What the FLOP count needs: linear weights (head apart) and sum over layers of heads*(dk+dv)."""

    linear_params: int
    head_params: int
    attn_width: int


def flop_shape(model: nn.Module) -> FlopShape:
    """Read from an unsharded (meta) model, so TP's sharding does not shrink the count."""
    head = getattr(model, "head", None)
    head_ids = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in head_ids)
    head_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m) in head_ids)
    width = sum(
        m.nheads * (m.emb_kq_per_head + m.emb_v_per_head) for m in model.modules() if isinstance(m, MultiHeadAttention)
    )
    return FlopShape(linear, head_params, width)


def model_flops(shape: FlopShape, batch: int, new_tokens: int, context: int = 0, logit_tokens: int = 1) -> float:
    """Forward FLOPs for ``new_tokens`` tokens per sequence after ``context`` cached ones.

    One multiply-add = 2 FLOPs. Linears: 2 * params * tokens, the LM head only on
    the ``logit_tokens`` whose logits are computed. Causal attention: QK^T and PV
    cost 2*(dk+dv) per head per visible (query, key) pair; a prefill of L sees
    L(L+1)/2 pairs, i.e. the familiar 2*2*b*h*d*L^2/2 per layer. Embedding
    look-ups, norms and softmax are ignored.
    """
    linear = 2.0 * batch * (shape.linear_params * new_tokens + shape.head_params * logit_tokens)
    pairs = new_tokens * context + new_tokens * (new_tokens + 1) / 2
    return linear + 2.0 * batch * shape.attn_width * pairs


def phase_flops(shape: FlopShape | None, cfg: BenchConfig, seq_len: int, phase: str) -> float:
    """Prefill: the whole prompt, one logit row. Decode: one token at the mid-run context."""
    if shape is None:
        return NAN
    if phase == "prefill":
        return model_flops(shape, cfg.batch, seq_len)
    return model_flops(shape, cfg.batch, 1, context=seq_len + cfg.decode_tokens // 2)


def _meta_model(cfg: BenchConfig) -> nn.Module | None:
    """The unsharded model on the meta device (no memory, no weights); None if FMS can't build it."""
    try:
        meta_cfg = dataclasses.replace(cfg, model_path=None, source=None)
        return fms.models.get_model(**_model_args(meta_cfg, device="meta"), distributed_strategy="none")
    except Exception as exc:  # noqa: BLE001 - FLOPs are optional, the benchmark is not
        print(f"[bench] no FLOP count: cannot build a meta model ({exc})", file=sys.stderr)
        return None


def _fit_rope_table(cfg: BenchConfig, meta: nn.Module | None) -> BenchConfig:
    """Raise max_expected_seq_len to the longest context: FMS's plain models never regrow
    their RoPE table, so single/tp/torch_cp would index past it on long prompts."""
    if meta is None or "max_expected_seq_len" in cfg.model_kwargs:
        return cfg
    needed = max(cfg.seq_lens) + (cfg.decode_tokens + 1 if "decode" in cfg.phases else 1)
    have = getattr(getattr(meta, "config", None), "max_expected_seq_len", None)
    if have is None or have >= needed:
        return cfg
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"[bench] max_expected_seq_len {have} -> {needed}: the RoPE table must cover the longest context",
            file=sys.stderr,
        )
    return dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, "max_expected_seq_len": needed})


# ----------------------------------------------------------------------------- timing


class Clock:
    """Marks on a timeline: CUDA events on GPU (read only after the run, so the
    host never stalls mid-run), perf_counter on CPU (where ops are synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, start: Any, end: Any) -> float:
        """Elapsed milliseconds; call after the device has been synchronised."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


@dataclass
class Measured:
    """One rank's outcome of one config. ``output`` (logits, tokens) stays local; the rest is gathered."""

    status: str = "ok"
    error: str = ""
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    peak_gib: float = NAN
    output: tuple[torch.Tensor, torch.Tensor] | None = None


def _prefill_fn(strategy: str, model: nn.Module, mesh: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """One prefill returning the last token's logits [batch, vocab] on every rank."""
    if strategy == "torch_cp":
        return lambda ids: torch_cp_prefill(model, ids, mesh)
    return lambda ids: model(ids, last_n_tokens=1)[:, -1]


def time_prefill(fn: Callable, ids: torch.Tensor, cfg: BenchConfig, env: DistEnv, all_ranks: bool) -> Measured:
    """Warm-up runs, then ``repeats`` timed ones; keeps the last run's logits for the check."""
    clock, spans, logits = Clock(env.device), [], None
    for i in range(cfg.warmup + cfg.repeats):
        logits = None
        _align(env, all_ranks)
        start = clock.mark()
        logits = fn(ids)
        end = clock.mark()
        if i >= cfg.warmup:
            spans.append((start, end))
    _sync(env.device)
    assert logits is not None
    out = (logits.float().cpu(), logits.argmax(-1).cpu())
    return Measured(latencies=[clock.ms(a, b) for a, b in spans], output=out)


def greedy_decode(
    model: nn.Module, ids: torch.Tensor, steps: int, clock: Clock
) -> tuple[list, list, torch.Tensor, torch.Tensor]:
    """Prefill with a cache, then ``steps`` greedy one-token steps, FMS's calling convention
    (which LlamaRing follows). Returns (prefill span, step spans, logits [1+steps, b, V], tokens).

    The device is drained after every step, as a generator streaming tokens must,
    so a step's time includes its launch overhead instead of hiding it behind the
    previous step's (or the prefill's) GPU work.
    """
    start = clock.mark()
    logits, cache = model(ids, use_cache=True, last_n_tokens=1)
    prefill_span = (start, clock.mark())
    clock.sync()
    rows = [logits[:, -1]]
    next_ids = rows[-1].argmax(-1, keepdim=True)
    tokens, spans = [next_ids], []
    for _ in range(steps):
        start = clock.mark()
        logits, cache = model(next_ids, past_key_value_states=cache, use_cache=True, last_n_tokens=1)
        spans.append((start, clock.mark()))
        clock.sync()
        rows.append(logits[:, -1])
        next_ids = rows[-1].argmax(-1, keepdim=True)
        tokens.append(next_ids)
    return [prefill_span], spans, torch.stack(rows), torch.cat(tokens, dim=1)


def time_decode(model: nn.Module, ids: torch.Tensor, cfg: BenchConfig, env: DistEnv, all_ranks: bool) -> Measured:
    """Per-token step times of every timed run (flattened) plus each run's cached-prefill time."""
    clock, steps, ttfts, out = Clock(env.device), [], [], None
    for i in range(cfg.warmup + cfg.repeats):
        out = None
        _align(env, all_ranks)
        prefill, spans, logits, tokens = greedy_decode(model, ids, cfg.decode_tokens, clock)
        out = (logits, tokens)
        if i >= cfg.warmup:
            ttfts += prefill
            steps += spans
    _sync(env.device)
    assert out is not None
    result = (out[0].float().cpu(), out[1].cpu())
    return Measured(
        latencies=[clock.ms(a, b) for a, b in steps], ttfts=[clock.ms(a, b) for a, b in ttfts], output=result
    )


# ----------------------------------------------------------------------------- torch context parallel


def make_cp_mesh(env: DistEnv) -> Any:
    """A 1-D mesh over all ranks for torch_cp, with the all-gather K/V rotation (no all-to-all)."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        set_rotate_method("allgather")
    except ImportError:
        pass
    return init_device_mesh(env.device.type, (env.world,))


def torch_cp_prefill(model: nn.Module, ids: torch.Tensor, mesh: Any) -> torch.Tensor:
    """PyTorch's context_parallel around the plain FMS model's ``base_model``, then the
    head on the last token, which one rank holds; a sum all-reduce gives it to all.

    position_ids travel as a CP buffer, so each rank's RoPE angles and its share
    of the last token follow CP's (load-balanced) token order whatever it is.
    """
    from torch.distributed.tensor.experimental import context_parallel

    batch, seq_len = ids.shape
    x = ids.clone()
    pos = torch.arange(seq_len, device=ids.device).repeat(batch, 1)
    _restore_plain_sdpa()
    try:
        with context_parallel(mesh, buffers=[x, pos], buffer_seq_dims=[1, 1], no_restore_buffers={x, pos}):
            if F.scaled_dot_product_attention is _PLAIN_SDPA:
                raise RuntimeError(
                    "context_parallel did not patch F.scaled_dot_product_attention: ranks would attend locally"
                )
            hidden, _ = model.base_model(x, pos)
    finally:
        _restore_plain_sdpa()
    is_last = pos[0] == seq_len - 1
    where = is_last.to(torch.int64).argmax().view(1)
    logits = model.head(hidden.index_select(1, where))[:, 0] * is_last.any().to(hidden.dtype)
    dist.all_reduce(logits, group=mesh.get_group())
    return logits


def _restore_plain_sdpa() -> None:
    """Undo a CP patch that an exception left behind (torch 2.11's context_parallel has no
    ``finally``): it would send every later strategy's attention through CP, and stop the
    next context from patching at all."""
    if F.scaled_dot_product_attention is not _PLAIN_SDPA:
        F.scaled_dot_product_attention = _PLAIN_SDPA


# ----------------------------------------------------------------------------- one config


def _classify(exc: BaseException) -> tuple[str, str]:
    """(status, one-line message): CUDA/host OOMs apart from other errors."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    oom = isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()
    return ("oom" if oom else "error"), text


def _skip_reason(strategy: str, phase: str, seq_len: int, env: DistEnv) -> str:
    """Why a config cannot run at all (decided identically on every rank), or ''."""
    if strategy != "torch_cp":
        return ""
    if env.device.type != "cuda":
        return "torch_cp needs CUDA SDPA (flash/efficient/cudnn)"
    if phase == "decode":
        return "torch_cp has no KV-cache decode"
    if seq_len % (2 * env.world):
        return f"torch_cp needs seq_len divisible by 2*world ({2 * env.world})"
    return ""


@torch.no_grad()
def measure(
    strategy: str,
    model: nn.Module | None,
    load_error: Measured | None,
    cfg: BenchConfig,
    env: DistEnv,
    seq_len: int,
    phase: str,
    mesh: Any,
) -> Measured:
    """Run one config on this rank; any exception becomes a status instead of killing the run."""
    skip = _skip_reason(strategy, phase, seq_len, env)
    if skip:
        return Measured(status="skipped", error=skip)
    if load_error is not None:
        return dataclasses.replace(load_error)
    assert model is not None
    all_ranks = strategy != "single"
    _free_memory()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    try:
        ids = make_input_ids(cfg, seq_len, _vocab_size(model), env.device)
        if phase == "prefill":
            result = time_prefill(_prefill_fn(strategy, model, mesh), ids, cfg, env, all_ranks)
        else:
            result = time_decode(model, ids, cfg, env, all_ranks)
    except Exception as exc:  # noqa: BLE001 - one config's failure must not end the sweep
        status, message = _classify(exc)
        result = Measured(status=status, error=message)
    _free_memory()
    if env.device.type == "cuda":
        result.peak_gib = torch.cuda.max_memory_allocated(env.device) / 2**30
    return result


def agree(local: Measured, env: DistEnv) -> Measured:
    """Every rank's outcome merged: worst status wins, times and memory are maxima over ranks."""
    if env.world == 1:
        return local
    mine = dataclasses.replace(local, output=None)
    gathered: list[Measured | None] = [None] * env.world
    dist.all_gather_object(gathered, mine, group=env.ctrl)
    parts = [g for g in gathered if g is not None]
    worst = max(range(len(parts)), key=lambda r: (STATUSES.index(parts[r].status), -r))
    merged = Measured(
        status=parts[worst].status, peak_gib=max((p.peak_gib for p in parts), default=NAN), output=local.output
    )
    if merged.status != "ok":
        merged.error = parts[worst].error if merged.status == "skipped" else f"rank {worst}: {parts[worst].error}"
        return merged
    merged.latencies = [max(v) for v in zip(*(p.latencies for p in parts))]
    merged.ttfts = [max(v) for v in zip(*(p.ttfts for p in parts))]
    return merged


# ----------------------------------------------------------------------------- rows


def exactness(
    output: tuple[torch.Tensor, torch.Tensor] | None, ref: tuple[torch.Tensor, torch.Tensor] | None
) -> dict[str, Any]:
    """max |a-b|, ||a-b||/||b|| over the compared logits, and whether the greedy tokens agree."""
    if output is None or ref is None or output[0].shape != ref[0].shape:
        return {"max_abs_err": NAN, "rel_err": NAN, "same_next_token": ""}
    diff = output[0].double() - ref[0].double()
    return {
        "max_abs_err": diff.abs().max().item(),
        "rel_err": (diff.norm() / ref[0].double().norm().clamp_min(1e-300)).item(),
        "same_next_token": bool(torch.equal(output[1], ref[1])),
    }


def summarize(result: Measured, flops: float, gpus: int) -> dict[str, Any]:
    """Median and spread of the latencies, TTFT median, FLOP rate per GPU."""
    lat = result.latencies
    if result.status != "ok" or not lat:
        return {"latency_ms": NAN, "latency_ms_min": NAN, "latency_ms_max": NAN, "ttft_ms": NAN, "tflops_per_gpu": NAN}
    median = statistics.median(lat)
    return {
        "latency_ms": median,
        "latency_ms_min": min(lat),
        "latency_ms_max": max(lat),
        "ttft_ms": statistics.median(result.ttfts) if result.ttfts else NAN,
        "tflops_per_gpu": flops / (median / 1e3) / max(gpus, 1) / 1e12 if median > 0 else NAN,
    }


def environment(cfg: BenchConfig, env: DistEnv) -> dict[str, Any]:
    """Columns that describe the machine and code, identical on every row of a run."""
    cuda = env.device.type == "cuda"
    nccl = ""
    if cuda:
        try:
            nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - a torch without NCCL
            nccl = ""
    model = f"{cfg.architecture}/{cfg.variant}" + (
        f" {json.dumps(cfg.model_kwargs, sort_keys=True)}" if cfg.model_kwargs else ""
    )
    if cfg.model_path:
        model += f" @{cfg.model_path}"
    if cfg.ring_kwargs:  # a ring variant: say which, so its rows are not mistaken for the default's
        model += f" ring{json.dumps(cfg.ring_kwargs, sort_keys=True)}"
    if cfg.fuse_peers:
        model += " fused-peers"
    return {
        "model": model,
        "device": env.device.type,
        "repeats": cfg.repeats,
        "gpu_name": torch.cuda.get_device_name(env.device) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "nccl_version": nccl,
    }


def git_sha() -> str:
    """HEAD of this checkout, "-dirty" if tracked files changed; FMSRING_GIT_SHA where
    the code travelled without .git; "unknown" otherwise."""
    if os.environ.get("FMSRING_GIT_SHA"):
        return os.environ["FMSRING_GIT_SHA"]
    root = str(Path(__file__).resolve().parent.parent)
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def point(
    strategy: str, world: int, seq_len: int, phase: str, *, batch: int, dtype: str, layout: str
) -> dict[str, Any]:
    """The columns that say which point a row measures (the sweep's failure rows use them too)."""
    return {
        "strategy": strategy,
        "world_size": world,
        "seq_len": seq_len,
        "batch": batch,
        "dtype": dtype,
        "layout": layout if strategy == "ring" else "",
        "phase": phase,
    }


def append_row(path: str, row: dict[str, Any]) -> None:
    """Append one row and flush it, writing the header first if the file is new or empty."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        if fh.tell() == 0:
            writer.writeheader()
        writer.writerow(row)
        fh.flush()


def check_csv_header(path: str | None) -> None:
    """Refuse to append to a CSV whose header is not COLUMNS (rows would land under wrong names)."""
    if not path or not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    if tuple(header) != COLUMNS:
        raise ValueError(f"{path} has other columns than fmsring.bench.COLUMNS; write to a new file")


def _log(env: DistEnv, row: dict[str, Any]) -> None:
    if env.rank == 0:
        err = "" if math.isnan(row["max_abs_err"]) else f" err={row['max_abs_err']:.2e}"
        print(
            f"[bench] {row['strategy']:<8} W={row['world_size']} L={row['seq_len']:<7} {row['phase']:<7} "
            f"{row['latency_ms']:10.3f} ms  {row['status']}{err} {row['error']}",
            flush=True,
        )


# ----------------------------------------------------------------------------- driver


@dataclass
class _Run:
    """State shared by the configs of one run."""

    cfg: BenchConfig
    env: DistEnv
    info: dict[str, Any]
    shape: FlopShape | None
    refs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    mesh: Any = None


def _load(strategy: str, run: _Run) -> tuple[nn.Module | None, Measured | None]:
    """Load on the ranks that run the strategy; a failure becomes every config's status."""
    env = run.env
    if strategy == "single" and env.rank != 0:
        return None, None
    try:
        if strategy == "torch_cp" and run.mesh is None:
            run.mesh = make_cp_mesh(env)
        model = load_model(strategy, run.cfg, env)
        return model, None
    except Exception as exc:  # noqa: BLE001
        status, message = _classify(exc)
        _free_memory()
        return None, Measured(status=status, error=f"loading: {message}")


def _record(strategy: str, seq_len: int, phase: str, result: Measured, run: _Run) -> None:
    """Rank 0 turns a merged result into a row, checks it against `single`, appends it."""
    cfg, env = run.cfg, run.env
    world = 1 if strategy == "single" else env.world
    if strategy == "single" and result.status == "ok" and result.output is not None:
        run.refs[(seq_len, phase)] = result.output
    check = cfg.check and strategy != "single" and result.status == "ok"
    errors = exactness(result.output, run.refs.get((seq_len, phase))) if check else exactness(None, None)
    row = {
        **point(strategy, world, seq_len, phase, batch=cfg.batch, dtype=cfg.dtype, layout=cfg.layout),
        **summarize(result, phase_flops(run.shape, cfg, seq_len, phase), world),
        "peak_mem_gib": result.peak_gib,
        **errors,
        "status": result.status,
        "error": result.error,
        **run.info,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    run.rows.append(row)
    if cfg.out:
        append_row(cfg.out, row)
    _log(env, row)


def run_strategy(strategy: str, run: _Run) -> None:
    """Load once, then every (seq_len, phase); `single` runs on rank 0 while the others wait."""
    env, cfg = run.env, run.cfg
    runnable = any(not _skip_reason(strategy, p, n, env) for n in cfg.seq_lens for p in cfg.phases)
    model, load_error = _load(strategy, run) if runnable else (None, None)
    if strategy != "single" and runnable:
        load_error = _agree_load(load_error, env)
    for seq_len in cfg.seq_lens:
        for phase in cfg.phases:
            if strategy == "single":
                result = (
                    measure(strategy, model, load_error, cfg, env, seq_len, phase, run.mesh) if env.rank == 0 else None
                )
                if env.world > 1:
                    dist.barrier(group=env.ctrl)
            else:
                result = agree(measure(strategy, model, load_error, cfg, env, seq_len, phase, run.mesh), env)
            if env.rank == 0 and result is not None:
                _record(strategy, seq_len, phase, result, run)
    del model
    _free_memory()


def _agree_load(load_error: Measured | None, env: DistEnv) -> Measured | None:
    """If any rank failed to load, every rank reports that failure for every config."""
    merged = agree(load_error or Measured(), env)
    return None if merged.status == "ok" else merged


def reference_pass(run: _Run) -> None:
    """When `single` is not benchmarked but --check is on, compute its outputs once (rank 0)."""
    cfg, env = run.cfg, run.env
    quick = dataclasses.replace(cfg, warmup=0, repeats=1, out=None)
    if env.rank == 0:
        model, load_error = _load("single", run)
        for seq_len in cfg.seq_lens:
            for phase in cfg.phases:
                result = measure("single", model, load_error, quick, env, seq_len, phase, None)
                if result.status == "ok" and result.output is not None:
                    run.refs[(seq_len, phase)] = result.output
        del model
        _free_memory()
    if env.world > 1:
        dist.barrier(group=env.ctrl)


def run(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Benchmark every strategy of ``cfg``; rank 0 returns (and appends) the rows, others []."""
    check_csv_header(cfg.out if int(os.environ.get("RANK", "0")) == 0 else None)
    env = setup_dist(cfg)
    try:
        info = environment(cfg, env) if env.rank == 0 else {}
        meta = _meta_model(cfg)
        shape = flop_shape(meta) if meta is not None else None
        cfg = _fit_rope_table(cfg, meta)
        del meta
        run_state = _Run(cfg, env, info, shape)
        strategies = [s for s in cfg.strategies if not (s == "tp" and env.world == 1)]
        strategies.sort(key=lambda s: s != "single")  # `single` first: it is the reference
        if cfg.check and "single" not in strategies and strategies:
            reference_pass(run_state)
        for strategy in strategies:
            run_strategy(strategy, run_state)
        return run_state.rows
    finally:
        if env.owns_group:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
