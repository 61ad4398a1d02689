"""A one-token decode step captured as a CUDA graph and replayed.

A decode step is bound by the bytes it reads, yet launches hundreds of small
kernels from Python, each costing more to launch than to run; replaying them
as one graph removes the launch cost (docs/performance.md has the numbers). The step must
have static shapes -- the ring's static decode path (preallocated cache,
device-side write slot and lengths) does -- and the same step must be
captured on every rank at the same time, since it contains a collective.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class StepInputs:
    """Everything a static decode step reads that changes between steps.

    A value every sequence shares -- the rank's write slot and fill, the new token's position
    when none is given -- may be a host int: it reaches a captured graph's input as one fill,
    where a tensor would cost a launch to make and another to copy in (a drained step waits
    for the host's every launch: docs/performance.md, Decode)."""

    ids: torch.Tensor  # [b, 1] token ids
    positions: torch.Tensor | int  # [b, 1] int64: global positions
    write_slot: torch.Tensor | int  # [1] int64: this rank's slot for the new K/V
    kv_lens: torch.Tensor | int  # [b] int32: this rank's valid slots after the write
    slot_bias: torch.Tensor | None = None  # [b, capacity] fp32: a padding mask at this rank's filled slots
    slot_index: torch.Tensor | None = None  # [capacity] int64: each slot's sequence index (windowed models)
    query_index: torch.Tensor | int | None = None  # [1] int64: the new token's sequence index (windowed models)

    def values(self) -> list[torch.Tensor | int]:
        """The fields that are set (``dataclasses.astuple`` would deep-copy them)."""
        return [t for f in fields(self) if (t := getattr(self, f.name)) is not None]

    def materialized(self) -> StepInputs:
        """Every int as the tensor it stands for, on the ids' device: what the step itself reads."""
        b, device = self.ids.shape[0], self.ids.device

        def tensor(value: torch.Tensor | int | None, shape: tuple[int, ...], dtype: torch.dtype):
            return torch.full(shape, value, dtype=dtype, device=device) if isinstance(value, int) else value

        return replace(
            self,
            positions=tensor(self.positions, (b, 1), torch.int64),
            write_slot=tensor(self.write_slot, (1,), torch.int64),
            kv_lens=tensor(self.kv_lens, (b,), torch.int32),
            query_index=tensor(self.query_index, (1,), torch.int64),
        )

    def copy_(self, other: StepInputs) -> None:
        """Write ``other``'s values into these tensors, the ones a captured graph reads."""
        for dst, src in zip(self.values(), other.values()):
            if isinstance(src, int):
                dst.fill_(src)
            else:
                dst.copy_(src, non_blocking=True)

    def clone(self) -> StepInputs:
        return replace(self, **{f.name: t.clone() for f in fields(self) if (t := getattr(self, f.name)) is not None})


@contextmanager
def collections_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside, as it was on leaving.

    A process's first step compiles its layers: dynamo's tracing allocates
    objects by the hundred thousand, enough to set off a full collection,
    which scans the whole heap (a loaded model, the prefill's compiled code)
    and can cost more than the tracing it interrupts. The garbage made
    inside is collected by the first collection after it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class CapturedStep:
    """One captured step, valid while its ``key`` holds (the batch size, the
    cache buffers' id and the RoPE tables: the addresses baked into the graph).

    Capturing needs a run of the step first (lazy kernel and workspace set-up
    must not happen inside the capture); that run is the step itself -- it
    writes the new K/V and returns its logits -- so a capture costs no extra
    step. The step is idempotent for given inputs, which makes this safe.
    That first run is also where the layers compile, so both run with
    collections paused.
    """

    def __init__(self, key: Hashable, inputs: StepInputs, step: Callable[[StepInputs], torch.Tensor]):
        self.key = key
        self.inputs = inputs.materialized().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with collections_paused():
            with torch.cuda.stream(side):
                self.first = step(self.inputs).clone()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = step(self.inputs)

    def replay(self, inputs: StepInputs) -> torch.Tensor:
        """The step's output for new inputs (a fresh tensor: the graph's own is reused)."""
        self.inputs.copy_(inputs)
        self.graph.replay()
        return self.output.clone()


class DecodeGraphs:
    """Holds the current captured step, recapturing when its key changes.

    One graph at a time: a new cache or a grown one has new addresses, and the
    old graph's memory pool is released with it.
    """

    def __init__(self) -> None:
        self.current: CapturedStep | None = None

    def run(self, key: Hashable, inputs: StepInputs, step: Callable[[StepInputs], torch.Tensor]) -> torch.Tensor:
        if self.current is not None and self.current.key == key:
            return self.current.replay(inputs)
        self.current = None  # release the old graph's pool before capturing
        try:
            self.current = CapturedStep(key, inputs, step)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the decode step as a CUDA graph failed ({e}); "
                "build the model with ring_cuda_graphs=False to decode eagerly"
            ) from e
        return self.current.first
