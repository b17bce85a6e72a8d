"""The island side: what the trainer calls. Host-side numpy only (no jax).

Trainer loop (``s`` = completed outer steps)::

    client = IslandClient(cfg.elastic, run_id, state_provider,      # state_provider() -> (arrays, meta)
                          compression=cfg.diloco.compression, block_size=cfg.diloco.block_size)
    info = client.join(s, params_hash(state))
    if info.needs_state:
        state = client.fetch_state()                                 # live, from a peer; sets s
    while ...:
        H inner steps; pseudo_grad = global_params - params
        try:
            delta = client.all_reduce_mean(s, pseudo_grad)           # bit-identical on every member
        except StaleStep:                                            # the run moved on without us
            state = client.fetch_state(); continue
        global_params, outer_state = outer_update(delta); s += 1
        if not client.commit(s - 1, params_hash(new state)):
            state = client.fetch_state()
    client.close()                                                   # deathrattle

``all_reduce_mean`` returns only after the coordinator decided "commit" for the epoch, i.e. every live member holds
the same result; on "abort" (a member died, lied or stalled, or a link broke) it redoes the reduce in a new epoch
with the same pseudo-gradient, for as long as the coordinator forms epochs (``reduce_retries`` > 0: at most that
many times, then :class:`ReduceFailed`): an honest island never exits because a peer misbehaves. It never falls back
to the local pseudo-gradient. Its ``sync`` carries the pseudo-gradient's norm: an island the coordinator's guard
leaves out of the step (not finite, or an outlier) waits for the step to commit and gets :class:`StaleStep` (re-sync
from a peer); a quarantined island waits out its quarantine the same way; a decoded mean that is not finite is never
returned (the epoch is failed and redone).

Identity: the island proves its key to the coordinator and to every peer (wire.py); it checks that the coordinator
is the one the islands file names, and that each peer it connects to holds the key the coordinator gave for it. Its
listener takes ring, state and probe connections only from admitted identities (keys the coordinator vouches for),
a bounded number per identity.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any, Callable

import numpy as np

from intellect_jax.codecs import Packed, make_codec
from intellect_jax.config import FRAME_HEADER_ALLOWANCE, ElasticConfig

from . import executor, identity, ordering, plan, recovery, ring, wire
from .recovery import State, StateProvider

log = logging.getLogger("intellect_jax.elastic.client")

MAX_RING_INBOX = 64  # ring streams accepted ahead of their epoch (an in-link's peer connects before we look)
PEER_CONNS = {"ring": 2 * ordering.MAX_STREAMS, "state": 2, "probe": 2}  # per peer identity and purpose


class ElasticError(RuntimeError):
    pass


class StaleStep(ElasticError):
    """The run completed this outer step without us; fetch the state from a peer (``fetch_state``)."""


class ReduceFailed(ElasticError):
    """The reduce was aborted more than ``reduce_retries`` (> 0) times in a row."""


class CoordinatorUnavailable(ElasticError):
    pass


class NotAdmitted(ElasticError):
    """The coordinator refused this island's key or name; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class JoinInfo:
    run_step: int | None  # completed outer steps of the run (None: we are the first island)
    needs_state: bool  # our state is behind or differs: call fetch_state() before training


class IslandClient:
    """One island's connection to the run: coordinator RPCs, heartbeats, and a listener for ring/state/probe peers.

    `compression` and `block_size` are the run's ``diloco.compression`` / ``diloco.block_size`` (the ring's payload
    codec); every other setting comes from `cfg`.
    """

    def __init__(self, cfg: ElasticConfig, run_id: str, state_provider: StateProvider | None = None, *,
                 compression: str, block_size: int):
        if not run_id:
            raise ValueError("run_id is empty; set elastic.run_id (or run.name)")
        self.cfg = cfg
        self.run_id = run_id
        self.auth = island_auth(cfg)
        self.name = self.auth.me.name
        self.incarnation = uuid.uuid4().hex[:12]
        if isinstance(self.auth.keys, identity.RosterKeys):
            self.auth.keys.refresh = self._refresh_keys  # an unknown peer key: ask the coordinator (rate-limited)
        self._roster = ""  # the digest of the admitted identities our keys are from
        self._provider = state_provider
        self.codec = make_codec(compression, block_size)
        self.block_size = block_size
        self.on_ring_frame: Callable[[int], None] | None = None  # fault injection / progress (tests, metrics)

        # The status we re-send on every heartbeat: enough for a restarted coordinator to rebuild its view.
        self._lock = threading.RLock()
        self.step = -1
        self.hash: str | None = None
        self.last_epoch: dict | None = None
        self.pending: dict | None = None
        self.last_stats: dict[str, Any] = {}
        self._connect_s = 0.0  # the last ring's wait for its connections (one reduce at a time per client)
        self._probed: frozenset[str] = frozenset()
        self._rates: dict[str, float] = {}  # our measured outbound bytes/s per peer (re-sent after a restart)
        self._rtts: dict[str, float] = {}  # our measured round trip (s) to each peer (likewise)

        self._mail = threading.Condition()
        self._ring_inbox: dict[tuple[int, str, int], wire.Conn] = {}
        self.listener = wire.Server(cfg.listen, self.auth, self.run_id, cfg.peer_max_frame_bytes, self._serve_peer,
                                    f"island-{self.name}", log, idle_timeout=3 * cfg.dead_after_s,
                                    encrypt=cfg.encrypt, group=_peer_group).start()
        self.port = self.listener.port
        self._rpc_conn: wire.Conn | None = None
        self._rpc_lock = threading.Lock()
        self._closed = threading.Event()
        self._finished = False  # our run reached its last step: the goodbye says so
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        log.info("island %s listening on port %d", self.name, self.port)

    # -- public API ------------------------------------------------------------------------------------------------

    def join(self, outer_step: int, params_hash: str | None, last_epoch: dict | None = None) -> JoinInfo:
        """Registers with the coordinator holding a state after `outer_step` completed outer steps (-1: none).

        `last_epoch` ({"id", "step", "members"}): the epoch that committed that state, when known (a checkpoint
        records it); a restarted coordinator waits for its members. Admission into a reduce happens at the next
        outer-step boundary (``all_reduce_mean``). Returns whether our state must first be fetched from a peer.
        """
        if last_epoch is not None and int(last_epoch["step"]) + 1 != outer_step:
            last_epoch = None  # not the epoch of this state
        with self._lock:
            self.step, self.hash = outer_step, params_hash
            self.last_epoch = last_epoch or self.last_epoch
        rep = self._register(wait_recovery=True)
        if not self._hb_thread.is_alive():
            self._hb_thread.start()
        return JoinInfo(rep.get("run_step"), bool(rep.get("needs_state")))

    def all_reduce_mean(self, outer_step: int, vec: np.ndarray | Packed, norm: float | None = None,
                        packed_out: bool = False) -> np.ndarray | Packed:
        """Mean of every member's `vec` for this outer step; identical bytes on all members.

        `vec` may be float32 or `Packed` (codes made on the island's device; pass its `norm`, the L2 norm of
        what was packed, for the coordinator's outlier guard). `packed_out`: the mean comes back as `Packed`.
        """
        if isinstance(vec, Packed):
            vec.check(self.codec)
            if norm is None:
                norm = float(np.linalg.norm(vec.decode(self.codec)))
        else:
            vec = np.ascontiguousarray(vec, np.float32).reshape(-1)
            norm = float(np.linalg.norm(vec)) if norm is None else norm
        norm = norm if np.isfinite(norm) else None  # None: not finite (JSON has no NaN)
        aborts, waiting = 0, ""
        while True:
            t_sync = time.perf_counter()
            rep = self._wait("sync", step=outer_step, norm=norm)
            t_epoch = time.perf_counter()
            why = rep.get("excluded") or (rep.get("quarantined") and
                                          f"quarantined for {float(rep['quarantined']):.0f} s more: {rep.get('why')}")
            if why:  # left out by the guard or quarantined: wait for the step to go on without us, then re-sync
                if why.split(":")[0] != waiting.split(":")[0]:
                    log.warning("outer step %d: %s is left out (%s); it re-syncs from a peer once the run goes on",
                                outer_step, self.name, why)
                waiting = why
                time.sleep(0.5 if rep.get("excluded") else min(5.0, max(0.5, float(rep["quarantined"]))))
                continue
            if rep.get("stale"):
                raise StaleStep(f"outer step {outer_step} was completed without {self.name} "
                                f"(run at {rep.get('run_step')}); fetch the state from a peer")
            if "error" in rep:
                raise ElasticError(rep["error"])
            ep = _check_epoch(rep.get("epoch"), self.name)
            self._learn(ep.get("keys") or {})
            with self._lock:
                self.pending = {"id": ep["id"], "step": outer_step, "members": ep["members"], "order": ep["order"],
                                "topology": ep.get("topology", "ring"), "streams": _epoch_streams(ep, self.cfg),
                                "status": "running"}
            result, err, blame, progress, cause = None, None, None, None, None
            try:
                result, stats = self._ring(ep, vec, packed_out)
                if not np.isfinite(result.scales if packed_out else result).all():
                    raise ring.RingError("the decoded mean is not finite; it is not applied")
            except (ring.RingError, OSError, wire.WireError, wire.RemoteError) as e:
                err = e
                blame = _suspect(ep, self.name, e)
                progress, cause = getattr(e, "progress", None), getattr(e, "cause", None)
                log.warning("epoch %d ring failed on %s: %s%s", ep["id"], self.name, e,
                            f" (reported to the coordinator, naming {blame})" if blame else "")
            with self._lock:
                self.pending["status"] = "ok" if err is None else "fail"
            t_done = time.perf_counter()
            extra = {"seconds": stats.seconds, "bytes": stats.bytes_sent} if err is None else {}  # for the status
            d = self._wait("done", epoch=ep["id"], step=outer_step, ok=err is None, blame=blame, progress=progress,
                           cause=cause, **extra)
            decision = d.get("decision")
            # Where the reduce's time went: the sync barrier (every member at this step), the ring (its connections,
            # then the bytes), the done barrier (every member's verdict).
            phases = {"barrier_seconds": t_epoch - t_sync, "connect_seconds": self._connect_s,
                      "ring_seconds": t_done - t_epoch - self._connect_s,
                      "done_seconds": time.perf_counter() - t_done}
            with self._lock:
                self.pending = None
                if decision == "commit" and err is None:
                    self.step, self.hash = outer_step + 1, None
                    self.last_epoch = {"id": ep["id"], "step": outer_step, "members": ep["members"]}
                    self.last_stats = dataclasses.asdict(stats) | phases | {
                        "epoch": ep["id"], "members": ep["members"], "order": ep["order"], "aborts": aborts}
            if decision == "commit" and err is None:
                log.info("outer step %d reduced in epoch %d with %s (%.3f s, %.1f MB sent)", outer_step, ep["id"],
                         ep["order"], stats.seconds, stats.bytes_sent / 1e6)
                self._maybe_probe(ep, stats.bytes_sent / max(stats.seconds, 1e-9))
                return result
            if decision in ("stale", "commit"):
                raise StaleStep(f"outer step {outer_step} committed in epoch {ep['id']} without a result on "
                                f"{self.name}; fetch the state from a peer")
            aborts += 1
            log.warning("epoch %d aborted; redoing outer step %d (attempt %d%s)", ep["id"], outer_step, aborts + 1,
                        f" of {self.cfg.reduce_retries + 1}" if self.cfg.reduce_retries else "")
            if self.cfg.reduce_retries and aborts > self.cfg.reduce_retries:
                raise ReduceFailed(f"outer step {outer_step}: reduce aborted {aborts} times")

    def commit(self, outer_step: int, params_hash: str) -> bool:
        """Reports the hash of the global params after `outer_step`; False: ours differs from the majority's (or the
        coordinator refused our vote), call fetch_state()."""
        with self._lock:
            self.hash = params_hash
        try:
            rep = self._wait("commit", step=outer_step, hash=params_hash)
        except wire.RemoteError as e:
            log.warning("outer step %d: the coordinator refused our hash vote (%s); re-sync needed", outer_step, e)
            return False
        if rep.get("contested"):
            log.error("outer step %d: the members' hashes split with no majority; keeping our state", outer_step)
            return True
        if not rep.get("ok"):
            log.warning("outer step %d: our params hash %s differs from the run's %s; re-sync needed", outer_step,
                        params_hash[:16], str(rep.get("hash"))[:16])
        return bool(rep.get("ok"))

    def fetch_state(self) -> State:
        """Pulls the latest committed state from a live island that voted for it (resuming from another if the
        source dies); only a state whose exact step has a canonical hash, and that hashes to it, is installed."""
        deadline = time.monotonic() + self.cfg.barrier_timeout_s
        while True:
            rep = self._rpc("members")
            run_step = rep.get("run_step")
            canonical = rep.get("canonical") if isinstance(rep.get("canonical"), dict) else {}
            peers = [i for i in rep.get("islands") or [] if isinstance(i, dict) and i.get("source")
                     and i.get("name") != self.name and isinstance(i.get("step"), int)
                     and canonical.get(str(i["step"] - 1))]
            peers.sort(key=lambda i: (-(i["step"]), i["name"]))
            self._learn({i["name"]: i.get("key") for i in peers})
            if peers and not rep.get("recovering"):
                layout = recovery.layout_of(self._provider()[0]) if self._provider is not None else None
                try:
                    state, report = recovery.fetch_state(
                        [(i["name"], i["addr"]) for i in peers], self._connect_state, self.cfg.chunk_bytes,
                        layout=layout, expected_hash=lambda s: canonical.get(str(s - 1)))
                    step = int(state.meta["outer_step"])
                    if run_step is None or step >= run_step:
                        break
                    log.info("fetched outer step %d but the run is at %d; fetching again", step, run_step)
                except recovery.TransferError as e:
                    log.warning("state fetch failed: %s", e)
            if not peers and rep.get("finished_step") is not None:
                raise ElasticError(
                    f"the run finished at outer step {rep['finished_step']} and every island that held its state has "
                    f"left, so {self.name} (at outer step {self.step}) cannot catch up; to train on, resume an island "
                    "from its final checkpoint with a larger run.steps")
            if time.monotonic() > deadline:
                raise ElasticError("no live island could provide the state")
            time.sleep(0.5)
        with self._lock:
            self.step, self.hash = step, state.meta.get("params_hash")
            self.pending = None
            # The epoch that committed this state: after a coordinator restart it tells which islands to wait for.
            self.last_epoch = (rep.get("epochs") or {}).get(str(step - 1)) or self.last_epoch
            self.last_stats = {"fetch": report}
        self._register(wait_recovery=True)
        return state

    def mark_finished(self) -> None:
        """Our run reached its last step: `close` tells the coordinator, so that an island still catching up when
        every island has left is told the run is over instead of waiting for a peer that will not come."""
        self._finished = True

    def close(self) -> None:
        """Leaves the run cleanly (deathrattle), then stops the listener."""
        if self._closed.is_set():
            return
        try:
            self._rpc("bye", retry=False, finished=self._finished)
        except Exception as e:  # noqa: BLE001 - leaving anyway
            log.info("deathrattle not delivered: %s", e)
        self._closed.set()
        with self._rpc_lock:
            if self._rpc_conn is not None:
                self._rpc_conn.close()
        self.listener.close()

    # -- coordinator RPC -------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"incarnation": self.incarnation, "step": self.step, "hash": self.hash,
                    "last_epoch": self.last_epoch, "pending": dict(self.pending) if self.pending else None,
                    "advertise_host": self.cfg.advertise_host, "port": self.port, "rates": self._rates,
                    "rtts": self._rtts}

    def _connect_coord(self, kind: str) -> wire.Conn:
        conn, _ = wire.connect(self.cfg.coordinator, self.auth, identity.COORDINATOR, self.run_id,
                               self.cfg.coordinator_max_frame_bytes, hello={"kind": kind},
                               timeout=self.cfg.dead_after_s, encrypt=self.cfg.encrypt)
        conn.settimeout(self.cfg.dead_after_s + 2.0)  # > the coordinator's long-poll (POLL_S = 1 s)
        return conn

    def _rpc(self, op: str, retry: bool = True, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + self.cfg.coordinator_timeout_s
        delay = 0.2
        reused_once = False  # the coordinator closes idle connections: a reused one may be gone, retry once anyway
        while True:
            reused = False
            try:
                with self._rpc_lock:
                    if self._rpc_conn is None:
                        self._rpc_conn = self._connect_coord("rpc")
                    else:
                        reused = True
                    req = {"op": op, "incarnation": self.incarnation, **fields}
                    if op == "register":
                        req["status"] = self.status()
                    rep, _ = self._rpc_conn.request(req)
                if rep.get("reregister") and op != "register":
                    self._rpc("register")
                    continue
                if op in ("register", "heartbeat"):
                    self._note_roster(rep)
                return rep
            except (OSError, wire.WireError) as e:
                with self._rpc_lock:
                    if self._rpc_conn is not None:
                        self._rpc_conn.close()
                        self._rpc_conn = None
                if reused and not reused_once:
                    reused_once = True
                    continue
                if not retry or time.monotonic() > deadline:
                    raise CoordinatorUnavailable(f"coordinator {self.cfg.coordinator} unreachable: {e}") from e
                log.warning("coordinator RPC %s failed (%s); reconnecting", op, e)
                time.sleep(delay)
                delay = min(2 * delay, 0.5)

    def _register(self, wait_recovery: bool) -> dict[str, Any]:
        deadline = time.monotonic() + self.cfg.coordinator_timeout_s
        while True:
            try:
                rep = self._rpc("register")
            except wire.RemoteError as e:
                if "not admitted" in str(e):
                    raise NotAdmitted(f"the coordinator {self.cfg.coordinator} refused island {self.name}: {e}") \
                        from None
                if "in use" not in str(e) or time.monotonic() > deadline:
                    raise
                log.warning("%s; retrying", e)
                time.sleep(1.0)
                continue
            if not (wait_recovery and rep.get("recovering")):
                return rep
            if time.monotonic() > deadline:
                raise CoordinatorUnavailable("coordinator stayed in recovery")
            time.sleep(0.2)

    def _wait(self, op: str, **fields: Any) -> dict[str, Any]:
        """A blocking coordinator request: re-polls while the coordinator answers {"wait": true}."""
        deadline = time.monotonic() + self.cfg.barrier_timeout_s
        while True:
            rep = self._rpc(op, **fields)
            if not rep.get("wait"):
                return rep
            if time.monotonic() > deadline:
                raise ElasticError(f"{op} {fields} still waiting after elastic.barrier_timeout_s="
                                   f"{self.cfg.barrier_timeout_s} s")

    def _heartbeat_loop(self) -> None:
        conn = None
        while not self._closed.wait(self.cfg.heartbeat_s if conn is not None else 0.5):
            try:
                if conn is None:
                    conn = self._connect_coord("hb")
                rep, _ = conn.request({"op": "heartbeat", "incarnation": self.incarnation, "status": self.status()})
                self._note_roster(rep)
            except (OSError, wire.WireError, wire.RemoteError) as e:
                if conn is not None:
                    log.warning("heartbeat to the coordinator failed (%s); reconnecting", e)
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    # -- admitted keys ---------------------------------------------------------------------------------------------

    def _learn(self, keys: dict[str, Any], replace: bool = False) -> None:
        """Peer keys the coordinator vouches for (hex), kept next to the islands file's."""
        good = {}
        for n, k in keys.items():
            if identity.valid_name(n) and isinstance(k, str) and len(k) == 2 * wire.KEY_BYTES:
                try:
                    good[n] = bytes.fromhex(k)
                except ValueError:
                    continue
        if good or replace:
            self.auth.keys.learn(good, replace)

    def _note_roster(self, rep: dict[str, Any]) -> None:
        """The coordinator's admitted identities changed: learn their keys anew (in a thread: we may be answering
        inside an RPC)."""
        digest = rep.get("roster")
        if isinstance(digest, str) and digest and digest != self._roster:
            self._roster = digest
            threading.Thread(target=self._refresh_keys, name="keys", daemon=True).start()

    def _refresh_keys(self) -> None:
        try:
            rep = self._rpc("keys", retry=False)
        except (ElasticError, wire.RemoteError, OSError) as e:
            log.info("could not fetch the admitted keys: %s", e)
            return
        keys = rep.get("keys")
        if isinstance(keys, dict):
            self._learn(keys, replace=True)  # a revoked island's key is forgotten

    # -- peers: ring, state, probes --------------------------------------------------------------------------------

    def _serve_peer(self, conn: wire.Conn, hello: dict[str, Any]) -> bool:
        op = hello.get("op")
        if op == "ring":
            key = (hello.get("epoch"), conn.identity, hello.get("stream"))  # who: the proven identity
            if not (isinstance(key[0], int) and isinstance(key[2], int) and 0 <= key[2] < ordering.MAX_STREAMS
                    and not isinstance(key[0], bool) and not isinstance(key[2], bool) and key[0] >= 0):
                raise wire.MalformedFrame(f"ring HELLO with epoch/stream {(key[0], key[2])!r:.120}")
            with self._lock:
                done_id = (self.last_epoch or {}).get("id", 0)
            if key[0] <= done_id:
                raise wire.MalformedFrame(f"ring stream for epoch {key[0]}, which is over (ours: {done_id})")
            conn.max_recv_bytes = 2 * self.cfg.chunk_bytes + FRAME_HEADER_ALLOWANCE
            with self._mail:
                if len(self._ring_inbox) >= max(MAX_RING_INBOX, 4 * ordering.MAX_STREAMS):
                    # Unconsumed streams (peers ahead of us, or bogus epochs): the furthest-ahead one goes.
                    far = max(self._ring_inbox)
                    if far[0] <= key[0]:
                        raise wire.MalformedFrame(f"{len(self._ring_inbox)} ring streams already wait for an epoch")
                    log.warning("dropping ring stream %s: too many wait for an epoch", far)
                    self._ring_inbox.pop(far).close()
                self._ring_inbox[key] = conn
                self._mail.notify_all()
            return True  # adopted by the ring
        if op == "state":
            conn.max_recv_bytes = FRAME_HEADER_ALLOWANCE  # requests only
            if self._provider is None:
                conn.send(wire.MsgType.ERROR, {"error": f"island {self.name} serves no state"})
                return False
            recovery.serve_state(conn, self._provider, self.cfg.serve_bytes_per_s)
            return False
        if op == "probe":
            with self._lock:  # a link probe comes from a member of the epoch we are in or just reduced with
                members = set((self.last_epoch or {}).get("members", [])) | set((self.pending or {}).get("members", []))
            if conn.identity not in members:
                raise wire.MalformedFrame(f"a link probe from {conn.identity}, not a member of our last epoch")
            conn.max_recv_bytes = self.cfg.probe_bytes + FRAME_HEADER_ALLOWANCE
            while True:
                _, h, data = conn.recv()
                conn.send(wire.MsgType.REPLY, {"n": len(data)})
        raise wire.MalformedFrame(f"unknown peer op {op!r}")

    def _connect_peer(self, name: str, addr: str, hello: dict[str, Any]) -> wire.Conn:
        conn, _ = wire.connect(addr, self.auth, name, self.run_id, self.cfg.peer_max_frame_bytes, hello=hello,
                               timeout=self.cfg.dead_after_s, encrypt=self.cfg.encrypt)
        conn.settimeout(self.cfg.dead_after_s)
        return conn

    def _connect_state(self, name: str, addr: str) -> wire.Conn:
        return self._connect_peer(name, addr, {"op": "state"})

    def _epoch_aborted(self, epoch_id: int) -> str | None:
        """Why we should stop waiting on a neighbour: the coordinator already aborted the epoch (a member died)."""
        try:
            rep = self._rpc("epoch", retry=False, epoch=epoch_id)
        except (ElasticError, wire.RemoteError) as e:
            log.debug("epoch poll failed: %s", e)
            return None
        if rep.get("decision") in ("abort", "stale"):
            return f"the coordinator aborted epoch {epoch_id} (a member died)"
        return None

    def _ring(self, ep: dict[str, Any], vec: np.ndarray | Packed, packed_out: bool,
              ) -> tuple[np.ndarray | Packed, ring.RingStats]:
        """The epoch's reduce: connect the plan's out-links (S streams each), wait for its in-links' peers to connect
        theirs, then run the plan (``executor.run_plan``)."""
        order = ep["order"]
        p, r = plan.from_description(ep), order.index(self.name)
        S = _epoch_streams(ep, self.cfg)
        if self.on_ring_frame is not None:
            self.on_ring_frame(0)  # the ring starts (0 frames sent)
        send: dict[int, list[wire.Conn]] = {}
        recv: dict[int, list[wire.Conn]] = {}
        t0, self._connect_s = time.perf_counter(), 0.0
        try:
            for q in p.out_links(r):
                peer = order[q]
                send[q] = []
                try:
                    for k in range(S):
                        send[q].append(self._connect_peer(peer, ep["addrs"][peer], {"op": "ring", "epoch": ep["id"],
                                                                                    "stream": k}))
                except (OSError, wire.WireError, wire.RemoteError) as e:
                    raise ring.RingError(f"connecting to {p.role(True)} {peer}: {e}", "succ", 0.0,
                                         "closed" if isinstance(e, OSError) else "bad", peer=q) from e
            deadline = time.monotonic() + self.cfg.dead_after_s
            next_poll = time.monotonic() + ring.CANCEL_POLL_S
            with self._mail:
                for q in p.in_links(r):
                    peer = order[q]
                    recv[q] = []
                    for k in range(S):
                        while (ep["id"], peer, k) not in self._ring_inbox:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                raise ring.RingError(f"{p.role(False)} {peer} did not connect stream {k} in time",
                                                     "pred", 0.0, "timeout", peer=q)
                            if time.monotonic() >= next_poll:
                                self._mail.release()  # no coordinator round trip while holding the inbox
                                try:
                                    why = self._epoch_aborted(ep["id"])
                                finally:
                                    self._mail.acquire()
                                if why:
                                    raise ring.RingError(f"waiting for {p.role(False)} {peer}: {why}",
                                                         cause="cancelled")
                                next_poll = time.monotonic() + ring.CANCEL_POLL_S
                            self._mail.wait(min(left, ring.CANCEL_POLL_S))
                        recv[q].append(self._ring_inbox.pop((ep["id"], peer, k)))
            self._connect_s = time.perf_counter() - t0
            if self.on_ring_frame is not None:
                send = {q: [_Tap(c, self.on_ring_frame) for c in cs] for q, cs in send.items()}
            return executor.run_plan(vec, p, r, send, recv, self.codec, self.cfg.chunk_bytes, self.block_size,
                                     timeout=self.cfg.dead_after_s, epoch=ep["id"],
                                     cancel=lambda: self._epoch_aborted(ep["id"]), packed_out=packed_out,
                                     min_rate=float(ep.get("min_rate") or 0.0))
        finally:
            for c in [c for cs in list(send.values()) + list(recv.values()) for c in cs]:
                c.close()
            with self._mail:  # connections left over from aborted epochs
                for key in [k for k in self._ring_inbox if k[0] <= ep["id"]]:
                    self._ring_inbox.pop(key).close()

    def _maybe_probe(self, ep: dict[str, Any], ring_bytes_per_s: float | None = None) -> None:
        members = frozenset(ep["members"])
        wanted = 2 if self.cfg.streams == 0 else 3  # 2 members: one ring order, but the round trip sets the streams
        if members == self._probed or self.cfg.probe_bytes <= 0 or len(members) < wanted:
            return
        self._probed = members
        peers = {m: ep["addrs"][m] for m in members if m != self.name}  # names: their keys came with the epoch
        threading.Thread(target=self._probe, args=(peers, probe_size(self.cfg.probe_bytes, ring_bytes_per_s)),
                         name="probe", daemon=True).start()

    def _probe(self, peers: dict[str, str], size: int) -> None:
        """Measures our outbound throughput and round trip to each peer (during the inner steps) and reports them."""
        rates, rtts = {}, {}
        blob = os.urandom(size)
        for name, addr in peers.items():
            try:
                conn = self._connect_peer(name, addr, {"op": "probe"})
                try:
                    t0 = time.perf_counter()  # warm-up (connection, slow start) and the round trip: 4 KiB fit
                    conn.send(wire.MsgType.DATA, {}, blob[:4096])  # in TCP's first window, so this is one RTT
                    conn.recv()
                    rtts[name] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    conn.send(wire.MsgType.DATA, {}, blob)
                    conn.recv()
                    rates[name] = size / max(time.perf_counter() - t0, 1e-9)
                finally:
                    conn.close()
            except (OSError, wire.WireError) as e:
                log.info("probe to %s failed: %s", name, e)
        with self._lock:
            self._rates, self._rtts = dict(rates), dict(rtts)
        if rates and not self._closed.is_set():
            try:
                self._rpc("rates", retry=False, rates=rates, rtts=rtts)
            except ElasticError as e:
                log.info("could not report link rates: %s", e)


PROBE_SECONDS = 0.5  # a link probe's length at the rate the ring just reached
PROBE_MIN_BYTES = 256 << 10


def probe_size(probe_bytes: int, ring_bytes_per_s: float | None) -> int:
    """Bytes of a link probe: `elastic.probe_bytes`, but no more than PROBE_SECONDS of what this island's last ring
    sent per second (a lower bound of its links' rate), so that on a slow link the probe (run while the islands
    train, on the links the next reduces use) takes a fraction of a second per peer, not several (1 MiB is 1.7 s at
    5 Mbit/s); at least PROBE_MIN_BYTES, so that the measure is not a round trip alone."""
    if not ring_bytes_per_s or ring_bytes_per_s <= 0:
        return probe_bytes
    return int(min(probe_bytes, max(PROBE_MIN_BYTES, ring_bytes_per_s * PROBE_SECONDS)))


def _epoch_streams(ep: dict[str, Any], cfg: ElasticConfig) -> int:
    """TCP streams per link in this epoch: the coordinator's choice (the same for every member)."""
    return int(ep.get("streams") or cfg.streams or ordering.MIN_STREAMS)


class _Tap:
    """Wraps a ring connection to call `fn(frames_sent)` after each frame (progress metrics, fault injection); the
    client calls `fn(0)` as the ring starts, before connecting."""

    def __init__(self, conn: wire.Conn, fn: Callable[[int], None]):
        self._conn, self._fn, self._n = conn, fn, 0

    def send(self, *a, **k):
        self._conn.send(*a, **k)
        self._n += 1
        self._fn(self._n)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def island_auth(cfg: ElasticConfig) -> identity.Auth:
    """This island's identity: its key and the islands file, or (shared-secret mode) a key derived from the secret
    for its name (``elastic.island_name``, default hostname-pid)."""
    if cfg.key_file:
        return identity.key_auth(cfg.key_file, cfg.islands_file, cfg.island_name or None)
    name = cfg.island_name or re.sub(r"[^A-Za-z0-9._@+-]", "-", f"{socket.gethostname()}-{os.getpid()}")[-64:]
    return identity.secret_auth(identity.load_secret(cfg.secret_file), name.lstrip("-._@+") or "island")


def _peer_group(name: str, hello: dict) -> tuple[str, int]:
    """A peer connection's purpose and how many one identity may hold for it (a new one replaces the oldest)."""
    op = hello.get("op")
    if op not in PEER_CONNS or name == identity.COORDINATOR:
        raise wire.MalformedFrame(f"peer connection for {op!r:.40} from {name!r} (expected one of "
                                  f"{sorted(PEER_CONNS)})")
    return op, PEER_CONNS[op]


def _check_epoch(ep: Any, me: str) -> dict[str, Any]:
    """The coordinator's epoch, checked before anything of it is used (it names us, its lists agree)."""
    try:
        members, order = list(ep["members"]), list(ep["order"])
        if me not in members or sorted(order) != sorted(members) or not isinstance(ep["id"], int):
            raise ValueError("members and ring order disagree or do not name this island")
        plan.from_description(ep)  # a topology this build runs
        for m in members:
            if not isinstance(ep["addrs"][m], str):
                raise ValueError(f"no address for {m}")
    except (KeyError, TypeError, ValueError) as e:
        raise ElasticError(f"malformed epoch from the coordinator: {e}") from None
    return ep


def _suspect(ep: dict[str, Any], me: str, e: BaseException) -> str | None:
    """The peer a reduce failure points at: the member at the other end of the failed link (`e.peer`, its rank in
    the epoch's order), or, where the error names only the link's direction (`e.suspect`, "pred": in, "succ": out),
    the one peer the epoch's plan links us to that way."""
    order, side, q = ep["order"], getattr(e, "suspect", None), getattr(e, "peer", None)
    if side not in ("pred", "succ") or len(order) < 2:
        return None
    if q is None:
        p, r = plan.from_description(ep), order.index(me)
        links = p.out_links(r) if side == "succ" else p.in_links(r)
        if len(links) != 1:
            return None
        q = links[0]
    return order[q] if isinstance(q, int) and 0 <= q < len(order) and order[q] != me else None
