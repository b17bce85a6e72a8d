"""One island of an elastic run: the JAX trainer's side of intellect_jax/elastic.

Each island is its own JAX program (its mesh has ``mesh.islands = 1``; sync.ElasticSync drives this module). At
every outer-step boundary it sends its pseudo-gradient through the TCP ring (int8/int4 codes made on its devices, or
a flat fp32 vector; fp32 accumulation at each hop, verbatim all-gather), so every island receives the same bytes and
applies the same outer update; then the islands vote on a hash of the new global state and a loser re-syncs from a
peer. A new or restarted island pulls the global params and outer optimizer state live from a peer while the others
train.

The state voted on and served to joiners is a host snapshot (ElasticSync.snapshot_arrays). With streaming fragments it
is named per fragment, and after fragment p's sync only p's part is copied and hashed again (the others keep their
arrays and digests): a fragment's global params and outer state change only at its own sync, so this hash equals a
full copy's (tested), at 1/P of the copy and hashing per sync.

Limitation: an island is one JAX process (single-host islands); multi-host islands would need process 0 to talk to
the ring and broadcast the mean to the island's other hosts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from intellect_jax.codecs import Packed
from intellect_jax.config import ElasticConfig
from intellect_jax.elastic.client import IslandClient, JoinInfo, StaleStep
from intellect_jax.elastic.recovery import State, array_digests, params_hash

log = logging.getLogger("intellect_jax.island")


class LocalState(Protocol):
    """What an island's protocol needs of the state it trains: sync.ElasticSync for the JAX trainer, a numpy
    stand-in in tests/sim_island.py (so the end-to-end tests and soaks drive this module, not a copy of it)."""

    device_codes: bool  # payloads are Packed codes, and the mean comes back packed
    resumed_epoch: dict | None  # the epoch that committed a restored checkpoint's state, if known

    def position(self) -> tuple[int, int]:
        """(completed outer steps, inner step) of the global state."""

    def snapshot_later(self, fragment: int | None = None) -> Callable[[], dict[str, np.ndarray]]:
        """The global state as named host arrays: dispatched now, fetched by calling the result (maybe in a thread);
        with `fragment`, only that fragment's part."""

    def install_snapshot(self, arrays: dict[str, np.ndarray], outer_step: int, step: int) -> None:
        """Loads a peer's global state (snapshot arrays); every local island restarts from it."""

    def pseudo_gradient_payload(self) -> tuple[Any, float | None, Any]:
        """(what goes into the ring: an fp32 vector or Packed codes, its norm or None, a residual for apply_mean)."""

    def apply_mean(self, delta: Any, residual: Any) -> dict:
        """Applies the ring's mean (the outer step); returns metrics."""


class ElasticIsland:
    """The cross-island protocol of one island (join, reduce, hash vote, re-sync from a peer) around its LocalState.
    Imports no jax: all device work is the LocalState's."""

    def __init__(self, local: LocalState, elastic: ElasticConfig, run_id: str, compression: str, block_size: int):
        self.local = local
        self._lock = threading.Lock()
        self._snapshot: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None
        self._vote: Vote | None = None  # streaming: the hash vote running in the background
        self.client = IslandClient(elastic, run_id, self._provide, compression=compression, block_size=block_size)
        self.refresh_snapshot()

    # -- state as the elastic layer sees it: global params + outer optimizer state, as named numpy arrays ----------

    def refresh_snapshot(self) -> str:
        """Copies the global state to the host (served to joiners from a background thread); returns its hash."""
        return self._publish(*self._host_copy())

    def _host_copy(self, fragment: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any], dict]:
        """(arrays, meta, digests still valid): the global state's host copy. After a streaming fragment's sync
        (`fragment` given) only that fragment's part is copied; the others are the current snapshot's arrays (never
        mutated) and keep their digests, so only 1/P of the state is hashed again."""
        fetch, meta = self._host_copy_later(fragment)
        arrays, known = self._merge(fetch(), fragment)
        return arrays, meta, known

    def _host_copy_later(self, fragment: int | None) -> tuple[Callable[[], dict[str, np.ndarray]], dict[str, Any]]:
        """The host copy's device half, dispatched now (ElasticSync.snapshot_later), and its meta."""
        outer_step, step = self.local.position()
        return self.local.snapshot_later(fragment), {"outer_step": outer_step, "step": step}

    def _merge(self, arrays: dict[str, np.ndarray], fragment: int | None) -> tuple[dict[str, np.ndarray], dict]:
        """A fragment's fresh arrays with the current snapshot's others, and those others' digests."""
        if fragment is None:
            return arrays, {}
        old, old_meta = self._provide()
        return old | arrays, {k: d for k, d in old_meta["array_digests"].items() if k not in arrays}

    def _publish(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], known: dict | None = None) -> str:
        """Hashes a host copy (the arrays whose digest is not `known`) and makes it the snapshot served to joiners;
        returns its hash."""
        known = known or {}
        # kept for the state manifest: hashed once per sync
        meta["array_digests"] = known | array_digests({k: a for k, a in arrays.items() if k not in known})
        meta["params_hash"] = params_hash(arrays, meta["array_digests"])
        with self._lock:
            self._snapshot = (arrays, meta)
        return meta["params_hash"]

    def snapshot_hash(self) -> str:
        return self._provide()[1]["params_hash"]

    def _provide(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        with self._lock:
            assert self._snapshot is not None
            return self._snapshot

    def install(self, state: State) -> None:
        """Loads a peer's global state; every local inner state restarts from it (fresh AdamW moments)."""
        self._join_vote()  # the peer's state replaces what was voted on
        self.local.install_snapshot(state.arrays, int(state.meta["outer_step"]), int(state.meta.get("step", 0)))
        got = self.refresh_snapshot()
        if got != state.meta["params_hash"]:
            raise RuntimeError(f"installed state hashes to {got}, the peer said {state.meta['params_hash']}")
        log.info("installed the global state of outer step %d from a peer (hash %s)", state.meta["outer_step"],
                 got[:12])

    # -- the run ---------------------------------------------------------------------------------------------------

    def join(self) -> JoinInfo:
        arrays, meta = self._provide()
        info = self.client.join(meta["outer_step"], meta["params_hash"], self.local.resumed_epoch)
        log.info("joined the run (run at outer step %s; this island at %d)%s", info.run_step, meta["outer_step"],
                 ": fetching the state from a live peer" if info.needs_state else "")
        if info.needs_state:
            self.install(self.client.fetch_state())
        return info

    def sync(self) -> tuple[dict, str]:
        """The outer step over TCP. Returns (metrics, hash of the committed global state)."""
        s = self.local.position()[0]
        payload, norm, residual = self.local.pseudo_gradient_payload()
        try:
            delta = self.client.all_reduce_mean(s, payload, norm, packed_out=self.local.device_codes)
        except StaleStep as e:
            return self.resync(f"outer step {s} completed without this island ({e})")
        return self.settle(s, self.local.apply_mean(delta, residual))

    def start_reduce(self, outer_step: int, payload: "Payload", packed_out: bool = False) -> "Reduce":
        """The ring reduce of `payload` for this outer step in a background thread (streaming: the islands go on).
        The hash vote still running from the last sync goes with it: the reduce thread takes its verdict first and
        sends nothing if this island lost it (a minority state never feeds a reduce), so the training thread never
        waits for the verdict at the launch; it reads it from the reduce (`Reduce.verdict`)."""
        vote, self._vote = self._vote, None
        return Reduce(self.client, outer_step, payload, packed_out,
                      vote=None if vote is None else (lambda: self._verdict_of(vote)))

    def settle(self, outer_step: int, metrics: dict, wait: bool = True,
               fragment: int | None = None) -> tuple[dict, str | None]:
        """After the mean of `outer_step` was applied: the hash vote; a loser re-syncs from a peer. Returns the
        metrics and the hash of the new global state. ``wait=False`` (streaming): only the host copy of the state
        is dispatched here (a device copy); bringing it to the host, hashing it and the vote (a round trip to the
        coordinator and the wait for the other islands' votes) run in a background thread while the inner steps go
        on, the hash is None, and `settle_pending` (or the next reduce's thread) takes the verdict and the hash."""
        if not wait:
            if self._vote is not None:
                raise RuntimeError(f"outer step {self._vote.outer_step}'s hash vote was never judged (settle_pending)")
            # streaming: only the synced fragment's part
            fetch, meta = self._host_copy_later(fragment)
            out: list = []

            def vote() -> None:
                try:
                    arrays, known = self._merge(fetch(), fragment)
                    h = self._publish(arrays, meta, known)
                    out.append((h, self.client.commit(outer_step, h)))
                except Exception as e:  # noqa: BLE001 - re-raised where the verdict is taken
                    out.append((None, e))

            t = threading.Thread(target=vote, name=f"vote-{outer_step}", daemon=True)
            t.start()
            self._vote = Vote(t, outer_step, out)
            return metrics, None
        h = self.refresh_snapshot()
        if not self.client.commit(outer_step, h):
            self._lost(outer_step)
            return metrics, self.snapshot_hash()
        return metrics, h

    def settle_pending(self, verdict: "Verdict | None" = None) -> tuple[bool, str | None]:
        """The verdict of a vote running in the background (at once if there is none), or `verdict` already taken
        by a reduce thread: (True if this island was in the minority and re-synced from a peer, its state now the
        peer's; the hash it voted, None if no vote)."""
        outer_step, h, ok = verdict if verdict is not None else self._join_vote()
        if isinstance(ok, BaseException):
            raise ok
        if ok is None or ok:
            return False, h
        self._lost(outer_step)
        return True, h

    def _join_vote(self) -> "Verdict":
        vote, self._vote = self._vote, None
        return self._verdict_of(vote)

    @staticmethod
    def _verdict_of(vote: "Vote | None") -> "Verdict":
        if vote is None:
            return Verdict(-1, None, None)
        vote.thread.join()
        return Verdict(vote.outer_step, *vote.out[0])

    def _lost(self, outer_step: int) -> None:
        log.warning("global state after outer step %d differs from the majority: re-syncing from a peer", outer_step)
        self.install(self.client.fetch_state())

    def resync(self, why: str) -> tuple[dict, str]:
        log.warning("%s: re-syncing from a peer", why)
        self.install(self.client.fetch_state())
        return {"resynced": 1.0}, self.snapshot_hash()

    def close(self) -> None:
        self.client.close()


class Verdict(NamedTuple):
    """A hash vote's outcome: the outer step voted on (-1: no vote), the hash voted, and True / False (in the majority
    or not), an error, or None (no vote)."""
    outer_step: int
    hash: str | None
    ok: bool | BaseException | None


class Vote(NamedTuple):
    """A hash vote running in a background thread; `out` receives its (hash, verdict or error)."""
    thread: threading.Thread
    outer_step: int
    out: list
# what an island puts into the ring: (fp32 vector or Packed codes, its norm or None), or a function returning it
# (called in the reduce thread: the copy off the device happens there)
Payload = tuple[np.ndarray | Packed, float | None] | Callable[[], tuple[np.ndarray | Packed, float | None]]


class Reduce:
    """One outer step's ring reduce running in a background thread while the inner steps go on (streaming DiLoCo
    with overlap). The ring works on host buffers (numpy releases the GIL on large arrays, sockets block outside it),
    so the jitted steps keep the accelerators busy. With `vote` (a callable returning the verdict of the previous
    sync's hash vote) the thread takes that verdict first and runs the ring only if this island was in the majority
    (and only then makes the payload, when it is a function);
    `verdict()` hands it to the training thread, `aborted` says early that no ring will run. `result()` waits for
    the reduce: the mean, or StaleStep when the step completed without this island, or the ring's error."""

    def __init__(self, client: IslandClient, outer_step: int, payload: Payload, packed_out: bool = False,
                 vote: Callable[[], Verdict] | None = None):
        self.client, self.outer_step, self._payload = client, outer_step, payload
        self._packed_out, self._vote = packed_out, vote
        self._delta: np.ndarray | Packed | None = None
        self._error: BaseException | None = None
        self._verdict = Verdict(-1, None, None)
        self._judged = threading.Event()
        self.started = time.perf_counter()
        self.finished: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"elastic-reduce-{outer_step}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._vote is not None:
                self._verdict = self._vote()
            self._judged.set()
            if self.aborted:
                return
            vec, norm = self._payload() if callable(self._payload) else self._payload
            self._delta = self.client.all_reduce_mean(self.outer_step, vec, norm, self._packed_out)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by result()
            self._error = e
        finally:
            self._judged.set()
            self.finished = time.perf_counter()

    @property
    def aborted(self) -> bool:
        """The previous vote's verdict is in and was lost (or failed): this reduce sends nothing."""
        return self._judged.is_set() and self._verdict.ok is not None and self._verdict.ok is not True

    def verdict(self) -> Verdict:
        """The previous sync's hash vote, as the reduce thread took it (waits for it); (-1, None, None): none."""
        self._judged.wait()
        return self._verdict

    def result(self) -> np.ndarray | Packed:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self.aborted:
            raise RuntimeError(f"outer step {self.outer_step}'s reduce did not run: this island lost the previous "
                               "hash vote (take `verdict()` first and re-sync)")
        assert self._delta is not None
        return self._delta

    @property
    def seconds(self) -> float:
        """How long the reduce ran (from its start to its result)."""
        return (self.finished or time.perf_counter()) - self.started
