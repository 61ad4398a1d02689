"""The sharded KV cache: each rank keeps only the K/V of the tokens it owns.

FMS hands a model's cache back to it as a list of per-layer (K, V) pairs;
``RingCache`` is that list plus the bookkeeping every rank needs to agree on
(who holds which global token, how many slots are allocated), kept as Python
ints so that no step syncs the host. This module alone decides how many slots
a cache has: its constructors size it, :meth:`RingCache.extend` grows it, and
:func:`headroom_for` says how much room a caller should ask for up front.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from fmsring.layout import ShardPlan

_CACHE_IDS = itertools.count()
# Slots per rank a cache keeps free past its tokens unless told otherwise: a few
# hundred decode steps before the first growth, which copies the whole cache.
DEFAULT_HEADROOM = 256


def new_cache_id() -> int:
    """A fresh id for a cache made by a prefill. Every rank prefills in the same
    calls, so the ids agree across ranks: a captured decode step is keyed on
    (cache_id, capacity), and all ranks must recapture together."""
    return next(_CACHE_IDS)


def capacity_for(old_fills: Sequence[int], new_fills: Sequence[int], capacity: int, headroom: int) -> int:
    """Slots per layer, the same on every rank, once ranks' fills go from
    ``old_fills`` to ``new_fills``: ``capacity`` while it suffices, else the
    need plus ``headroom``, so that all ranks grow (and recapture a decode
    graph) in the same step.

    The need covers every new fill and one free slot past every old fill: a
    one-token step writes its token on every rank, at the rank's first free
    slot, so the write needs no branch.
    """
    need = max(max(new_fills), max(old_fills) + 1)
    return capacity if need <= capacity else need + headroom


def headroom_for(new_tokens: int, world_size: int, minimum: int = DEFAULT_HEADROOM) -> int:
    """Headroom (slots per rank, at least ``minimum``) that lets a cache take
    ``new_tokens`` more tokens over ``world_size`` ranks without growing.

    A layout gives a rank at most one token over an even share, placement
    keeps one-token steps within one token of each other, and a one-token
    step needs one free slot past every fill: the even share plus two.
    """
    return max(minimum, -(-new_tokens // world_size) + 2)


def prefill_capacity(local_lens: Sequence[int], headroom: int) -> int:
    """Slots per layer for a prefill whose ranks store ``local_lens`` tokens."""
    return capacity_for((0,) * len(local_lens), local_lens, 0, headroom)


def empty_capacity(new_tokens: int, headroom: int) -> int:
    """Slots per layer for an empty cache that a step of ``new_tokens`` too few to shard starts:
    room for all of them on any rank, plus headroom."""
    return new_tokens + headroom


class SlotRoom:
    """The host buffer a cache's slot indices are appended into (:meth:`RingCacheState.extended`),
    and a mirror of it on one device, for the steps that read the indices there every step (a
    padding mask read at the slots, a sliding window). The mirror copies only the entries
    written since it was last read -- a decode step's one, as a fill -- not every index every
    step: pinning and copying a long shard's indices was most of a padded step's host time
    (docs/performance.md, Padded batches).

    Like the cache's K/V slots, the entries past a state's view belong to whichever step extends
    that state next: a write there (:meth:`written`) makes the mirror's copy of them stale.
    """

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.mirror: torch.Tensor | None = None
        self.synced = 0  # the host's first entries that the mirror holds

    def written(self, start: int) -> None:
        """The host's entries from ``start`` on were (re)written."""
        self.synced = min(self.synced, start)

    def on(self, device: torch.device, n: int) -> torch.Tensor:
        """The host's first ``n`` entries on ``device``, copying what the mirror lacks; to a GPU
        asynchronously (through pinned memory, or a fill for one entry), so no step waits."""
        if self.mirror is None or self.mirror.device != device:
            self.mirror, self.synced = torch.empty_like(self.host, device=device), 0
        if self.synced < n:
            new = self.host[self.synced : n]
            if new.numel() == 1:
                self.mirror[self.synced].fill_(int(new))
            else:
                pinned = new.pin_memory() if device.type == "cuda" else new
                self.mirror[self.synced : n].copy_(pinned, non_blocking=True)
            self.synced = n
        return self.mirror[:n]


@dataclass(frozen=True)
class RingCacheState:
    """Global view of the sharded cache, identical on every rank (but slot_index).

    seq_len: tokens cached in total; fills[r]: tokens rank r holds;
    slot_index: this rank's slots' global sequence indices (for masks), on
    the host so that an unmasked decode step copies nothing to the device
    (a masked one copies it without a host sync: :meth:`slot_index_on`);
    capacity: slots per layer preallocated on every rank;
    cache_id: which prefill made the cache (with capacity, it names the
    buffers' allocation); max_position: the largest position id cached (the
    RoPE tables cover it), known without reading the device; slot_room: the
    buffer whose first entries ``slot_index`` views, with room to append in
    place (:meth:`extended`), and its device mirror (:class:`SlotRoom`).
    """

    seq_len: int
    fills: tuple[int, ...]
    slot_index: torch.Tensor
    capacity: int
    cache_id: int
    max_position: int = -1
    slot_room: SlotRoom | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def owned(owners: list[int], rank: int) -> slice | list[int]:
        """The step's new tokens that ``rank`` stores: a slice when evenly spaced
        (always for one token, and once shards are balanced), so indexing is a
        view and nothing is copied to the device."""
        mine = [i for i, r in enumerate(owners) if r == rank]
        if not mine:
            return slice(0, 0)
        step = mine[1] - mine[0] if len(mine) > 1 else 1
        if mine == list(range(mine[0], mine[-1] + 1, step)):
            return slice(mine[0], mine[-1] + 1, step)
        return mine

    def slot_index_on(self, device: torch.device, start: int = 0) -> torch.Tensor:
        """``slot_index[start:]`` on ``device``: from the room's mirror (:class:`SlotRoom`) once a
        step has appended to the index; before that (a prefill's index), copied whole. To a GPU
        through pinned memory and asynchronously: a copy from pageable memory would make the host
        wait for every kernel queued before it, and a masked decode step reads this every step."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        room = self.slot_room
        if room is not None and room.host.data_ptr() == self.slot_index.data_ptr():
            return room.on(device, self.slot_index.numel())[start:]
        index = self.slot_index[start:]
        if device.type == "cuda":
            return index.pin_memory().to(device, non_blocking=True)
        return index.to(device)

    def place(self, n_new: int) -> list[int]:
        """Owner rank of each of ``n_new`` appended tokens: the least-filled rank,
        lowest rank on ties, so shards stay within one token of each other."""
        fills = list(self.fills)
        owners = []
        for _ in range(n_new):
            r = min(range(len(fills)), key=lambda i: (fills[i], i))
            owners.append(r)
            fills[r] += 1
        return owners

    def extended(self, rank: int, new_indices: Sequence[Sequence[int]], headroom: int) -> RingCacheState:
        """The state after appending tokens: ``new_indices[r]`` are the global
        indices (counted from 0 = first cached token) that rank r appends, in order."""
        fills = tuple(f + len(new) for f, new in zip(self.fills, new_indices))
        capacity = capacity_for(self.fills, fills, self.capacity, headroom)
        slot_index, room = self.slot_index, self.slot_room
        if new := new_indices[rank]:
            slot_index, room = self._appended(list(new), capacity)
        return replace(
            self,
            seq_len=self.seq_len + sum(len(new) for new in new_indices),
            fills=fills,
            slot_index=slot_index,
            capacity=capacity,
            slot_room=room,
        )

    def _appended(self, new: list[int], capacity: int) -> tuple[torch.Tensor, SlotRoom]:
        """``slot_index`` with ``new`` appended, and the room whose buffer it views. A decode step appends one
        index: written in place past the view, the step costs the host the same at any length (a
        concatenation would copy every index, every step). The buffer is the cache's: like its K/V
        slots, the entries past this state's view belong to whichever step extends it next."""
        index, room = self.slot_index, self.slot_room
        n, total = index.numel(), index.numel() + len(new)
        if room is None or room.host.numel() < total or room.host.data_ptr() != index.data_ptr():
            room = SlotRoom(index.new_empty(max(capacity, 2 * total)))  # doubling: appends cost O(1) amortised
            room.host[:n] = index
        room.host[n:total] = torch.tensor(new, dtype=room.host.dtype)
        room.written(n)
        return room.host[:total], room

    def advanced(self, rank: int, owners: list[int], headroom: int) -> RingCacheState:
        """The state after appending tokens placed one by one (``owners[i]`` stores token i)."""
        return self.extended(rank, self.per_rank(owners), headroom)

    def per_rank(self, owners: list[int]) -> list[list[int]]:
        """The global indices each rank appends when ``owners[i]`` stores new token i."""
        return [[self.seq_len + i for i, r in enumerate(owners) if r == dst] for dst in range(len(self.fills))]


def allocate_layer(tokens: torch.Tensor, capacity: int) -> torch.Tensor:
    """A [b, capacity, kvh, d] cache buffer holding ``tokens`` [b, L, kvh, d] in
    its first L slots and zeros after them.

    Tokens along dim 1 with kv-heads inside is the layout fmsring's decode
    kernel and the fused attention kernels read directly, and prefill's K/V
    are stored without a transpose. The unused slots are zeroed, not left as
    they were: a masked read of them must give 0 x weight 0, which NaN
    garbage would not.
    """
    b, n, kvh, d = tokens.shape
    buf = tokens.new_empty(b, capacity, kvh, d)
    buf[:, :n].copy_(tokens)
    buf[:, n:].zero_()
    return buf


class RingCache(list):
    """FMS's list of per-layer (K, V) buffers, carrying the ring's ``state``.

    Buffers are [b, capacity, kvh, d]; the first ``state.fills[rank]`` slots
    are valid. A step writes past the valid slots in place and returns a new
    ``RingCache`` over the same buffers, so the cache it extended stays
    usable from its own state (the next call overwrites the same slots) --
    unless the step had to grow the buffers: the grown cache then takes them
    over and the old one is ``consumed`` (using it raises), so no cache ever
    holds buffers its state does not describe. A cache holding Mamba2 layers'
    states (``SSMCacheUnit``, the same on every rank: :mod:`fmsring.ssm`) is
    consumed by every step, which advances those states in place.
    """

    def __init__(self, layers, state: RingCacheState):
        super().__init__(layers)
        self.state = state
        self.consumed = False

    @classmethod
    def empty(
        cls,
        layers: int,
        like: torch.Tensor,
        shape: tuple[int, int, int, int],
        v_dim: int,
        world_size: int,
        states: Sequence[object | None] = (),
    ):
        """A cache holding no token yet: ``layers`` pairs of zeroed K [b, capacity, kvh, d] (``shape``)
        and V [b, capacity, kvh, ``v_dim``], dtype and device of ``like``; with ``states`` (Mamba2
        layers' zero states, in the model's layer order, None at each attention layer), those
        with the pairs in the attention layers' places."""
        b, capacity, kvh, d = shape
        pairs = [(like.new_zeros(b, capacity, kvh, d), like.new_zeros(b, capacity, kvh, v_dim)) for _ in range(layers)]
        if states:
            attention = iter(pairs)
            pairs = [next(attention) if s is None else s for s in states]
        state = RingCacheState(0, (0,) * world_size, torch.empty(0, dtype=torch.long), capacity, new_cache_id())
        return cls(pairs, state)

    @classmethod
    def prefilled(cls, layers: list, plan: ShardPlan, rank: int, capacity: int, max_position: int) -> RingCache:
        """The cache a ring prefill of ``plan`` wrote (``capacity`` slots per layer, see :func:`prefill_capacity`)."""
        state = RingCacheState(
            plan.seq_len, tuple(plan.local_lens), plan.index_tensor(rank), capacity, new_cache_id(), max_position
        )
        return cls(layers, state)

    @property
    def first_keys(self) -> torch.Tensor:
        """The first attention layer's K buffer (a Mamba2 layer's state holds none)."""
        return next(layer[0] for layer in self if isinstance(layer, tuple))

    def check_usable(self) -> None:
        if self.consumed:
            raise RuntimeError(
                "this RingCache was grown into the cache a later step returned, which holds its tokens "
                "now (a cache with Mamba2 layers is at every step: their states advance in place): pass "
                "that one (each step's returned cache replaces the one it was given)"
            )

    def extend(self, rank: int, new_indices: Sequence[Sequence[int]], headroom: int, max_position: int) -> RingCache:
        """The cache after this step appends ``new_indices[r]`` (global indices) on rank r,
        with the largest position now ``max_position``; its buffers grown if they must."""
        state = replace(self.state.extended(rank, new_indices, headroom), max_position=max_position)
        recurrent = not all(isinstance(layer, tuple) for layer in self)
        if state.capacity == self.state.capacity and not recurrent:
            return RingCache(self, state)
        fill = self.state.fills[rank]
        grown = RingCache([], state)
        for i, layer in enumerate(self):  # one layer at a time: at most one extra layer is held
            # a Mamba2 layer's state (fmsring.ssm) is kept: the step advances it in place
            keep = not isinstance(layer, tuple) or state.capacity == self.state.capacity
            grown.append(layer if keep else tuple(allocate_layer(t[:, :fill], state.capacity) for t in layer))
            self[i] = None
        self.clear()
        self.consumed = True
        return grown

    def advance(self, rank: int, owners: list[int], headroom: int, max_position: int) -> RingCache:
        """:meth:`extend` by tokens placed one by one (``owners[i]`` stores token i)."""
        return self.extend(rank, self.state.per_rank(owners), headroom, max_position)
