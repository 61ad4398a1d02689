"""Run a function on every rank of a real gloo process group.

No mocks: each rank is its own Python process, as under torchrun. Importing torch, FMS and
transformers costs an interpreter seconds, so ranks are forked from a server that imported them
once (multiprocessing's forkserver, started from the test process's environment on first use:
a rank inherits its imports and nothing else), and the suite makes hundreds of calls, so the
group of each world size is started on first use and kept for the session: a call ships
``(fn, args)`` to the ranks and collects what each returned.

Each call starts from the state a freshly started rank has: the parent's environment, seeded
RNGs (from the test's seed, alike on every rank), one thread, dynamo's caches cleared, no process
group but the world's, and the globals of the ``fmsring`` and ``tests`` modules loaded when the
call began (fn's own included) put back after it, whether rebound or changed in place (a test
swaps a function in, adds to ``fusion.FUSE_DEVICES``). A call that raises on a
rank, kills a rank or outlives its timeout discards the group, so a broken case cannot leave a
collective half done for the next one; the next call starts a fresh group.
"""

from __future__ import annotations

import atexit
import copy
import io
import os
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# ranks are forked from one server that imported this module and fmsring (torch, FMS, transformers)
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__, "fmsring"])
# what a group gets to start and connect: the first one also starts the server, which imports torch
START_TIMEOUT_S = 300
# how long the other ranks get to report once one has failed (they may sit in a collective the failed rank left)
FAILED_GRACE_S = 3
_SHUTDOWN = b""
# ranks kept waiting at once (each holds ~0.5 GB): worlds 1-4 stay; world 6 sends the least recently used home
MAX_KEPT_RANKS = 10
# module globals a call may change and the next call must not see (tests swap functions in, add to sets)
_RESTORED_PACKAGES = ("fmsring", "tests")
# gloo's TCP set-up of a group between ranks on one host fails now and then under load ("Connection
# closed by peer" in connectFullMesh): a few times in a thousand `new_group`s with three 2-rank groups
# connecting at once on two cores, with no fmsring code in the loop. Not a test's failure: run_ranks
# gives such a call one more try on a fresh group.
GLOO_CONNECT_FAILED = "Gloo connectFullMesh failed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    """torch.save, not the pipe's pickler: tensors travel by value, not as shared-memory handles."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


# ---------------------------------------------------------------- on a rank


class _ModuleGlobals:
    """The globals of the loaded ``fmsring``/``tests`` modules: which object each name holds and,
    for plain sets, dicts and lists, what they contain (a test may add to one in place)."""

    def __init__(self) -> None:
        self.modules = []
        for name, module in list(sys.modules.items()):
            if module is None or name.split(".")[0] not in _RESTORED_PACKAGES:
                continue
            names = {k: v for k, v in vars(module).items() if not k.startswith("__")}
            contents = {k: copy.copy(v) for k, v in names.items() if type(v) in (set, dict, list)}
            self.modules.append((module, names, contents))

    def restore(self) -> None:
        for module, names, contents in self.modules:
            now = vars(module)
            for k, v in names.items():
                if now.get(k) is not v:
                    setattr(module, k, v)
            for k, v in contents.items():
                held = names[k]
                held.clear()
                held.update(v) if isinstance(held, (set, dict)) else held.extend(v)


def _destroy_subgroups() -> None:
    """Groups a call made (ring_tp's, a DeviceMesh's) go with it, as they went with its processes."""
    world_group = dist.GroupMember.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not world_group:
            dist.destroy_process_group(group)


def _run_call(rank: int, world: int, message: bytes, rank_env: dict[str, str]) -> tuple[dict, bool]:
    """The call's reply, and whether this rank is fit for the next call."""
    cwd = os.getcwd()
    saved = None
    try:
        call = _loads(message)  # imports fn's module on its first call: as imported is what to go back to
        saved = _ModuleGlobals()
        os.environ.clear()
        os.environ.update({**call["env"], **rank_env})
        random.seed(call["seed"])
        torch.manual_seed(call["seed"])
        torch.set_num_threads(1)
        reply = {"ok": call["fn"](rank, world, *call["args"])}
    except BaseException:
        reply = {"error": traceback.format_exc()}
    try:
        if saved is not None:
            saved.restore()
        os.chdir(cwd)
        torch.set_grad_enabled(True)
        torch.set_default_dtype(torch.float32)
        if "torch._dynamo" in sys.modules:  # a fresh process has compiled nothing; reset is cheap when nothing was
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
        _destroy_subgroups()
    except BaseException:
        traceback.print_exc()
        return reply, False
    return reply, dist.is_initialized()  # a call may have destroyed the world's group itself


def _rank_main(rank: int, world: int, port: int, conn: Connection) -> None:
    """A rank of the group: join it, then run each call sent until told to stop or the parent is gone."""
    inherited = dict(os.environ)
    rank_env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    rank_env["LOCAL_RANK"] = str(rank)
    os.environ.update(rank_env)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        import fmsring  # noqa: F401 -- imported once here, not timed against the first call's timeout
    except BaseException:
        conn.send_bytes(_dumps({"error": traceback.format_exc()}))
        return
    # what importing and joining added to the environment stays; the rest follows the parent's, call by call
    rank_env = {**{k: v for k, v in os.environ.items() if inherited.get(k) != v}, **rank_env}
    conn.send_bytes(_dumps({"ok": "ready"}))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            break
        if message == _SHUTDOWN:
            break
        reply, fit = _run_call(rank, world, message, rank_env)
        try:
            data = _dumps({**reply, "fit": fit})
        except Exception:  # noqa: BLE001 -- a return value that does not pickle is the test's error
            data = _dumps({"error": traceback.format_exc(), "fit": fit})
        conn.send_bytes(data)
        if not fit:
            return
    dist.destroy_process_group()


# ---------------------------------------------------------------- in the test process


class _Group:
    """``world`` rank processes joined by one gloo group, waiting for calls."""

    def __init__(self, world: int) -> None:
        port = free_port()
        self.world = world
        self.procs, self.conns = [], []
        for rank in range(world):
            ours, theirs = _CONTEXT.Pipe()
            proc = _CONTEXT.Process(target=_rank_main, args=(rank, world, port, theirs), name=f"rank {rank} of {world}")
            proc.start()
            theirs.close()  # the rank holds the other end: its death reads here as end of file
            self.procs.append(proc)
            self.conns.append(ours)
        try:
            self._collect(START_TIMEOUT_S, what="start")
        except BaseException:
            self.kill()
            raise

    def call(self, fn: Callable, args: tuple, timeout: float) -> list[Any]:
        message = _dumps({"fn": fn, "args": args, "env": dict(os.environ), "seed": torch.initial_seed()})
        for conn in self.conns:
            conn.send_bytes(message)
        return self._collect(timeout, what="finish")

    def _collect(self, timeout: float, what: str) -> list[Any]:
        """Each rank's reply; the first failure raised with its traceback once the others replied or gave up."""
        replies: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < self.world:
            pending = {self.conns[r]: r for r in range(self.world) if r not in replies}
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                rank = pending[conn]
                try:
                    replies[rank] = _loads(conn.recv_bytes())
                except (EOFError, OSError):
                    self.procs[rank].join(5)
                    replies[rank] = {"error": f"died with exit code {self.procs[rank].exitcode}"}
                if "error" in replies[rank]:
                    deadline = min(deadline, time.monotonic() + FAILED_GRACE_S)
        failed = sorted(r for r, reply in replies.items() if "error" in reply)
        if failed:
            others = f" (ranks {failed[1:]} failed too)" if len(failed) > 1 else ""
            raise RuntimeError(f"rank {failed[0]} failed{others}:\n{replies[failed[0]]['error']}")
        if len(replies) < self.world:
            hung = [r for r in range(self.world) if r not in replies]
            raise TimeoutError(f"ranks {hung} did not {what} in {timeout}s")
        self.fit = all(reply.get("fit", True) for reply in replies.values())
        return [replies[r]["ok"] for r in range(self.world)]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(_SHUTDOWN)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join()
        for conn in self.conns:
            conn.close()


_GROUPS: dict[int, _Group] = {}  # by world size, least recently used first


@atexit.register
def shutdown() -> None:
    """Let every kept group leave its process group and exit."""
    while _GROUPS:
        _GROUPS.popitem()[1].close()


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 600) -> list[Any]:
    """fn(rank, world, *args) on ``world`` processes; each rank's return value.

    A rank that raises re-raises here with its traceback; a hang is killed. ``fn`` and ``args``
    travel pickled, so ``fn`` is a module-level function. A call that failed only because gloo
    could not connect a group's ranks runs once more, on a fresh group (:data:`GLOO_CONNECT_FAILED`).
    """
    try:
        return _run_on_group(world, fn, args, timeout)
    except RuntimeError as e:
        if GLOO_CONNECT_FAILED not in str(e):
            raise
        print(f"[tests.distributed] {e}\n[tests.distributed] gloo failed to connect {world} ranks: once more, "
              "on a fresh group", file=sys.stderr)  # fmt: skip
    return _run_on_group(world, fn, args, timeout)


def _run_on_group(world: int, fn: Callable, args: tuple, timeout: float) -> list[Any]:
    group = _GROUPS.pop(world, None)
    if group is None:
        while _GROUPS and sum(_GROUPS) + world > MAX_KEPT_RANKS:
            _GROUPS.pop(next(iter(_GROUPS))).close()
        group = _Group(world)
    try:
        results = group.call(fn, args, timeout)
    except BaseException:  # a failure, a timeout, or pytest's own timeout or Ctrl-C mid-call
        group.kill()
        raise
    if group.fit:
        _GROUPS[world] = group
    else:
        group.close()
    return results
