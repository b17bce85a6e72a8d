"""Coordinator: the run's membership, epochs (membership views per outer step), ring order, hash votes and quarantine,
served over authenticated connections (wire.py). Restartable. The state machine itself lives in protocol.py
(no sockets); this module is its I/O: the handshake names each island (by its key, never by a field it sends), one
lock serialises the islands' requests, blocking requests long-poll, a monitor thread runs the clock (heartbeats,
deadlines, quarantines) and re-reads the islands file.

Outer step protocol (``s`` = completed outer steps = index of the outer step being reduced):

1. ``sync(s)``: an island holding the run's state at step s is ready to reduce it. The epoch for s forms when every
   live island expected at s is ready, or ``sync_timeout_s`` after the first one was (the late ones are left out).
   Joiners are admitted only here.
2. the members run the ring; each reports ``done(epoch, ok, blame)``.
3. decision: **commit** once every live member reported ok; **abort** as soon as one failed (or all died). Only
   after "commit" does an island apply the outer update, so no update is half-applied; after "abort" the survivors
   redo step s in a new epoch from their kept pseudo-gradients.
4. ``commit(s, hash)``: the hash of the new global params, from the members that reduced step s; the canonical
   hash needs a strict majority of them (protocol.py); an island that differs re-syncs from a peer.

Pseudo-gradient guard (``diloco.max_norm_ratio``, the rule of ``diloco.guard`` in the in-program transport): each
``sync`` carries the island's pseudo-gradient norm (null: not finite). When the epoch forms, an island whose
pseudo-gradient is not finite, or (with 3 or more ready islands) whose norm exceeds ratio x the median of the finite
ones, is left out of the epoch: every member reduces without it alike, and it re-syncs from a peer once the step
commits. A member that dies before reporting aborts its epoch at once (the members poll the epoch's decision while
they wait on a neighbour), and an abort clears every member's readiness, so the redo epoch holds only the islands
that asked again: never one that died meanwhile.

Admission: with an islands file (``elastic.islands_file``), the coordinator re-reads it every second while the run
goes on: a new line admits an island, a removed line revokes one (its connections are closed and it leaves the
run), a changed key rotates it.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any

from intellect_jax.config import DilocoConfig, ElasticConfig

from . import identity, protocol, status, wire
from .protocol import check_norm, check_status, outliers  # noqa: F401 - re-exported for callers and tests

COORDINATOR_IDLE_MIN_S = 600.0
POLL_S = 1.0  # longest a blocking request waits before answering {"wait": true}
ROSTER_CHECK_S = 1.0
CONNS_PER_KIND = 2  # an island's heartbeat and RPC connections (a reconnect replaces the older one)

log = logging.getLogger("intellect_jax.elastic.coordinator")


class Coordinator:
    """Reads the ``elastic`` settings of `cfg` (dead_after_s, min_islands, max_islands, encrypt,
    coordinator_max_frame_bytes, recovery_grace_s, sync_timeout_s, vote_timeout_s, quarantine_s, quarantine_after,
    streams, link_mbit, min_link_mbit); `auth` is its identity and the admitted islands (identity.key_auth /
    secret_auth); `max_norm_ratio` is the run's ``diloco.max_norm_ratio`` (0: only non-finite pseudo-gradients are
    left out)."""

    def __init__(self, cfg: ElasticConfig, run_id: str, bind: str, auth: identity.Auth,
                 max_norm_ratio: float = DilocoConfig.max_norm_ratio):
        self.run_id = run_id
        self.auth = auth
        self.cv = threading.Condition()
        self.state = protocol.RunState(protocol.Settings.of(cfg, max_norm_ratio), time.monotonic(),
                                        key_of=self._key_hex)
        self._stop = threading.Event()
        self._conn_ids = 0
        self._refusals = wire.RateLimitedLog(log)
        # Islands heartbeat every heartbeat_s on one connection; their RPC connection can sit idle for a whole outer
        # step, and the client reconnects when it finds it closed. A connection silent for longer than this is
        # closed, so a peer cannot hold a thread forever.
        self.idle_timeout_s = max(COORDINATOR_IDLE_MIN_S, 6 * cfg.dead_after_s)
        self.server = wire.Server(bind, auth, run_id, cfg.coordinator_max_frame_bytes, self._handle, "coordinator",
                                  log, idle_timeout=self.idle_timeout_s, encrypt=cfg.encrypt, group=self._group,
                                  max_connections=2 * CONNS_PER_KIND * cfg.max_islands + 16)
        self.port = self.server.port
        self._monitor = threading.Thread(target=self._monitor_loop, name="coordinator-monitor", daemon=True)
        self.http: status.StatusServer | None = None
        if cfg.http:
            token = (identity.read_private(cfg.http_token_file, "token file", "write a random token into it (e.g. "
                                           "`head -c 24 /dev/urandom | base64 > FILE; chmod 600 FILE`)").decode()
                     .strip() if cfg.http_token_file else None)
            self.http = status.StatusServer(cfg.http, self.snapshot, token)

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The status document and the reduce histograms, taken under the lock (the status page, /metrics)."""
        with self.cv:
            return status.document(self.state, self.run_id, time.monotonic()), copy.deepcopy(self.state.hist)

    def start(self) -> "Coordinator":
        self.server.start()
        self._monitor.start()
        if self.http is not None:
            self.http.start()
            log.info("status page, /status.json and /metrics at http://%s:%d/", self.http.httpd.server_address[0],
                     self.http.port)
        log.info("coordinator for run %r listening on %s:%d (%s)", self.run_id, self.server.host, self.port,
                 "islands file " + self.auth.keys.roster().source if self.auth.mode == "keys" else
                 "shared-secret mode: anyone holding the secret can be any island; use an islands file on the "
                 "internet")
        return self

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        if self.http is not None:
            self.http.close()

    def _key_hex(self, name: str) -> str | None:
        k = self.auth.keys.public(name)
        return k.hex() if k is not None else None

    # -- connections -----------------------------------------------------------------------------------------------

    @staticmethod
    def _group(name: str, hello: dict) -> tuple[str, int]:
        kind = hello.get("kind", "rpc")
        if kind not in ("rpc", "hb") or name == identity.COORDINATOR:
            raise wire.MalformedFrame(f"connection kind {kind!r:.40} from {name!r} (islands open 'rpc' and 'hb')")
        return kind, CONNS_PER_KIND

    def _handle(self, conn: wire.Conn, hello: dict[str, Any]) -> None:
        name = conn.identity or ""
        kind = hello.get("kind", "rpc")
        with self.cv:
            self._conn_ids += 1
            cid = self._conn_ids
        peer_host = conn.peer.rpartition(":")[0]
        said_bye = False
        try:
            while not self._stop.is_set():
                mtype, req, _ = conn.recv()
                if mtype != wire.MsgType.REQUEST:
                    raise wire.MalformedFrame(f"expected REQUEST, got {mtype.name}")
                op = req.get("op")
                try:
                    rep = self._dispatch(name, op, req, cid if kind == "hb" else 0, peer_host)
                except Exception as e:  # noqa: BLE001 - a bad request is refused; it never reaches the run's state
                    self._refusals((name, op if isinstance(op, str) else "?", type(e)), logging.WARNING,
                                   "refused %r request from island %s (%s): %s: %s", str(op)[:40], name, conn.peer,
                                   type(e).__name__, str(e)[:300])
                    conn.send(wire.MsgType.ERROR, {"error": f"bad {str(op)[:40]!r} request: {str(e)[:500]}"})
                    continue
                said_bye = said_bye or op == "bye"
                conn.send(wire.MsgType.REPLY, rep)
        except wire.PeerClosed:
            pass
        finally:
            if kind == "hb" and not said_bye and not conn.evicted:
                with self.cv:
                    isl = self.state.islands.get(name)
                    if isl is not None and isl.alive and isl.hb_conn == cid:
                        self.state.mark_dead(isl, "heartbeat connection closed (crashed or killed?)",
                                             now=time.monotonic())
                        self.state.advance(time.monotonic())
                        self.cv.notify_all()

    def _dispatch(self, name: str, op: Any, req: dict, hb_cid: int, peer_host: str) -> dict[str, Any]:
        st = self.state
        with self.cv:
            now = time.monotonic()
            if op in ("register", "heartbeat"):
                isl = st.register(name, req.get("status"), hb_cid, peer_host, explicit=op == "register", now=now)
                st.advance(now)
                self.cv.notify_all()
                rep: dict[str, Any] = {"recovering": st.recovering, "run_step": st.run_step, "name": name,
                                       "roster": self._roster_digest()}
                if not st.recovering:
                    rep["needs_state"] = st.needs_state(isl)
                left = st.quarantined(isl, now)
                if left:
                    rep["quarantined"], rep["why"] = left, isl.quarantine_why
                return rep
            isl = st.islands.get(name)
            if isl is None or isl.incarnation != req.get("incarnation"):
                return {"reregister": True}
            isl.last_seen = now
            if not isl.alive:  # declared dead (e.g. a partition) but talking again: back as a live island
                log.info("island %s is back", name)
                isl.alive = True
            if op == "bye":
                st.bye(isl, req.get("finished") is True, now)
                st.advance(now)
                self.cv.notify_all()
                return {"ok": True}
            if op == "members":  # the sources a fetcher may take the state from, with the canonical hashes
                recent = sorted(st.canonical)[-8:]
                return {"run_step": st.run_step, "recovering": st.recovering, "finished_step": st.finished_step,
                        "islands": st.sources(), "canonical": {str(k): st.canonical[k] for k in recent},
                        "epochs": {str(k): {f: st.committed[k][f] for f in ("id", "step", "members")}
                                   for k in sorted(st.committed)[-8:]}}
            if op == "keys":  # the admitted keys of the registered islands (a peer port checks who connects)
                return {"keys": {n: self._key_hex(n) for n in st.islands}, "roster": self._roster_digest()}
            if op == "epoch":  # polled by members waiting on a neighbour: abort at once if the epoch did
                d = st.decisions.get(protocol._int(req.get("epoch"), "epoch", 0, protocol.EPOCH_ID_MAX))
                return {"decision": d[0] if d else None}
            if op == "rates":
                st.set_rates(isl, req)
                return {"ok": True}
            waiters = {"sync": st.sync, "done": st.done, "commit": st.commit}
            if op not in waiters:
                raise ValueError(f"unknown op {str(op)[:40]!r}")
            deadline = now + POLL_S
            while True:
                now = time.monotonic()
                st.advance(now)
                rep = waiters[op](isl, req, now)
                if rep is not None:
                    self.cv.notify_all()
                    return rep
                left = deadline - now
                if left <= 0:
                    return {"wait": True}
                self.cv.wait(left)

    def _roster_digest(self) -> str:
        return self.auth.keys.roster().digest() if self.auth.mode == "keys" else ""

    # -- the clock -------------------------------------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        next_roster = 0.0
        while not self._stop.wait(0.2):
            try:
                with self.cv:
                    self.state.tick(time.monotonic())
                    self.cv.notify_all()
                if time.monotonic() >= next_roster:
                    next_roster = time.monotonic() + ROSTER_CHECK_S
                    self._reload_roster()
            except Exception:  # a bug must not stop failure detection for the rest of the run
                log.exception("coordinator monitor step failed; continuing")

    def _reload_roster(self) -> None:
        keys = self.auth.keys
        if self.auth.mode != "keys" or keys._file is None:  # type: ignore[union-attr]
            return
        try:
            change = keys._file.reload()  # type: ignore[union-attr]
        except identity.IdentityError as e:
            self._refusals("roster", logging.ERROR, "islands file changed but cannot be used (%s); the previous "
                           "version stays in force", e)
            return
        if change is None:
            return
        old, new = change
        gone = sorted(n for n in old.keys if n not in new.keys or new.keys[n] != old.keys[n])
        added = sorted(n for n in new.keys if n not in old.keys)
        for n in gone:
            rekeyed = n in new.keys
            closed = self.server.close_identity(n)
            if not rekeyed:
                with self.cv:
                    self.state.forget(n, "revoked by the operator (removed from the islands file)", time.monotonic())
                    self.state.advance(time.monotonic())
                    self.cv.notify_all()
            log.warning("islands file: %s %s (%d connection(s) closed)", n,
                        "has a new key: it reconnects with it" if rekeyed else "is revoked", closed)
        if added:
            log.info("islands file: admitted %s", added)


def coordinator_auth(cfg: ElasticConfig) -> identity.Auth:
    if cfg.secret_file:
        return identity.secret_auth(identity.load_secret(cfg.secret_file), identity.COORDINATOR)
    return identity.key_auth(cfg.key_file, cfg.islands_file, coordinator=True)
