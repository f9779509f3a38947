"""The manager's own channel between the ranks of a torch.distributed job.

Every collective step of a multi-rank ``CheckpointManager`` (a save, a
restore's choice, a listing, the preemption agreement) talks through the
job's distributed key-value store (the c10d store that
``init_process_group`` set up, under a prefix of its own), never through the
training's process group: nothing here is a collective that could queue
behind, or deadlock against, the training's all_reduces, sync or async.

An ``Op`` is one exchange. Each rank ``post``s its word under the op's
number; a rank that fails says so with ``fail``, which every waiter sees at
once. ``gather`` waits for the words of the given ranks until the op's
deadline (``collective_timeout`` after the op began) and raises
``CollectiveError`` naming the ranks that failed, or that said nothing in
time (died, hung, or not at the same point of the program). Waiting polls
two counters, so its cost does not grow with the world size; no thread is
involved.

Keys do not pile up: a word read by one rank is deleted by it, a word read
by all others is deleted by the last reader.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from ..errors import CheckpointError

_POLL_FIRST, _POLL_MAX = 0.0005, 0.02   # seconds between polls: doubling from the first to the most


class CollectiveError(CheckpointError):
    """A collective step of a multi-rank manager failed on some rank, or some rank never came."""

    def __init__(self, message: str, uri: str | None = None, ranks: tuple[int, ...] = ()):
        super().__init__(message, uri)
        self.ranks = ranks


def ranks_text(ranks) -> str:
    ranks = sorted(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def delete_keys(store: Any, keys: list[str]) -> None:
    """Delete ``keys`` from ``store``; a key left behind is harmless, so nothing is raised."""
    for k in keys:
        try:
            store.delete_key(k)
        except Exception:  # noqa: BLE001
            pass


class Room:
    """The channel of one manager: the same name on every rank (the directory, and how many
    managers of it this process made before)."""

    def __init__(self, store: Any, rank: int, world: int, name: str, timeout: float, uri: str):
        import torch.distributed as dist

        digest = hashlib.sha1(name.encode()).hexdigest()[:16]
        self.store: Any = dist.PrefixStore(f"ckptstore/{digest}/", store)
        self.rank, self.world, self.timeout, self.uri = rank, world, timeout, uri
        self.seq = 0
        self._background: Any = None

    def release(self) -> None:
        self.store = self._background = None

    def op(self, what: str, timeout: float | None = None, background: bool = False) -> "Op":
        """The next exchange (every rank must open the same ones in the same order).
        ``background``: run by another thread than the caller's (its own connection)."""
        self.seq += 1
        if background and self._background is None:
            self._background = self.store.clone()
        return Op(self, self.seq, what, self.timeout if timeout is None else timeout,
                  self._background if background else None)


class Op:
    def __init__(self, room: Room, seq: int, what: str, timeout: float, store: Any = None):
        self.room, self.seq, self.what = room, seq, what
        self.store = room.store if store is None else store
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout

    @property
    def rank(self) -> int:
        return self.room.rank

    def _key(self, *parts: Any) -> str:
        return "/".join(map(str, (self.seq, *parts)))

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except CheckpointError:
            raise
        except Exception as e:    # noqa: BLE001 - a store that went away is a rank that went away
            raise CollectiveError(
                f"{self.room.uri}: {self.what}: lost contact with the job's distributed store, which rank 0 "
                f"hosts ({type(e).__name__}: {e}); rank 0 died or the job is ending", self.room.uri,
                (0,)) from None

    # -- saying

    def post(self, name: str, value: Any) -> None:
        store = self.store
        self._call(store.set, self._key(name, self.rank), json.dumps(value, separators=(",", ":")))
        self._call(store.add, self._key(name, "n"), 1)

    def fail(self, error: BaseException) -> None:
        """Tell every rank this one failed (never raises: the error itself matters more)."""
        text = f"{type(error).__name__}: {error}"[:2000]
        store = self.store
        try:
            store.set(self._key("err", self.rank), text)
            store.add(self._key("err", "n"), 1)
        except Exception:  # noqa: BLE001
            pass

    # -- hearing

    def gather(self, name: str, ranks=None, *, deadline: float | None = None, readers: int = 1,
               doing: str = "answer", behind: tuple[str, str] | None = None) -> dict[int, Any]:
        """{rank: value} of ``name`` from ``ranks`` (all by default), once all have posted it.

        Raises CollectiveError as soon as any rank has failed this op, or at the deadline
        naming the ranks not heard from. ``readers``: how many ranks read these words (the last
        one deletes them). ``behind``: (name, doing) of the earlier word every rank posted
        before ``ranks`` could post this one: at the deadline, ranks that never posted that
        one are named instead (the coordinator waits for them, not the other way round).
        """
        room = self.room
        store = self.store
        ranks = list(range(room.world)) if ranks is None else list(ranks)
        deadline = self.deadline if deadline is None else deadline
        pause = _POLL_FIRST
        count_key = self._key(name, "n")
        while True:
            if self._call(store.add, self._key("err", "n"), 0):
                raise self.failure()
            if self._call(store.add, count_key, 0) >= len(ranks):
                break
            if time.monotonic() > deadline:
                missing = [r for r in ranks if not self._call(store.check, [self._key(name, r)])]
                if missing and behind is not None:
                    earlier = [r for r in range(room.world) if not self._call(store.check, [self._key(behind[0], r)])]
                    if earlier:
                        missing, doing = earlier, behind[1]
                if missing:
                    raise CollectiveError(
                        f"{room.uri}: {self.what}: {ranks_text(missing)} did not {doing} within "
                        f"collective_timeout={self.timeout:g} s (died, hung, or not at the same call of the "
                        f"manager){'; nothing was committed' if self.what.startswith('saving') else ''}",
                        room.uri, tuple(missing))
                break
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)
        keys = [self._key(name, r) for r in ranks]
        out = {r: json.loads(self._call(store.get, k)) for r, k in zip(ranks, keys)}
        if readers == 0:
            pass                     # kept until ``forget``
        elif readers == 1:
            self._delete(keys + [count_key])
        elif self._call(store.add, self._key(name, "read"), 1) == readers:
            self._delete(keys + [count_key, self._key(name, "read")])
        return out

    def forget(self, names: list[str]) -> None:
        """Delete every rank's words ``names`` (those gathered with ``readers=0``)."""
        self._delete([self._key(n, r) for n in names for r in [*range(self.room.world), "n"]])

    def _delete(self, keys: list[str]) -> None:
        delete_keys(self.store, keys)

    def failed(self) -> bool:
        return bool(self._call(self.store.add, self._key("err", "n"), 0))

    def relay(self, error: CollectiveError) -> None:
        """Rank 0: tell every rank its own finding (which ranks never came), in its words."""
        try:
            self.store.set(self._key("relay"), json.dumps({"message": str(error), "ranks": list(error.ranks)}))
            self.store.add(self._key("err", "n"), 1)
        except Exception:  # noqa: BLE001 - the error itself matters more
            pass

    def linger(self, gone, wait: float) -> None:
        """Rank 0, after a failure: give the ranks not in ``gone`` up to ``wait`` seconds to read
        it. Rank 0 hosts the store, and a program that ends on the error takes the store with it."""
        alive = self.room.world - 1 - len(set(gone) - {self.rank})
        until = time.monotonic() + wait
        try:
            while self.store.add(self._key("err", "read"), 0) < alive and time.monotonic() < until:
                time.sleep(0.01)
        except Exception:  # noqa: BLE001
            pass

    def failure(self) -> CollectiveError:
        """The op's failure as every rank raises it (the ranks that said they failed, or rank 0's relay)."""
        store = self.store
        try:
            store.add(self._key("err", "read"), 1)
        except Exception:  # noqa: BLE001
            pass
        if self._call(store.check, [self._key("relay")]):
            said = json.loads(self._call(store.get, self._key("relay")))
            return CollectiveError(said["message"], self.room.uri, tuple(said["ranks"]))
        said = {}
        for r in range(self.room.world):
            k = self._key("err", r)
            if self._call(store.check, [k]):
                said[r] = self._call(store.get, k).decode(errors="replace")
        return self.error_of(said)

    def failed_here(self, error: BaseException) -> CollectiveError:
        """This rank's own failure, in the words every other rank gets."""
        return self.error_of({self.rank: f"{type(error).__name__}: {error}"[:2000]})

    def error_of(self, said: dict[int, str]) -> CollectiveError:
        lines = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(said.items()))
        after = "; nothing was committed" if self.what.startswith("saving") else ""
        return CollectiveError(f"{self.room.uri}: {self.what} failed on {ranks_text(said)}: {lines}{after}",
                               self.room.uri, tuple(sorted(said)))

    # -- the common shapes

    def share(self, value: Any = None, *, root: int = 0) -> Any:
        """``root``'s value on every rank (only ``root`` passes one)."""
        if self.rank == root:
            self.post("share", value)
            self._until_read("share", [root], self.room.world - 1)
            return value
        out = self.gather("share", [root], readers=0)[root]
        self._call(self.store.add, self._key("share", "read"), 1)
        return out

    def everyone(self, value: Any) -> dict[int, Any]:
        """Every rank's value on every rank."""
        self.post("all", value)
        out = self.gather("all", readers=0)
        self._call(self.store.add, self._key("all", "read"), 1)
        if self.rank == 0:
            self._until_read("all", range(self.room.world), self.room.world)
        return out

    def _until_read(self, name: str, ranks, readers: int) -> None:
        """Rank 0 (or the root): wait until ``readers`` ranks have read ``name``, then delete it.
        Rank 0 hosts the store: returning first would let a program that ends right after this
        call take the store away from ranks still reading it. A rank that never reads (it died)
        holds this up to the op's deadline, and no longer."""
        pause = _POLL_FIRST
        key = self._key(name, "read")
        while self._call(self.store.add, key, 0) < readers and time.monotonic() < self.deadline:
            if self.failed():
                break
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)
        self._delete([self._key(name, r) for r in ranks] + [self._key(name, "n"), key])
