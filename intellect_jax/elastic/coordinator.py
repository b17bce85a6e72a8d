"""Coordinator: membership, heartbeats, epochs (membership views per outer step), ring order. Restartable.

It holds no state that the islands do not also hold: after a restart it rebuilds its view from the islands'
re-registrations (each island's heartbeat thread reconnects and re-sends its full status: completed outer steps,
params hash, last committed epoch, and the epoch it is reducing in, if any, with running / ok / fail).

Outer step protocol (``s`` = completed outer steps = index of the outer step being reduced):

1. ``sync(s)``: an island is ready to reduce step s. The epoch for s forms when every live island at step s
   (members of the last epoch, and joiners that fetched state at step s) is ready. Joiners are admitted only here.
2. the members run the ring; each reports ``done(epoch, ok)``.
3. decision: **commit** once no member failed and every live member reported ok; **abort** as soon as one failed
   (or all died). Only after "commit" does an island apply the outer update, so no update is half-applied; after
   "abort" the survivors redo step s in a new epoch from their kept pseudo-gradients.
4. ``commit(s, hash)``: the hash of the new global params; the canonical hash is the majority over the islands that
   applied step s (tie: the smallest); an island that differs re-syncs from a peer.

Pseudo-gradient guard (``diloco.max_norm_ratio``, the rule of ``diloco.guard`` in the in-program transport): each
``sync`` carries the island's pseudo-gradient norm (null: not finite). When the epoch forms, an island whose
pseudo-gradient is not finite, or (with 3 or more ready islands) whose norm exceeds ratio x the median of the finite
ones, is left out of the epoch: every member reduces without it alike, and it re-syncs from a peer once the step
commits. Faster failure handling: a member that dies before reporting aborts its epoch at once (the members poll the
epoch's decision while they wait on a neighbour), and an abort clears every member's readiness, so the redo epoch
holds only the islands that asked again: never one that died meanwhile.

Recovery after a restart: the coordinator waits until every member of the newest epoch mentioned by a registered
island has re-registered (or ``dead_after_s`` passed), then: run step = the largest completed step reported; an
undecided epoch for that step is resumed with the reported done-statuses (the same rule as above, so it decides as
the old coordinator would have); an island holding a result for an older step is told commit if an island that
advanced names that epoch as its last committed one, else to fetch state.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import math
import signal
import statistics
import threading
import time
from typing import Any

from intellect_jax.config import ConfigError, DilocoConfig, ElasticConfig, load_config

from . import ordering, wire

COORDINATOR_IDLE_MIN_S = 600.0
MAX_NAME = 128
MAX_HOST = 253
_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]%")


# -- what an island may tell the coordinator: every field type- and range-checked before it touches the run's state


def _int(v: Any, what: str, lo: int, hi: int = 1 << 62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {v!r:.80}")
    return v


def _name(v: Any, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME or not v.isprintable() or v.strip() != v:
        raise ValueError(f"{what} must be a printable name of 1-{MAX_NAME} characters, got {v!r:.80}")
    return v


def _names(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or len(v) > 4096:
        raise ValueError(f"{what} must be a list of island names, got {type(v).__name__}")
    return [_name(x, what) for x in v]


def _rates(v: Any, what: str = "rates") -> dict[str, float]:
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > 4096:
        raise ValueError(f"{what} must be an object of island name -> a number, got {type(v).__name__}")
    out = {}
    for k, x in v.items():
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{what}[{k!r:.40}] must be a finite number >= 0, got {x!r:.40}")
        out[_name(k, f"{what} key")] = float(x)
    return out


def _epoch(v: Any, what: str, pending: bool) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"{what} must be an object or null, got {type(v).__name__}")
    out = {"id": _int(v.get("id"), f"{what}.id", 0), "step": _int(v.get("step"), f"{what}.step", -1),
           "members": _names(v.get("members"), f"{what}.members")}
    if pending:
        out["order"] = _names(v.get("order", []), f"{what}.order")
        out["streams"] = _int(v.get("streams", 0), f"{what}.streams", 0, ordering.MAX_STREAMS)
        if v.get("status") not in ("running", "ok", "fail"):
            raise ValueError(f"{what}.status must be 'running', 'ok' or 'fail', got {v.get('status')!r:.40}")
        out["status"] = v["status"]
    return out


def check_status(st: Any) -> dict[str, Any]:
    """An island's status (register / heartbeat), validated and normalised; ValueError names the bad field."""
    if not isinstance(st, dict):
        raise ValueError(f"status must be an object, got {type(st).__name__}")
    host = st.get("advertise_host") or ""
    if not isinstance(host, str) or len(host) > MAX_HOST or not set(host) <= _HOST_CHARS:
        raise ValueError(f"advertise_host must be a host name or IP address, got {host!r:.80}")
    h = st.get("hash")
    if h is not None:
        _hash(h)
    return {"incarnation": _name(st.get("incarnation"), "incarnation"), "step": _int(st.get("step"), "step", -1),
            "hash": h, "advertise_host": host, "port": _int(st.get("port"), "port", 1, 65535),
            "rates": _rates(st.get("rates")), "rtts": _rates(st.get("rtts"), "rtts"),
            "last_epoch": _epoch(st.get("last_epoch"), "last_epoch", False),
            "pending": _epoch(st.get("pending"), "pending", True)}


def _hash(h: Any) -> str:
    if not isinstance(h, str) or not 0 < len(h) <= 128 or not h.isprintable():
        raise ValueError(f"hash must be a digest string of at most 128 characters, got {h!r:.80}")
    return h


def _norm(v: Any) -> float | None:
    """A sync's pseudo-gradient norm: a finite float >= 0, or None (the island's pseudo-gradient is not finite)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"norm must be a finite number >= 0 or null (not finite), got {v!r:.40}")
    return float(v)


def outliers(norms: dict[str, float | None], max_norm_ratio: float) -> dict[str, str]:
    """Islands to leave out of an outer step -> why: the rule of ``diloco.guard``, on the host.

    `norms`: island -> its pseudo-gradient norm (None: not finite). Non-finite ones always; with `max_norm_ratio` > 0
    and at least 3 islands, a norm above ratio x the median of the finite ones.
    """
    out = {n: "its pseudo-gradient is not finite" for n, v in norms.items() if v is None}
    finite = [v for v in norms.values() if v is not None]
    if max_norm_ratio > 0 and len(norms) >= 3 and finite:
        median = statistics.median(finite)
        for n, v in norms.items():
            if v is not None and v > max_norm_ratio * median:
                out[n] = f"its pseudo-gradient norm {v:.4g} exceeds {max_norm_ratio:g} x the median {median:.4g}"
    return out


log = logging.getLogger("intellect_jax.elastic.coordinator")

POLL_S = 1.0  # longest a blocking request waits before answering {"wait": true}


@dataclasses.dataclass
class Island:
    name: str
    incarnation: str
    addr: str = ""
    step: int = -1  # completed outer steps; -1: holds no state yet
    hash: str | None = None  # params hash after `step` completed steps, once committed
    alive: bool = True
    last_seen: float = 0.0
    hb_conn: int = 0  # id of the heartbeat connection whose close means death
    last_epoch: dict | None = None  # {"id", "step", "members"} of its last committed epoch
    pending: dict | None = None  # {"id", "step", "members", "status": running|ok|fail}
    rates: dict[str, float] = dataclasses.field(default_factory=dict)
    rtts: dict[str, float] = dataclasses.field(default_factory=dict)  # measured round trip (s) to each peer


@dataclasses.dataclass
class Epoch:
    id: int
    step: int
    members: list[str]
    order: list[str]
    streams: int = ordering.MIN_STREAMS  # TCP streams per ring link, the same on every member
    done: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> "ok" | "fail"
    decision: str | None = None
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)  # ready islands left out -> why

    def public(self, islands: dict[str, Island]) -> dict[str, Any]:
        return {"id": self.id, "step": self.step, "members": self.members, "order": self.order,
                "streams": self.streams, "addrs": {m: islands[m].addr for m in self.members}}


class Coordinator:
    """Reads ``dead_after_s``, ``min_islands``, ``max_islands``, ``encrypt``, ``coordinator_max_frame_bytes`` and
    ``recovery_grace_s`` of `cfg`; `max_norm_ratio` is the run's ``diloco.max_norm_ratio`` (0: only non-finite
    pseudo-gradients are left out)."""

    def __init__(self, cfg: ElasticConfig, run_id: str, bind: str, secret: bytes,
                 max_norm_ratio: float = DilocoConfig.max_norm_ratio):
        self.run_id = run_id
        self.max_norm_ratio = max_norm_ratio
        self.norms: dict[str, tuple[int, float | None]] = {}  # island -> (step, pseudo-gradient norm) of its sync
        self.guard_errors: dict[int, str] = {}  # step -> why no island is left to reduce it
        self.dead_after_s = cfg.dead_after_s
        self.min_islands = cfg.min_islands
        self.streams, self.link_bytes_per_s = cfg.streams, cfg.link_mbit * 1e6 / 8
        self.finished_step: int | None = None  # the newest outer step an island finished its run at
        self.islands: dict[str, Island] = {}
        self.run_step: int | None = None
        self.epoch: Epoch | None = None
        self.decisions: dict[int, tuple[str, int]] = {}  # epoch id -> (decision, step)
        self.next_epoch_id = 1
        self.ready: dict[str, int] = {}
        self.hashes: dict[int, dict[str, str]] = collections.defaultdict(dict)  # step s -> name -> hash after s
        self.canonical: dict[int, str] = {}
        self.committed: dict[int, dict] = {}  # step s -> {"id", "step", "members"} of the epoch that committed it
        self.epochs_formed = 0
        self.recovering = True
        self.started = time.monotonic()
        self.grace_s = cfg.recovery_grace_s or cfg.dead_after_s
        self.cv = threading.Condition()
        self._stop = threading.Event()
        self._conn_ids = 0
        # Islands heartbeat every heartbeat_s on one connection; their RPC connection can sit idle for a whole outer
        # step, and the client reconnects when it finds it closed. A connection silent for longer than this is
        # closed, so a peer cannot hold a thread forever.
        self.idle_timeout_s = max(COORDINATOR_IDLE_MIN_S, 6 * cfg.dead_after_s)
        self.max_islands = cfg.max_islands
        self.server = wire.Server(bind, secret, run_id, cfg.coordinator_max_frame_bytes, self._handle, "coordinator",
                                  log, idle_timeout=self.idle_timeout_s, encrypt=cfg.encrypt)
        self.port = self.server.port
        self._monitor = threading.Thread(target=self._monitor_loop, name="coordinator-monitor", daemon=True)

    def start(self) -> "Coordinator":
        self.server.start()
        self._monitor.start()
        log.info("coordinator for run %r listening on %s:%d", self.run_id, self.server.host, self.port)
        return self

    def close(self) -> None:
        self._stop.set()
        self.server.close()

    # -- connections -----------------------------------------------------------------------------------------------

    def _handle(self, conn: wire.Conn, hello: dict[str, Any]) -> None:
        name = hello.get("name")
        kind = hello.get("kind", "rpc")
        try:
            _name(name, "HELLO name")
        except ValueError as e:
            raise wire.MalformedFrame(str(e)) from None
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
                except (KeyError, TypeError, ValueError) as e:  # a bad field never reaches the run's state
                    log.warning("refused %r request from island %s (%s): %s", op, name, conn.peer, e)
                    conn.send(wire.MsgType.ERROR, {"error": f"bad {op!r} request: {e}"})
                    continue
                said_bye = said_bye or op == "bye"
                conn.send(wire.MsgType.REPLY, rep)
        except wire.PeerClosed:
            pass
        finally:
            if kind == "hb" and not said_bye:
                with self.cv:
                    isl = self.islands.get(name)
                    if isl is not None and isl.alive and isl.hb_conn == cid:
                        self._mark_dead(isl, "heartbeat connection closed (crashed or killed?)")
                        self.cv.notify_all()

    def _dispatch(self, name: str, op: str, req: dict, hb_cid: int, peer_host: str) -> dict[str, Any]:
        with self.cv:
            if op in ("register", "heartbeat"):
                isl = self._status(name, req, hb_cid, peer_host, explicit=op == "register")
                self._advance()
                self.cv.notify_all()
                rep: dict[str, Any] = {"recovering": self.recovering, "run_step": self.run_step}
                if not self.recovering:
                    rep["needs_state"] = self._needs_state(isl)
                return rep
            isl = self.islands.get(name)
            if isl is None or isl.incarnation != req.get("incarnation"):
                return {"reregister": True}
            isl.last_seen = time.monotonic()
            if not isl.alive:  # declared dead (e.g. a partition) but talking again: back as a live island
                log.info("island %s is back", name)
                isl.alive = True
            if op == "bye":
                if req.get("finished") is True:
                    self.finished_step = max(self.finished_step if self.finished_step is not None else -1, isl.step)
                    log.info("island %s finished its run at outer step %d", name, isl.step)
                self._mark_dead(isl, "left (deathrattle)", clean=True)
                self._advance()
                self.cv.notify_all()
                return {"ok": True}
            if op == "members":  # with the committed (majority) hashes a fetched state must match
                recent = sorted(self.canonical)[-8:]
                return {"run_step": self.run_step, "recovering": self.recovering,
                        "finished_step": self.finished_step,
                        "islands": [{"name": i.name, "addr": i.addr, "step": i.step, "hash": i.hash}
                                    for i in self.islands.values() if i.alive],
                        "canonical": {str(k): self.canonical[k] for k in recent},
                        "epochs": {str(k): self.committed[k] for k in sorted(self.committed)[-8:]}}
            if op == "epoch":  # polled by members waiting on a neighbour: abort at once if the epoch did
                d = self.decisions.get(_int(req.get("epoch"), "epoch", 0))
                return {"decision": d[0] if d else None}
            if op == "rates":
                isl.rates = _rates(req.get("rates"))
                isl.rtts = _rates(req.get("rtts"), "rtts")
                log.info("island %s measured links (MB/s): %s", name,
                         {k: round(v / 1e6, 1) for k, v in isl.rates.items()})
                return {"ok": True}
            waiters = {"sync": self._sync, "done": self._done, "commit": self._commit}
            if op not in waiters:
                raise ValueError(f"unknown op {op!r}")
            deadline = time.monotonic() + POLL_S
            while True:
                self._advance()
                rep = waiters[op](isl, req)
                if rep is not None:
                    self.cv.notify_all()
                    return rep
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"wait": True}
                self.cv.wait(left)

    # -- state updates (all under self.cv) -------------------------------------------------------------------------

    def _status(self, name: str, req: dict, hb_cid: int, peer_host: str, explicit: bool) -> Island:
        st = check_status(req.get("status"))
        isl = self.islands.get(name)
        if isl is None and len(self.islands) >= self.max_islands:
            raise ValueError(f"the run already has {len(self.islands)} islands, its limit (elastic.max_islands="
                             f"{self.max_islands}); raise it on the coordinator if this island is expected")
        if (isl is not None and isl.alive and isl.incarnation != st["incarnation"]
                and time.monotonic() - isl.last_seen < self.dead_after_s):
            log.warning("refused registration of %s incarnation %s: the name is in use by live incarnation %s",
                        name, st["incarnation"], isl.incarnation)
            raise ValueError(f"island name {name!r} is in use by a live island; names must be unique (a restarted "
                             f"island is accepted once the old one is declared dead)")
        if isl is None or isl.incarnation != st["incarnation"]:
            if isl is not None and isl.alive:
                self._mark_dead(isl, "replaced by a new incarnation")
            isl = Island(name, st["incarnation"])
            self.islands[name] = isl
            log.info("island %s registered (incarnation %s, step %s)", name, st["incarnation"], st["step"])
            explicit = True
        elif not isl.alive:
            log.info("island %s is back", name)
        isl.alive = True
        isl.last_seen = time.monotonic()
        if hb_cid:
            isl.hb_conn = hb_cid
        host, port = st["advertise_host"] or peer_host, st["port"]
        isl.addr = f"{host}:{port}"
        step = int(st["step"])
        isl.step = step if explicit else max(isl.step, step)
        if st.get("hash") is not None and isl.step == step:
            isl.hash = st["hash"]
            if step >= 0:  # key step-1: hash after outer step step-1 (-1: the initial params)
                self.hashes[step - 1].setdefault(name, st["hash"])
        if st.get("rates"):
            isl.rates = st["rates"]
        if st.get("rtts"):
            isl.rtts = st["rtts"]
        isl.last_epoch = st.get("last_epoch")
        isl.pending = st.get("pending")
        if isl.last_epoch:
            self.next_epoch_id = max(self.next_epoch_id, int(isl.last_epoch["id"]) + 1)
            self.committed.setdefault(isl.last_epoch["step"], isl.last_epoch)
        if isl.pending:
            self.next_epoch_id = max(self.next_epoch_id, int(isl.pending["id"]) + 1)
            e = self.epoch
            if e is not None and e.id == isl.pending["id"] and isl.pending["status"] in ("ok", "fail"):
                e.done.setdefault(name, isl.pending["status"])
        if self.run_step is not None and not self.recovering and step > self.run_step and isl.pending is None:
            log.warning("island %s claims %d completed outer steps, the run has %d", name, step, self.run_step)
        return isl

    def _needs_state(self, isl: Island) -> bool:
        if isl.step < 0:
            return self.run_step is not None and self.run_step >= 0
        if self.run_step is not None and isl.step < self.run_step:
            return True
        want = self.canonical.get(isl.step - 1)
        return want is not None and isl.hash is not None and isl.hash != want

    def _mark_dead(self, isl: Island, why: str, clean: bool = False) -> None:
        isl.alive = False
        self.ready.pop(isl.name, None)
        if clean:  # an island that said goodbye (finished or stopped) is no alarm
            log.info("island %s %s", isl.name, why)
        else:
            log.warning("island %s dead: %s", isl.name, why)
        e = self.epoch
        if (e is not None and e.decision is None and not self.recovering and isl.name in e.members
                and isl.name not in e.done
                and any(self.islands[m].alive and e.done.get(m) != "ok" for m in e.members)):
            # The others may be waiting on it in the ring: abort now rather than after their timeouts (they poll
            # the decision). If every other member already reported ok, the ring completed: commit as usual.
            self._decide(e, "abort")

    def _monitor_loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                with self.cv:
                    now = time.monotonic()
                    for isl in self.islands.values():
                        if isl.alive and now - isl.last_seen > self.dead_after_s:
                            self._mark_dead(isl, f"no heartbeat for {now - isl.last_seen:.1f} s")
                    self._advance()
                    self.cv.notify_all()
            except Exception:  # a bug must not stop failure detection for the rest of the run
                log.exception("coordinator monitor step failed; continuing")

    def _advance(self) -> None:
        if self.recovering:
            self._maybe_end_recovery()
            if self.recovering:
                return
        e = self.epoch
        if e is not None and e.decision is None:
            alive = [m for m in e.members if self.islands[m].alive]
            if any(v == "fail" for v in e.done.values()) or not alive:
                self._decide(e, "abort")
            elif all(e.done.get(m) == "ok" for m in alive):
                self._decide(e, "commit")
        if self.epoch is None:
            self._maybe_form()
        self._maybe_canonical()

    def _decide(self, e: Epoch, decision: str) -> None:
        e.decision = decision
        self.decisions[e.id] = (decision, e.step)
        self.epoch = None
        if decision == "commit":
            self.run_step = e.step + 1
            self.committed[e.step] = {"id": e.id, "step": e.step, "members": e.members}
            for m in e.members:
                if e.done.get(m) == "ok":
                    isl = self.islands[m]
                    isl.step = max(isl.step, e.step + 1)
                    isl.last_epoch = {"id": e.id, "step": e.step, "members": e.members}
                    isl.pending = None
            for name, s in list(self.ready.items()):
                if s <= e.step:
                    del self.ready[name]
            log.info("epoch %d committed: outer step %d done by %s", e.id, e.step, e.members)
        else:
            for m in e.members:  # the redo epoch takes only the islands that ask again (none that died meanwhile)
                if self.ready.get(m) == e.step:
                    del self.ready[m]
            log.warning("epoch %d aborted (outer step %d; done: %s; dead: %s); survivors redo the step", e.id,
                        e.step, e.done, [m for m in e.members if not self.islands[m].alive])

    def _maybe_form(self) -> None:
        s = self.run_step
        if s is None:
            return
        live = [i for i in self.islands.values() if i.alive]
        expected = {i.name for i in live if i.step == s and not self._needs_state(i)}
        ready = {n for n, rs in self.ready.items() if rs == s and self.islands[n].alive}
        if not ready or not expected <= ready:
            return
        if self.epochs_formed == 0 and s == 0 and len(ready) < self.min_islands:
            return
        excluded = outliers({n: self.norms[n][1] for n in ready if self.norms.get(n, (None,))[0] == s},
                            self.max_norm_ratio)
        members = sorted(ready - set(excluded))
        if not members:
            self.guard_errors[s] = (f"outer step {s}: every ready island's pseudo-gradient was left out ({excluded}); "
                                    "the run cannot go on from this state: restore the last good checkpoint, and "
                                    "lower the inner learning rate or raise diloco.max_norm_ratio")
            log.error("%s", self.guard_errors[s])
            return
        for n, why in sorted(excluded.items()):
            log.warning("outer step %d: island %s left out of the reduce: %s; it re-syncs from a peer after the "
                        "step (diloco.max_norm_ratio=%g)", s, n, why, self.max_norm_ratio)
        rates = {i.name: i.rates for i in live}
        order = ordering.ring_order(members, rates)
        self.epoch = Epoch(self.next_epoch_id, s, members, order, self._streams(order), excluded=excluded)
        self.next_epoch_id += 1
        self.epochs_formed += 1
        log.info("epoch %d: outer step %d, members %s, ring order %s (slowest link %s, longest round trip %.0f ms, "
                 "%d streams per link)", self.epoch.id, s, members, order, _fmt_rate(ordering.bottleneck(order, rates)),
                 1e3 * ordering.slowest_rtt(order, self._rtts()), self.epoch.streams)

    def _rtts(self) -> dict[str, dict[str, float]]:
        return {i.name: i.rtts for i in self.islands.values()}

    def _streams(self, order: list[str]) -> int:
        """elastic.streams, or (0) the automatic count for the ring's measured round trips."""
        return self.streams or ordering.auto_streams(order, self._rtts(), self.link_bytes_per_s)

    def _maybe_canonical(self) -> None:
        for s, hs in self.hashes.items():
            if s in self.canonical or not hs:
                continue
            waiting = [i.name for i in self.islands.values()
                       if i.alive and i.step == s + 1 and i.name not in hs]
            if waiting:
                continue
            counts = collections.Counter(hs.values())
            top = max(counts.values())
            self.canonical[s] = min(h for h, c in counts.items() if c == top)
            bad = sorted(n for n, h in hs.items() if h != self.canonical[s])
            log.info("outer step %d: params hash %s on %d islands%s", s, self.canonical[s][:16], top,
                     f"; {bad} differ and must re-sync" if bad else "")

    def _maybe_end_recovery(self) -> None:
        regs = [i for i in self.islands.values() if i.alive and i.step >= 0]
        if not regs:
            return
        newest: dict | None = None
        for i in regs:
            for ep in (i.last_epoch, i.pending):
                if ep and (newest is None or ep["id"] > newest["id"]):
                    newest = ep
        missing = [m for m in (newest["members"] if newest else []) if
                   m not in self.islands or not self.islands[m].alive]
        # No epoch named: either a fresh run (every island at step 0, and min_islands of them here, as the first
        # epoch needs), or a restart where only islands without a committed state (fresh starts that will fetch, or
        # fetchers) have registered yet: islands further ahead may still come back, and a run step taken from these
        # alone would fork the run. Wait for them (or the grace). Fewer than min_islands cannot start the run anyway,
        # so that wait has no deadline: a slow island's registration never opens the run without it.
        ahead = any(i.step > 0 for i in regs)
        if newest is None and not ahead and len(regs) < self.min_islands:
            return
        unknown = newest is None and ahead
        if (missing or unknown) and time.monotonic() - self.started < self.grace_s:
            return
        self.recovering = False
        self.run_step = max(i.step for i in regs)
        s = self.run_step
        if newest is not None:
            log.info("rebuilt view from %d islands: run at outer step %d, newest epoch %d%s", len(regs), s,
                     newest["id"], f", missing {missing}" if missing else "")
        # An undecided epoch for the current step resumes with the reported statuses.
        current = [i.pending for i in regs if i.pending and i.pending["step"] == s]
        if current:
            p = max(current, key=lambda p: p["id"])
            order = list(p.get("order", p["members"]))
            e = Epoch(p["id"], s, list(p["members"]), order, p.get("streams") or self._streams(order))
            for i in regs:
                if i.pending and i.pending["id"] == e.id and i.pending["status"] in ("ok", "fail"):
                    e.done[i.name] = i.pending["status"]
            for m in e.members:
                if m not in self.islands:
                    self.islands[m] = Island(m, "?", alive=False)
            self.epoch = e
            for i in regs:
                if i.pending and i.pending["step"] == s and i.pending["id"] != e.id:
                    self.decisions[i.pending["id"]] = ("abort", s)
            log.info("resuming undecided epoch %d (outer step %d, members %s, done %s)", e.id, s, e.members, e.done)
        for i in regs:  # results held for an older step
            p = i.pending
            if p and p["step"] < s and p["id"] not in self.decisions:
                advanced = any(j.last_epoch and j.last_epoch["id"] == p["id"] for j in regs if j.step > p["step"])
                self.decisions[p["id"]] = ("commit" if advanced else "stale", p["step"])

    # -- blocking requests: return None to keep waiting ------------------------------------------------------------

    def _sync(self, isl: Island, req: dict) -> dict[str, Any] | None:
        s = _int(req.get("step"), "step", 0)
        norm = _norm(req["norm"]) if "norm" in req else None  # a malformed field is refused at once, not after a wait
        if self.recovering:
            return None
        if self.run_step is None:
            self.run_step = s
        if s < self.run_step:
            return {"stale": True, "run_step": self.run_step}
        if s > self.run_step:
            le = isl.last_epoch
            if le is None or le["step"] != s - 1:
                return {"error": f"outer step {s} is ahead of the run ({self.run_step}); re-register"}
            # It holds a state committed (by epoch le) past what we rebuilt: the run is there; whoever is behind
            # re-syncs, and an epoch still reducing an older step is aborted rather than forking the run.
            log.warning("island %s holds outer step %d, committed in epoch %d; the run was at %d: advancing",
                        isl.name, s, le["id"], self.run_step)
            if self.epoch is not None and self.epoch.decision is None:
                self._decide(self.epoch, "abort")
            self.run_step = s
        if "norm" in req:
            self.norms[isl.name] = (s, norm)
        if s in self.guard_errors:
            return {"error": self.guard_errors[s]}
        isl.step = s
        self.ready[isl.name] = s
        self._advance()  # the last island awaited forms the epoch now and gets it in this answer
        e = self.epoch
        if e is not None and e.step == s and isl.name in e.members:
            return {"epoch": e.public(self.islands)}
        if e is not None and e.step == s and isl.name in e.excluded:
            return {"excluded": e.excluded[isl.name], "epoch_id": e.id}
        return None

    def _done(self, isl: Island, req: dict) -> dict[str, Any] | None:
        eid, s = _int(req.get("epoch"), "epoch", 0), _int(req.get("step"), "step", 0)
        if not isinstance(req.get("ok"), bool):
            raise ValueError(f"ok must be true or false, got {req.get('ok')!r:.40}")
        ok = req["ok"]
        e = self.epoch
        if eid not in self.decisions:
            if self.recovering:
                return None
            if e is None or e.id != eid:
                # Unknown epoch (e.g. from before a restart, never resumed): the step must be redone or re-fetched.
                return {"decision": "abort" if s == self.run_step else "stale", "run_step": self.run_step}
            if isl.name in e.members:
                e.done[isl.name] = "ok" if ok else "fail"
                self._advance()
            if eid not in self.decisions:
                return None
        # Decided (by this report, the last one awaited, or earlier): the answer goes out now, and the caller wakes
        # the members waiting on the same decision.
        d, _ = self.decisions[eid]
        if d == "commit" and not ok:
            return {"decision": "stale", "run_step": self.run_step}
        return {"decision": d, "run_step": self.run_step}

    def _commit(self, isl: Island, req: dict) -> dict[str, Any] | None:
        s, h = _int(req.get("step"), "step", 0), _hash(req.get("hash"))
        if self.recovering:
            return None
        if isl.step != s + 1:  # only islands that applied step s vote on its hash
            raise ValueError(f"a vote on outer step {s} from an island at step {isl.step}: only islands that "
                             "applied the step vote")
        self.hashes[s][isl.name] = h
        isl.hash = h
        self._maybe_canonical()
        if s not in self.canonical:
            return None
        want = self.canonical[s]
        return {"ok": h == want, "hash": want}


def _fmt_rate(r: float) -> str:
    return "unmeasured" if r in (0.0, float("inf")) else f"{r / 1e6:.1f} MB/s"


# --------------------------------------------------------------------------------------------------------------------
# CLI: `intellect-jax coordinator --bind HOST:PORT --secret-file FILE [--config FILE] [--elastic.key=value ...]`.
# Settings come from the config (ElasticConfig's defaults, or the islands' preset with --config); the flags below
# override single fields.

FLAGS = {  # ElasticConfig field -> help
    "dead_after_s": "no heartbeat for this long: the island is dead",
    "min_islands": "islands that must be ready before the first outer step of a fresh run",
    "coordinator_max_frame_bytes": "largest control frame accepted from an island",
    "recovery_grace_s": "after a restart, longest wait for the newest epoch's members to re-register "
                        "(0: dead_after_s)",
    "streams": "TCP streams per ring link that every island uses (0: automatic, from the measured round trips)",
    "link_mbit": "access-link rate (Mbit/s) the automatic stream count plans for",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML preset, e.g. the islands' (its elastic.* and run.name apply)")
    parser.add_argument("--bind", required=True, help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--secret-file", help="shared secret, the same file as every island's "
                                              "(default: elastic.secret_file)")
    parser.add_argument("--run-id", help="frames from another run are refused (default: elastic.run_id, else "
                                         "run.name, as on the islands)")
    defaults = ElasticConfig()
    for name, text in FLAGS.items():
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value),
                            help=f"{text} (default: elastic.{name}, {value} unless the config says otherwise)")
    parser.add_argument("--max-norm-ratio", type=float,
                        help="leave an island out of an outer step if its pseudo-gradient norm exceeds this x the "
                             "median (default: diloco.max_norm_ratio, %g unless the config says otherwise; 0: only "
                             "non-finite ones)" % DilocoConfig.max_norm_ratio)
    parser.add_argument("--port-file", default="", help="write the bound port here once listening")
    parser.add_argument("--log-level", default="INFO")


def elastic_config(args: argparse.Namespace, overrides: list[str]) -> tuple[ElasticConfig, str, float]:
    """The coordinator's ElasticConfig (the config with the flags given), run id and max_norm_ratio; raises
    ConfigError."""
    cfg = load_config(args.config, overrides)
    given = {name: getattr(args, name) for name in ("secret_file", *FLAGS) if getattr(args, name) is not None}
    diloco = {"max_norm_ratio": args.max_norm_ratio} if args.max_norm_ratio is not None else {}
    cfg = cfg.replace(elastic=dataclasses.replace(cfg.elastic, **given),
                      diloco=dataclasses.replace(cfg.diloco, **diloco))
    if not cfg.elastic.secret_file:
        raise ConfigError("the coordinator needs the islands' shared secret: pass --secret-file (or set "
                          "elastic.secret_file in the --config file)")
    return cfg.elastic, args.run_id or cfg.elastic.run_id or cfg.run.name, cfg.diloco.max_norm_ratio


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg, run_id, max_norm_ratio = elastic_config(args, overrides)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)  # absl may own root
    coord = Coordinator(cfg, run_id, args.bind, wire.load_secret(cfg.secret_file), max_norm_ratio).start()
    if args.port_file:
        from pathlib import Path
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(coord.port))
        tmp.replace(args.port_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    coord.close()
    return 0


if __name__ == "__main__":  # `python -m intellect_jax.elastic.coordinator ...` = `intellect-jax coordinator ...`
    import sys

    from intellect_jax.cli import main

    raise SystemExit(main(["coordinator", *sys.argv[1:]]))
