"""The coordinator's state machine: membership, epochs, decisions, hash votes, quarantine and recovery after a restart.
No sockets, no threads, no clock of its own (every event passes `now`): the coordinator (coordinator.py) feeds it the
islands' requests under one lock and sends its answers, and tests drive it directly.

The coordinator decides the run's facts; what an island sends about itself is a claim:

- **Epochs and steps** are assigned here. An island's claimed step and hash make it a holder of the run's state
  only when the hash is the canonical one of that step; anything else (a later step, an unknown hash) means it must
  fetch the state first, and it is never a member of an epoch until it holds the canonical state.
- **Hash votes** count only from the members of the epoch that committed the step and reported its reduce ok. The
  canonical hash of a step needs a strict majority of those voters; once the vote deadline has passed (or every live
  voter voted), a strict majority of the votes received. With an even split there is no canonical hash (logged as an
  error: nobody can tell which state is right) and the voters keep their states.
- **A joiner** installs only a state whose exact step has a canonical hash, from an island that voted for it
  (``members`` names the sources).
- **Deadlines instead of waits**: an island expected at an outer step has ``sync_timeout_s`` after the first one was
  ready; a voter has ``vote_timeout_s`` after the commit. Whoever misses one is left out of that step.
- **Quarantine**: every such miss, a lost hash vote, an exclusion by the norm guard and a ring failure (for the
  member that reported it and the peer it blamed, unless that peer died) is a strike; ``quarantine_after`` strikes
  in a row quarantine the island for ``quarantine_s``, doubling each time (at most ``QUARANTINE_MAX_S``); taking part
  in a committed step with the canonical hash clears the strikes. A redo epoch avoids putting two islands that
  blamed each other next to each other in the ring where it can, so a liar's strikes grow faster than its victims'.
- **Bounded**: every table has a bound that does not depend on what islands send (islands: ``max_islands``, dead
  ones removed after a while; steps and decisions: the most recent ones).

Recovery after a coordinator restart (it keeps no disk state): the islands re-register with their claims (the epoch
that committed their state, the epoch they are reducing in). An epoch is believed only when a strict majority of its
members (admitted names) claim the same epoch. The coordinator waits for the members of every newer claimed epoch
(or ``recovery_grace_s``), then takes the newest believed epoch: committed if one of its supporters holds its result,
else resumed with the done-statuses its members report. Only if no claimed epoch is believed does it take the word of
the survivors of the newest claim whose present members all agree, and says so in the log: the one case a lying
island can exploit is a coordinator restart during which most members of the last epoch are gone too (README,
"Threat model").
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import statistics
import time
from typing import Any, Callable

from intellect_jax.config import DilocoConfig, ElasticConfig

from . import ordering, plan
from .identity import valid_name

log = logging.getLogger("intellect_jax.elastic.coordinator")

MAX_HOST = 253
_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]%")
EPOCH_ID_MAX = 1 << 53  # JSON-safe; ids are assigned here, a claim above this is malformed
STEP_MAX = 1 << 40
KEEP_STEPS = 256  # hashes, canonical hashes and committed epochs of this many recent steps
KEEP_DECISIONS = 4096
ID_SLACK = 1 << 16  # after a restart, epoch ids resume above every claim within this distance of the believed one
MAX_RATE = 1e12  # bytes/s: a claimed link rate is clamped to this
MAX_RTT = 600.0  # s
RATE_SLACK = 0.2  # a ring must move at least this fraction of its measured bottleneck rate (or elastic.min_link_mbit)
QUARANTINE_MAX_S = 3600.0
EVENTS = 200  # recent warnings kept for the status page
RECENT_STEPS = 50  # recent outer steps kept for the status page


# -- what an island may tell the coordinator: every field type- and range-checked before it touches the run's state


def _int(v: Any, what: str, lo: int, hi: int = STEP_MAX) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {v!r:.80}")
    return v


def _name(v: Any, what: str) -> str:
    if not valid_name(v):
        raise ValueError(f"{what} must be an island name (1-64 letters, digits, . _ @ + -), got {v!r:.80}")
    return v


def _token(v: Any, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 64 or not v.isprintable():
        raise ValueError(f"{what} must be a printable string of 1-64 characters, got {v!r:.80}")
    return v


def _names(v: Any, what: str, limit: int) -> list[str]:
    if not isinstance(v, list) or len(v) > limit:
        raise ValueError(f"{what} must be a list of at most {limit} island names, got "
                         f"{type(v).__name__}{f' of {len(v)}' if isinstance(v, list) else ''}")
    out = [_name(x, what) for x in v]
    if len(set(out)) != len(out):
        raise ValueError(f"{what} names an island twice")
    return out


def _rates(v: Any, what: str, hi: float, limit: int) -> dict[str, float]:
    """island name -> a finite number >= 0, clamped to `hi`; at most `limit` entries."""
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > limit:
        raise ValueError(f"{what} must be an object of at most {limit} island name -> a number, got "
                         f"{type(v).__name__}")
    out = {}
    for k, x in v.items():
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{what}[{k!r:.40}] must be a finite number >= 0, got {x!r:.40}")
        out[_name(k, f"{what} key")] = min(float(x), hi)
    return out


def _epoch(v: Any, what: str, pending: bool, limit: int) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"{what} must be an object or null, got {type(v).__name__}")
    out = {"id": _int(v.get("id"), f"{what}.id", 1, EPOCH_ID_MAX), "step": _int(v.get("step"), f"{what}.step", -1),
           "members": _names(v.get("members"), f"{what}.members", limit)}
    if not out["members"]:
        raise ValueError(f"{what}.members is empty")
    if pending:
        order = _names(v.get("order", out["members"]), f"{what}.order", limit)
        if sorted(order) != sorted(out["members"]):
            raise ValueError(f"{what}.order must be the members in ring order")
        out["order"] = order
        topology = v.get("topology", "ring")
        if not isinstance(topology, str) or topology not in plan.TOPOLOGIES:
            raise ValueError(f"{what}.topology must be one of {sorted(plan.TOPOLOGIES)}, got {topology!r:.40}")
        out["topology"] = topology
        out["streams"] = _int(v.get("streams", 0), f"{what}.streams", 0, ordering.MAX_STREAMS)
        if v.get("status") not in ("running", "ok", "fail"):
            raise ValueError(f"{what}.status must be 'running', 'ok' or 'fail', got {v.get('status')!r:.40}")
        out["status"] = v["status"]
    return out


def check_hash(h: Any) -> str:
    if not isinstance(h, str) or not 0 < len(h) <= 128 or not h.isprintable():
        raise ValueError(f"hash must be a digest string of at most 128 characters, got {h!r:.80}")
    return h


def check_status(st: Any, limit: int = 256) -> dict[str, Any]:
    """An island's status (register / heartbeat), validated and normalised; ValueError names the bad field.
    `limit`: the most island names a list in it may hold (the coordinator's max_islands)."""
    if not isinstance(st, dict):
        raise ValueError(f"status must be an object, got {type(st).__name__}")
    host = st.get("advertise_host") or ""
    if not isinstance(host, str) or len(host) > MAX_HOST or not set(host) <= _HOST_CHARS:
        raise ValueError(f"advertise_host must be a host name or IP address, got {host!r:.80}")
    h = st.get("hash")
    return {"incarnation": _token(st.get("incarnation"), "incarnation"), "step": _int(st.get("step"), "step", -1),
            "hash": None if h is None else check_hash(h), "advertise_host": host,
            "port": _int(st.get("port"), "port", 1, 65535),
            "rates": _rates(st.get("rates"), "rates", MAX_RATE, limit),
            "rtts": _rates(st.get("rtts"), "rtts", MAX_RTT, limit),
            "last_epoch": _epoch(st.get("last_epoch"), "last_epoch", False, limit),
            "pending": _epoch(st.get("pending"), "pending", True, limit)}


def check_norm(v: Any) -> float | None:
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


def _clamped(v: Any, hi: float) -> float:
    """A number an island reports about itself for the status page: finite, in [0, hi], else 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return 0.0
    return min(hi, max(0.0, float(v)))


class Histogram:
    """Cumulative bucket counts (Prometheus' convention: bucket i counts observations <= bounds[i])."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum, self.n = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum, self.n = self.sum + v, self.n + 1
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1


def majority(votes: dict[str, str], of: int) -> str | None:
    """The hash more than half of `of` voters cast (None: none has)."""
    counts = collections.Counter(votes.values())
    if not counts:
        return None
    h, c = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    return h if c > of / 2 else None


@dataclasses.dataclass
class Island:
    name: str
    incarnation: str
    addr: str = ""
    step: int = -1  # completed outer steps of the state it holds, as it claims (believed with a canonical hash)
    hash: str | None = None  # that state's hash, as it claims (its registration, or its vote)
    alive: bool = True
    last_seen: float = 0.0
    died_at: float = 0.0
    hb_conn: int = 0  # id of the heartbeat connection whose close means death
    last_epoch: dict | None = None  # its claim: {"id", "step", "members"} of the epoch that committed its state
    pending: dict | None = None  # its claim: {"id", "step", "members", "status": running|ok|fail}
    rates: dict[str, float] = dataclasses.field(default_factory=dict)
    rtts: dict[str, float] = dataclasses.field(default_factory=dict)  # measured round trip (s) to each peer
    strikes: int = 0
    quarantines: int = 0
    quarantined_until: float = 0.0
    quarantine_why: str = ""


@dataclasses.dataclass
class Epoch:
    id: int
    step: int
    members: list[str]
    order: list[str]
    streams: int = ordering.MIN_STREAMS  # TCP streams per ring link, the same on every member
    min_rate: float = 0.0  # bytes/s every ring link must keep up (the members' reduce deadline)
    formed_at: float = 0.0
    waited: float = 0.0  # from the first island ready to the formation (the sync barrier)
    stats: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)  # member -> (reduce s, bytes sent)
    done: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> "ok" | "fail"
    # failed member -> Report, kept after an abort for a while: every member's report helps tell the ring's broken
    # link from the failures it caused downstream
    reports: dict[str, "Report"] = dataclasses.field(default_factory=dict)
    decision: str | None = None
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)  # ready islands left out -> why
    topology: str = "ring"  # the reduce plan over `order` (plan.TOPOLOGIES)

    def public(self, islands: dict[str, Island], key_of: Callable[[str], str | None]) -> dict[str, Any]:
        """What the members are told: the reduce plan (``plan.describe``: topology and order), its streams and rate
        floor, and each member's address and key."""
        return {"id": self.id, "step": self.step, "members": self.members, **plan.describe(self.topology, self.order),
                "streams": self.streams, "min_rate": self.min_rate,
                "addrs": {m: islands[m].addr for m in self.members}, "keys": {m: key_of(m) for m in self.members}}


@dataclasses.dataclass(frozen=True)
class Report:
    """A member's failed reduce, as it reports it (ring.RingError): the peer it blames, the share of what it was owed
    that arrived, how the link failed, and whether it came before the epoch was aborted."""

    blame: str | None
    progress: float
    cause: str
    first: bool


CAUSES = ("closed", "timeout", "bad", "cancelled")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the state machine reads of the run's config (defaults: ElasticConfig's, the one place they live)."""

    min_islands: int = ElasticConfig.min_islands
    max_islands: int = ElasticConfig.max_islands
    max_norm_ratio: float = DilocoConfig.max_norm_ratio
    dead_after_s: float = ElasticConfig.dead_after_s
    recovery_grace_s: float = ElasticConfig.dead_after_s  # elastic.recovery_grace_s 0: dead_after_s
    sync_timeout_s: float = ElasticConfig.sync_timeout_s
    vote_timeout_s: float = ElasticConfig.vote_timeout_s
    quarantine_s: float = ElasticConfig.quarantine_s
    quarantine_after: int = ElasticConfig.quarantine_after
    streams: int = ElasticConfig.streams  # 0: automatic, from the measured round trips
    link_bytes_per_s: float = ElasticConfig.link_mbit * 1e6 / 8
    min_rate: float = ElasticConfig.min_link_mbit * 1e6 / 8  # bytes/s: the slowest a ring link may be

    @classmethod
    def of(cls, cfg: ElasticConfig, max_norm_ratio: float) -> "Settings":
        return cls(min_islands=cfg.min_islands, max_islands=cfg.max_islands, max_norm_ratio=max_norm_ratio,
                   dead_after_s=cfg.dead_after_s, recovery_grace_s=cfg.recovery_grace_s or cfg.dead_after_s,
                   sync_timeout_s=cfg.sync_timeout_s, vote_timeout_s=cfg.vote_timeout_s,
                   quarantine_s=cfg.quarantine_s, quarantine_after=cfg.quarantine_after, streams=cfg.streams,
                   link_bytes_per_s=cfg.link_mbit * 1e6 / 8, min_rate=cfg.min_link_mbit * 1e6 / 8)


class RunState:
    """The run as the coordinator knows it. Every method is called under the coordinator's lock; methods that answer
    a blocking request return None while the caller should keep waiting."""

    def __init__(self, cfg: Settings, now: float, key_of: Callable[[str], str | None] = lambda name: None):
        self.cfg = cfg
        self.key_of = key_of  # an island's admitted public key (hex), which its peers check
        self.islands: dict[str, Island] = {}
        self.run_step: int | None = None
        self.epoch: Epoch | None = None
        self.decisions: collections.OrderedDict[int, tuple[str, int]] = collections.OrderedDict()
        self.next_epoch_id = 1
        self.ready: dict[str, int] = {}
        self.first_ready: dict[int, float] = {}  # step -> when the first island was ready for it
        self.norms: dict[str, tuple[int, float | None]] = {}  # island -> (step, pseudo-gradient norm) of its sync
        self.guard_errors: dict[int, str] = {}  # step -> why no island is left to reduce it
        self.hashes: dict[int, dict[str, str]] = {}  # step s -> voter -> hash after s
        self.canonical: dict[int, str] = {}
        self.contested: dict[int, dict[str, str]] = {}  # steps whose voters split evenly -> the votes
        self.committed: dict[int, dict] = {}  # step s -> {"id", "step", "members", "ok", "at"} of its epoch
        self.disputes: dict[int, set[frozenset]] = {}  # step -> pairs of members that blamed each other
        self.held: dict[int, Epoch] = {}  # aborted epochs whose strikes wait for the members' reports
        self.held_until: list[tuple[float, int]] = []
        self.finished_step: int | None = None  # the newest outer step an island finished its run at
        self.epochs_formed = 0
        self.recovering = True
        self.started = now
        # What an operator sees (status.py): counts by outcome and reason, recent events and outer steps, bounded.
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.aborted_step: int | None = None  # the step of the last aborted epoch (its next epoch is a redo)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS)
        self.hist = {"reduce_seconds": Histogram((0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000)),
                     "reduce_bytes": Histogram(tuple(10.0 ** k for k in range(3, 13)))}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_STEPS)
        self.rebuilt_from: str = ""  # how the last recovery decided the run's state ("" for a fresh run)

    def _say(self, level: int, kind: str, msg: str, *args: Any) -> None:
        """Logs a warning or error and keeps it (with its kind) among the recent events of the status page."""
        log.log(level, msg, *args)
        text = msg % args if args else msg
        self.events.append({"time": time.time(), "level": logging.getLevelName(level).lower(), "kind": kind,
                            "text": text[:500]})

    # -- registration ----------------------------------------------------------------------------------------------

    def register(self, name: str, status: Any, hb_cid: int, peer_host: str, explicit: bool, now: float) -> Island:
        st = check_status(status, self.cfg.max_islands)
        isl = self.islands.get(name)
        if isl is None and len(self.islands) >= self.cfg.max_islands:
            self._forget_dead(now, force=True)
            if len(self.islands) >= self.cfg.max_islands:
                raise ValueError(f"the run already has {len(self.islands)} live islands, its limit "
                                 f"(elastic.max_islands={self.cfg.max_islands}); raise it on the coordinator if this "
                                 "island is expected")
        if (isl is not None and isl.alive and isl.incarnation != st["incarnation"]
                and now - isl.last_seen < self.cfg.dead_after_s):
            self._say(logging.WARNING, "refused", "refused registration of %s incarnation %s: the name is in use "
                      "by live incarnation %s", name, st["incarnation"], isl.incarnation)
            raise ValueError(f"island name {name!r} is in use by a live island; names must be unique (a restarted "
                             f"island is accepted once the old one is declared dead)")
        if isl is None or isl.incarnation != st["incarnation"]:
            if isl is not None and isl.alive:
                self.mark_dead(isl, "replaced by a new incarnation", now=now)
            old = isl
            isl = Island(name, st["incarnation"])
            if old is not None:  # a restart does not clear a quarantine or its history
                isl.strikes, isl.quarantines = old.strikes, old.quarantines
                isl.quarantined_until, isl.quarantine_why = old.quarantined_until, old.quarantine_why
            self.islands[name] = isl
            log.info("island %s registered (incarnation %s, step %s)", name, st["incarnation"], st["step"])
            explicit = True
        elif not isl.alive:
            log.info("island %s is back", name)
        isl.alive = True
        isl.last_seen = now
        if hb_cid:
            isl.hb_conn = hb_cid
        isl.addr = f"{st['advertise_host'] or peer_host}:{st['port']}"
        # A heartbeat's status may lag a commit decided here (which already moved the island on): it only moves
        # the island forward; a registration says where it is now.
        step = st["step"]
        if explicit or step > isl.step:
            isl.step, isl.hash = step, st["hash"]
        elif step == isl.step and st["hash"] is not None:
            isl.hash = st["hash"]
        if isl.hash is not None and isl.step == step:
            self._vote_from_status(isl, now)
        known = set(self.islands)
        if st["rates"]:
            isl.rates = {k: v for k, v in st["rates"].items() if k in known}
        if st["rtts"]:
            isl.rtts = {k: v for k, v in st["rtts"].items() if k in known}
        isl.last_epoch, isl.pending = st["last_epoch"], st["pending"]
        e = self.epoch
        if (e is not None and isl.pending and e.id == isl.pending["id"] and name in e.members
                and isl.pending["status"] in ("ok", "fail") and e.decision is None):
            e.done.setdefault(name, isl.pending["status"])
        if self.run_step is not None and not self.recovering and step > self.run_step:
            self._say(logging.WARNING, "claim", "island %s claims %d completed outer steps, the run has %d: not "
                      "believed (it fetches the state)", name, step, self.run_step)
        return isl

    def _vote_from_status(self, isl: Island, now: float) -> None:
        """A re-sent status is a vote when the island is a voter of the step it holds and has not voted yet (after a
        coordinator restart, the votes are re-sent this way)."""
        s = isl.step - 1
        c = self.committed.get(s)
        if c is not None and isl.name in c["ok"] and isl.hash is not None:
            self._vote(s, isl.name, isl.hash, now)

    def _vote(self, s: int, name: str, h: str, now: float) -> None:
        """A voter's hash of step s (its first counts): judged at once if the majority already decided, else it may
        decide it."""
        votes = self.hashes.setdefault(s, {})
        first = name not in votes
        if first:
            votes[name] = h
        if s not in self.canonical:
            self._maybe_canonical(s, now)  # a re-sent vote may find the vote timeout passed
        elif first:  # the majority had decided before this vote came
            self._judge(s, name, h, now)
            self._note_votes(s, now)

    def holds_canonical(self, isl: Island) -> bool:
        """Whether the state the island says it holds is the run's: the canonical hash of its step, or (while that
        step's vote is open or split) it is one of the step's voters; a fresh run's islands before the first vote."""
        s = isl.step - 1
        if isl.step < 0:
            return False
        c = self.committed.get(s)
        voter = c is not None and isl.name in c["ok"]
        if s in self.canonical:
            if voter and isl.hash is None and isl.name not in self.hashes.get(s, {}):
                return True  # the majority decided before its vote came; the vote will tell
            return isl.hash == self.canonical[s]
        if c is not None:
            return voter
        return isl.step == 0 and -1 not in self.canonical and (self.run_step in (None, 0))

    def needs_state(self, isl: Island) -> bool:
        if self.run_step is None:
            return False
        if isl.step != self.run_step:
            return True  # behind, or a claim ahead of the run that no committed epoch backs
        return not self.holds_canonical(isl)

    def quarantined(self, isl: Island, now: float) -> float:
        """Seconds of quarantine left (0: none)."""
        return max(0.0, isl.quarantined_until - now)

    # -- death, quarantine, removal --------------------------------------------------------------------------------

    def mark_dead(self, isl: Island, why: str, clean: bool = False, now: float = 0.0) -> None:
        isl.alive = False
        isl.died_at = now
        self.ready.pop(isl.name, None)
        if clean:  # an island that said goodbye (finished or stopped) is no alarm
            log.info("island %s %s", isl.name, why)
        else:
            self._say(logging.WARNING, "dead", "island %s dead: %s", isl.name, why)
        e = self.epoch
        if (e is not None and e.decision is None and not self.recovering and isl.name in e.members
                and isl.name not in e.done
                and any(self.islands[m].alive and e.done.get(m) != "ok" for m in e.members)):
            # The others may be waiting on it in the ring: abort now rather than after their timeouts (they poll
            # the decision). If every other member already reported ok, the ring completed: commit as usual.
            self._decide(e, "abort", now)

    def strike(self, isl: Island, why: str, now: float, kind: str = "other") -> None:
        """One strike of `kind` (late, excluded, vote timeout, lost vote, blamed, reported, unplaced)."""
        self.counts["strikes", kind] += 1
        isl.strikes += 1
        if isl.strikes < self.cfg.quarantine_after:
            self._say(logging.WARNING, "strike", "island %s: strike %d of %d (%s)", isl.name, isl.strikes,
                      self.cfg.quarantine_after, why)
            return
        d = min(QUARANTINE_MAX_S, self.cfg.quarantine_s * 2 ** isl.quarantines)
        isl.quarantines += 1
        self.counts["quarantines", kind] += 1
        isl.strikes = 0
        isl.quarantined_until = now + d
        isl.quarantine_why = why
        self.ready.pop(isl.name, None)
        self._say(logging.WARNING, "quarantine", "island %s quarantined for %.0f s (quarantine %d; the last of %d "
                  "strikes in a row: %s); the others go on without it", isl.name, d, isl.quarantines,
                  self.cfg.quarantine_after, why)

    def clear_strikes(self, name: str) -> None:
        isl = self.islands.get(name)
        if isl is not None:
            isl.strikes = 0

    def forget(self, name: str, why: str, now: float) -> None:
        """Removes an island (revoked by the operator): dead first, then out of the table."""
        isl = self.islands.get(name)
        if isl is None:
            return
        if isl.alive:
            self.mark_dead(isl, why, now=now)
        if self.epoch is None or name not in self.epoch.members:
            del self.islands[name]

    def _forget_dead(self, now: float, force: bool = False) -> None:
        """Dead islands leave the table after a while (or at once when it is full), unless the current epoch or the
        recovery still names them."""
        if self.recovering:
            return
        keep_s = max(60.0, 6 * self.cfg.dead_after_s)
        busy = set(self.epoch.members) if self.epoch is not None else set()
        dead = sorted((i for i in self.islands.values() if not i.alive and i.name not in busy),
                      key=lambda i: i.died_at)
        for i in dead:
            if force or now - i.died_at > keep_s:
                del self.islands[i.name]
                self.norms.pop(i.name, None)
                if force:
                    return

    # -- the clock -------------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for isl in self.islands.values():
            if isl.alive and now - isl.last_seen > self.cfg.dead_after_s:
                self.mark_dead(isl, f"no heartbeat for {now - isl.last_seen:.1f} s", now=now)
        self._forget_dead(now)
        self.advance(now)

    def advance(self, now: float) -> None:
        if self.recovering:
            self._maybe_end_recovery(now)
            if self.recovering:
                return
        e = self.epoch
        if e is not None and e.decision is None:
            alive = [m for m in e.members if self.islands[m].alive]
            if any(v == "fail" for v in e.done.values()) or not alive:
                self._decide(e, "abort", now)
            elif all(e.done.get(m) == "ok" for m in alive):
                self._decide(e, "commit", now)
        self._release_strikes(now)
        if self.epoch is None:
            self._maybe_form(now)
        for s in list(self.committed):
            self._maybe_canonical(s, now)

    # -- epochs ----------------------------------------------------------------------------------------------------

    def _decide(self, e: Epoch, decision: str, now: float) -> None:
        e.decision = decision
        self.counts["epochs", "committed" if decision == "commit" else "aborted"] += 1
        self.decisions[e.id] = (decision, e.step)
        while len(self.decisions) > KEEP_DECISIONS:
            self.decisions.popitem(last=False)
        self.epoch = None
        if decision == "commit":
            self.run_step = e.step + 1
            ok = [m for m in e.members if e.done.get(m) == "ok"]
            self.committed[e.step] = {"id": e.id, "step": e.step, "members": e.members, "ok": ok, "at": now}
            for m in ok:
                isl = self.islands[m]
                isl.step, isl.hash = e.step + 1, None  # its vote says the hash
                isl.last_epoch = {"id": e.id, "step": e.step, "members": e.members}
                isl.pending = None
            for name, s in list(self.ready.items()):
                if s <= e.step:
                    del self.ready[name]
            self._trim(e.step)
            seconds = max((v[0] for v in e.stats.values()), default=0.0)
            sent = sum(v[1] for v in e.stats.values())
            self.hist["reduce_seconds"].observe(seconds)
            self.hist["reduce_bytes"].observe(sent)
            self.recent.append({"step": e.step, "epoch": e.id, "members": e.members, "time": time.time(),
                                "barrier_s": e.waited, "outer_s": now - e.formed_at + e.waited if e.formed_at else None,
                                "reduce_s": seconds, "bytes": sent, "hash": None, "agree": None})
            log.info("epoch %d committed: outer step %d done by %s", e.id, e.step, e.members)
            return

        self._attribute(e, now)
        self.aborted_step = e.step
        self.first_ready.pop(e.step, None)  # the redo's sync deadline counts from its first island
        for m in e.members:  # the redo epoch takes only the islands that ask again (none that died meanwhile)
            if self.ready.get(m) == e.step:
                del self.ready[m]
        self._say(logging.WARNING, "abort", "epoch %d aborted (outer step %d; done: %s; dead: %s); survivors redo "
                  "the step", e.id, e.step, e.done, [m for m in e.members if not self.islands[m].alive])

    def _attribute(self, e: Epoch, now: float) -> None:
        """Holds an aborted epoch for dead_after_s before striking anyone: the members' later reports come in (each
        names the peer whose link failed it and how much of what it was owed arrived), and if a member dies
        meanwhile its death explains the failure (a crashed island breaks the ring for its neighbours) and nobody
        is struck. The redo of the step waits for that judgement (unless a member is already dead: then the redo
        goes at once without it), so repeated failures meet their strikes, and the redo's ring keeps the disputing
        pair apart, before the next attempt."""
        dead = any(m in self.islands and not self.islands[m].alive for m in e.members)
        if e.reports and not dead and len(self.held) < KEEP_DECISIONS:
            self.held[e.id] = e
            self.held_until.append((now + self.cfg.dead_after_s, e.id))
        else:
            self.counts["aborts", "a member died" if dead else "unexplained"] += 1

    def _release_strikes(self, now: float) -> None:
        """Strikes for a held aborted epoch, from all its members' reports:

        - a report, after the abort, that its peer closed the link is a cascade when that peer reported it was
          cancelled (a member stops its ring when the epoch is aborted): it is set aside (a close before the abort
          cannot be a cancellation's);
        - of the reports left that name a peer, the one(s) with the least progress point at the link that broke
          first (the failures downstream of it saw more arrive): that reporter and the peer it blames are struck (a
          two-sided dispute: either may lie) and kept apart in the redo's ring;
        - if none is left, the members that reported a failure before the abort are struck (a failure nobody else
          can place)."""
        while self.held_until and self.held_until[0][0] <= now:
            _, eid = self.held_until.pop(0)
            e = self.held.pop(eid)
            dead = [m for m in e.members if m in self.islands and not self.islands[m].alive]
            if dead:
                log.info("epoch %d's failed reduce is explained by the death of %s: no strikes", eid, dead)
                self.counts["aborts", "a member died"] += 1
                continue
            log.info("epoch %d's failed reduce, as its members report it: %s", eid, "; ".join(
                f"{m} blames {r.blame} ({r.cause}, {100 * r.progress:.0f}% arrived{', first' if r.first else ''})"
                for m, r in sorted(e.reports.items())))
            kept = {m: r for m, r in e.reports.items()
                    if r.blame is not None and r.blame in e.members and r.blame != m and r.cause != "cancelled"
                    and not (r.cause == "closed" and not r.first and e.reports.get(r.blame) is not None
                             and e.reports[r.blame].cause == "cancelled")}
            strikes: dict[str, tuple[str, str]] = {}
            if kept:
                least = min(r.progress for r in kept.values())
                for m, r in sorted(kept.items()):
                    if r.progress <= least + 0.01:
                        self.disputes.setdefault(e.step, set()).add(frozenset((m, r.blame)))
                        strikes.setdefault(m, ("reported", f"reported epoch {eid}'s reduce failed ({r.cause}), "
                                                           f"blaming {r.blame}"))
                        strikes.setdefault(r.blame, ("blamed", f"blamed by {m} for epoch {eid}'s failed reduce "
                                                               f"({r.cause})"))
            else:
                strikes = {m: ("unplaced", f"reported epoch {eid}'s reduce failed ({r.cause}), and no report places "
                                           "the failure") for m, r in e.reports.items() if r.first}
            self.counts["aborts", "a peer blamed" if kept else "unplaced failure"] += 1
            for name, (kind, why) in strikes.items():
                if name in self.islands:
                    self.strike(self.islands[name], why, now, kind)

    def _trim(self, step: int) -> None:
        for table in (self.hashes, self.canonical, self.contested, self.committed, self.disputes, self.first_ready,
                      self.guard_errors):
            for s in [s for s in table if s < step - KEEP_STEPS]:
                del table[s]

    def _maybe_form(self, now: float) -> None:
        s = self.run_step
        if s is None:
            return
        if any(e.step == s for e in self.held.values()):
            return  # a failed reduce of this step is still being judged: its redo waits (at most dead_after_s)
        live = [i for i in self.islands.values() if i.alive and not self.quarantined(i, now)]
        for n in [n for n in self.ready if self.quarantined(self.islands[n], now)]:
            del self.ready[n]
        expected = {i.name for i in live if i.step == s and not self.needs_state(i)}
        ready = {n for n, rs in self.ready.items() if rs == s and self.islands[n].alive}
        if not ready:
            return
        waited = now - self.first_ready.get(s, now)
        # A fresh run's first epoch waits for min_islands ready ones, as any epoch for the expected ones: up to
        # sync_timeout_s after the first (an island that registered but never syncs cannot hold the run's start).
        if (self.epochs_formed == 0 and s == 0 and len(ready) < self.cfg.min_islands
                and waited < self.cfg.sync_timeout_s):
            return
        late = expected - ready
        if late and waited < self.cfg.sync_timeout_s:
            return
        excluded = outliers({n: self.norms[n][1] for n in ready if self.norms.get(n, (None,))[0] == s},
                            self.cfg.max_norm_ratio)
        if s == 0 and -1 not in self.canonical:
            excluded.update(self._initial_vote(ready - set(excluded)))
        members = sorted(ready - set(excluded))
        if not members:
            if s not in self.guard_errors:
                self.guard_errors[s] = (f"outer step {s}: every ready island's pseudo-gradient was left out "
                                        f"({excluded}); the run cannot go on from this state: restore the last good "
                                        "checkpoint, and lower the inner learning rate or raise "
                                        "diloco.max_norm_ratio")
                self._say(logging.ERROR, "guard", "%s", self.guard_errors[s])
            return
        if late:
            self._say(logging.WARNING, "late", "outer step %d: %s not ready within %g s of the first island; the "
                      "step goes on without them (they re-sync from a peer)", s, sorted(late), self.cfg.sync_timeout_s)
            for n in sorted(late):
                self.strike(self.islands[n], f"not ready for outer step {s} within elastic.sync_timeout_s="
                                             f"{self.cfg.sync_timeout_s:g} s of the first island", now, "late")
                self.counts["excluded", "late"] += 1
        for n, why in sorted(excluded.items()):
            self._say(logging.WARNING, "excluded", "outer step %d: island %s left out of the reduce: %s; it re-syncs "
                      "from a peer after the step (diloco.max_norm_ratio=%g)", s, n, why, self.cfg.max_norm_ratio)
            self.strike(self.islands[n], f"left out of outer step {s}: {why}", now, "excluded")
            self.counts["excluded", "guard" if "pseudo-gradient" in why else "initial state"] += 1
        rates = {i.name: i.rates for i in live}
        order = ordering.ring_order(members, rates, avoid=self.disputes.get(s, set()))
        e = Epoch(self.next_epoch_id, s, members, order, self._streams(order), self._min_rate(order, rates),
                  excluded=excluded, formed_at=now, waited=waited)
        self.counts["epochs", "formed"] += 1
        if s == self.aborted_step:
            self.counts["epochs", "redo"] += 1
        self.epoch = e
        self.next_epoch_id += 1
        self.epochs_formed += 1
        log.info("epoch %d: outer step %d, members %s, ring order %s (slowest link %s, longest round trip %.0f ms, "
                 "%d streams per link, links must move at least %s)", e.id, s, members, order,
                 _fmt_rate(ordering.bottleneck(order, rates)), 1e3 * ordering.slowest_rtt(order, self._rtts()),
                 e.streams, _fmt_rate(e.min_rate))

    def _initial_vote(self, ready: set[str]) -> dict[str, str]:
        """The fresh run's first epoch: the initial parameters' canonical hash from its islands' registrations
        (strict majority; an even split takes the smallest and says so); the others are left out of the step and
        fetch the state after it."""
        votes = {n: self.islands[n].hash for n in ready if self.islands[n].hash is not None}
        if not votes:
            return {}
        h = majority(votes, len(votes))  # type: ignore[arg-type]
        if h is None:
            h = min(votes.values())  # type: ignore[type-var]
            self._say(logging.ERROR, "split", "the first islands disagree on the initial parameters with no "
                      "majority (%s); taking the smallest hash: check that every island uses the same model config "
                      "and seed", votes)
        self.canonical[-1] = h  # type: ignore[assignment]
        return {n: "its initial parameters differ from the majority's (another model config or seed?)"
                for n, v in votes.items() if v != h}

    def _rtts(self) -> dict[str, dict[str, float]]:
        return {i.name: i.rtts for i in self.islands.values()}

    def _streams(self, order: list[str]) -> int:
        """elastic.streams, or (0) the automatic count for the ring's measured round trips."""
        return self.cfg.streams or ordering.auto_streams(order, self._rtts(), self.cfg.link_bytes_per_s)

    def _min_rate(self, order: list[str], rates: dict[str, dict[str, float]]) -> float:
        """The rate every ring link must keep (the members' reduce deadline): a fraction of the slowest link the
        islands measured, never below elastic.min_link_mbit."""
        b = ordering.bottleneck(order, rates)
        measured = RATE_SLACK * b if 0 < b < math.inf else 0.0
        return max(self.cfg.min_rate, measured)

    # -- requests (the caller re-asks while they return None) ------------------------------------------------------

    def sync(self, isl: Island, req: dict, now: float) -> dict[str, Any] | None:
        s = _int(req.get("step"), "step", 0)
        norm = check_norm(req["norm"]) if "norm" in req else None  # a malformed field is refused at once
        left = self.quarantined(isl, now)
        if left:
            return {"quarantined": left, "why": isl.quarantine_why}
        if self.recovering:
            return None
        if self.run_step is None:
            self.run_step = s
        if s != self.run_step or (isl.step == s and self.needs_state(isl)):
            return {"stale": True, "run_step": self.run_step}
        if "norm" in req:
            self.norms[isl.name] = (s, norm)
        if s in self.guard_errors:
            return {"error": self.guard_errors[s]}
        if isl.step != s:  # it says it is at s without holding s's state
            return {"stale": True, "run_step": self.run_step}
        if isl.name not in self.ready:
            self.first_ready.setdefault(s, now)
        self.ready[isl.name] = s
        self.advance(now)  # the last island awaited forms the epoch now and gets it in this answer
        e = self.epoch
        if e is not None and e.step == s and isl.name in e.members:
            return {"epoch": e.public(self.islands, self.key_of)}
        if e is not None and e.step == s and isl.name in e.excluded:
            return {"excluded": e.excluded[isl.name], "epoch_id": e.id}
        if s != self.run_step:
            return {"stale": True, "run_step": self.run_step}
        return None

    def done(self, isl: Island, req: dict, now: float) -> dict[str, Any] | None:
        eid, s = _int(req.get("epoch"), "epoch", 0, EPOCH_ID_MAX), _int(req.get("step"), "step", 0)
        if not isinstance(req.get("ok"), bool):
            raise ValueError(f"ok must be true or false, got {req.get('ok')!r:.40}")
        ok = req["ok"]
        blame = req.get("blame")
        blame = blame if valid_name(blame) else None
        progress = req.get("progress")
        # What arrived before the failure (a report that does not say counts as nothing: the first link to break)
        progress = min(1.0, max(0.0, float(progress))) if isinstance(progress, (int, float)) and not isinstance(
            progress, bool) and math.isfinite(progress) else 0.0
        cause = req.get("cause") if req.get("cause") in CAUSES else "bad"
        held = self.held.get(eid)
        if not ok and held is not None and isl.name in held.members:  # a later report of an aborted epoch
            held.reports.setdefault(isl.name, Report(blame, progress, cause, False))
        e = self.epoch
        if eid not in self.decisions:
            if self.recovering:
                return None
            if e is None or e.id != eid:
                # Unknown epoch (e.g. from before a restart, never resumed): the step must be redone or re-fetched.
                return {"decision": "abort" if s == self.run_step else "stale", "run_step": self.run_step}
            if isl.name in e.members and isl.name not in e.done:
                e.done[isl.name] = "ok" if ok else "fail"
                if not ok:
                    e.reports[isl.name] = Report(blame, progress, cause, True)
                else:
                    e.stats[isl.name] = (_clamped(req.get("seconds"), 1e6), int(_clamped(req.get("bytes"), 1e15)))
                self.advance(now)
            if eid not in self.decisions:
                return None
        d, _ = self.decisions[eid]
        if d == "commit" and not ok:
            return {"decision": "stale", "run_step": self.run_step}
        return {"decision": d, "run_step": self.run_step}

    def commit(self, isl: Island, req: dict, now: float) -> dict[str, Any] | None:
        s, h = _int(req.get("step"), "step", 0), check_hash(req.get("hash"))
        if self.recovering:
            return None
        c = self.committed.get(s)
        if c is None or isl.name not in c["ok"]:
            raise ValueError(f"a vote on outer step {s} from {isl.name}, which is not one of the members that "
                             "reduced it: only they vote")
        votes = self.hashes.get(s, {})
        if isl.name in votes and votes[isl.name] != h:
            raise ValueError(f"{isl.name} already voted {votes[isl.name][:16]} on outer step {s}")
        if isl.step == s + 1:
            isl.hash = h
        self._vote(s, isl.name, h, now)
        if s in self.canonical:
            want = self.canonical[s]
            return {"ok": h == want, "hash": want}
        if s in self.contested:
            return {"ok": True, "hash": None, "contested": True}
        return None

    def _maybe_canonical(self, s: int, now: float) -> None:
        c = self.committed.get(s)
        if c is None or s in self.canonical or s in self.contested:
            return
        voters = c["ok"]
        votes = {n: h for n, h in self.hashes.get(s, {}).items() if n in voters}
        h = majority(votes, len(voters))
        if h is None:
            waiting = [n for n in voters if n not in votes and n in self.islands and self.islands[n].alive]
            if waiting and now - c["at"] < self.cfg.vote_timeout_s:
                return
            if not votes:
                return
            for n in waiting:
                self.strike(self.islands[n], f"did not vote on outer step {s} within elastic.vote_timeout_s="
                                             f"{self.cfg.vote_timeout_s:g} s", now, "vote timeout")
            h = majority(votes, len(votes))
            if h is None:
                self.contested[s] = dict(votes)
                self.counts["splits", "no majority"] += 1
                for r in self.recent:
                    if r["step"] == s:
                        r["hash"], r["agree"], r["voters"] = "split", 0, len(voters)
                self._say(logging.ERROR, "split", "outer step %d: the members' hashes split with no majority (%s): "
                          "their states differ and nobody can tell which is right; each keeps its own (with 3 or "
                          "more islands a majority decides)", s, {n: v[:16] for n, v in sorted(votes.items())})
                return
        self.canonical[s] = h
        bad = sorted(n for n, v in votes.items() if v != h)
        self._note_votes(s, now)
        log.info("outer step %d: params hash %s on %d of %d members%s", s, h[:16], len(votes) - len(bad),
                 len(voters), f"; {bad} differ and must re-sync" if bad else "")
        for n, v in votes.items():
            self._judge(s, n, v, now, quiet=True)

    def _note_votes(self, s: int, now: float) -> None:
        """The status page's row of step s: how many of its voters voted the canonical hash so far."""
        c = self.committed.get(s)
        for r in self.recent:
            if r["step"] == s and c is not None:
                votes = self.hashes.get(s, {})
                r["hash"], r["voters"] = self.canonical[s], len(c["ok"])
                r["agree"] = sum(votes.get(n) == self.canonical[s] for n in c["ok"])
                r.setdefault("vote_s", now - c["at"])

    def _judge(self, s: int, name: str, h: str, now: float, quiet: bool = False) -> None:
        """A vote against the canonical hash of step s: a match clears the voter's strikes, a mismatch is one."""
        if h == self.canonical[s]:
            self.clear_strikes(name)
            return
        if not quiet:
            log.info("outer step %d: ['%s'] differ and must re-sync (voted %s, the run's hash is %s)", s, name,
                     h[:16], self.canonical[s][:16])
        if name in self.islands:
            self.strike(self.islands[name], f"its hash after outer step {s} differs from the majority's", now,
                        "lost vote")

    def bye(self, isl: Island, finished: bool, now: float) -> None:
        if finished:
            self.finished_step = max(self.finished_step if self.finished_step is not None else -1, isl.step)
            log.info("island %s finished its run at outer step %d", isl.name, isl.step)
        self.mark_dead(isl, "left (deathrattle)", clean=True, now=now)

    def set_rates(self, isl: Island, req: dict) -> None:
        known = set(self.islands)
        isl.rates = {k: v for k, v in _rates(req.get("rates"), "rates", MAX_RATE, self.cfg.max_islands).items()
                     if k in known}
        isl.rtts = {k: v for k, v in _rates(req.get("rtts"), "rtts", MAX_RTT, self.cfg.max_islands).items()
                    if k in known}
        clamped = sorted(k for k, v in {**isl.rates, **isl.rtts}.items() if v in (MAX_RATE, MAX_RTT))
        if clamped:
            self._say(logging.WARNING, "clamped", "island %s reported implausible link measurements to %s: clamped "
                      "(rates to %g B/s, round trips to %g s)", isl.name, clamped, MAX_RATE, MAX_RTT)
        log.info("island %s measured links (MB/s): %s", isl.name, {k: round(v / 1e6, 1) for k, v in isl.rates.items()})

    def sources(self) -> list[dict[str, Any]]:
        """The live islands, each marked whether a fetcher may take the state from it: it holds the run's step, that
        step has a canonical hash, and the island voted (or registered) that hash."""
        out = []
        for i in self.islands.values():
            if not i.alive:
                continue
            want = self.canonical.get(i.step - 1)
            out.append({"name": i.name, "addr": i.addr, "step": i.step, "hash": i.hash, "key": self.key_of(i.name),
                        "source": i.step == self.run_step and want is not None and i.hash == want})
        return out

    # -- recovery after a restart ----------------------------------------------------------------------------------

    def _claims(self) -> dict[tuple, set[str]]:
        """(id, step, members) of every epoch a live island claims -> the members that claim it."""
        out: dict[tuple, set[str]] = {}
        for i in self.islands.values():
            if not i.alive:
                continue
            for ep in (i.last_epoch, i.pending):
                if ep:
                    key = (ep["id"], ep["step"], tuple(ep["members"]))
                    out.setdefault(key, set())
                    if i.name in ep["members"]:
                        out[key].add(i.name)
        return out

    def _maybe_end_recovery(self, now: float) -> None:
        regs = [i for i in self.islands.values() if i.alive and i.step >= 0]
        if not regs:
            return
        claims = self._claims()
        believed = [k for k, who in claims.items() if len(who) > len(k[2]) / 2]
        newest = max(believed, default=None)
        # Wait for the members of the newest believed epoch and of every newer claim (they may support it, and an
        # undecided epoch resumes with their statuses), or the grace.
        newer = [k for k in claims if newest is None or k[0] >= newest[0]]
        missing = sorted({m for k in newer for m in k[2] if m not in self.islands or not self.islands[m].alive})
        # No epoch named: a fresh run (every island at step 0, and min_islands of them here, as the first epoch
        # needs), or a restart where only islands without a committed state (fresh starts that will fetch, or
        # fetchers) registered yet: islands further ahead may still come back. Fewer than min_islands cannot start
        # the run anyway, so that wait has no deadline.
        ahead = any(i.step > 0 for i in regs)
        if not claims and not ahead and len(regs) < self.cfg.min_islands:
            return
        unknown = not claims and ahead
        if (missing or unknown) and now - self.started < self.cfg.recovery_grace_s:
            return
        self.recovering = False
        trusted = "believed"
        if newest is None and claims:
            # No claim has a majority of its members: take the survivors' word for the newest claim whose present
            # members all agree (said in the log: a lie cannot be told from the truth here).
            agreed = [k for k, who in claims.items() if who and all(
                not (m in self.islands and self.islands[m].alive) or m in who for m in k[2])]
            newest = max(agreed, default=None)
            trusted = "taken on the word of its surviving members " + (str(sorted(claims[newest])) if newest else "")
            if newest is not None:
                self._say(logging.WARNING, "recovery", "no claimed epoch has a majority of its members back; epoch "
                          "%d (outer step %d, members %s) is %s alone", newest[0], newest[1], list(newest[2]),
                          trusted)
        self.rebuilt_from = trusted if newest is not None else ""
        claimed_ids = [k[0] for k in claims]
        top = newest[0] if newest else 0
        self.next_epoch_id = max([self.next_epoch_id, top + 1] +
                                 [i + 1 for i in claimed_ids if i <= top + ID_SLACK])
        if newest is None:
            # Nothing names an epoch: the step most islands hold is the run's (a lone claim cannot outnumber them),
            # and their registered hashes vote its canonical hash as the members of a committed epoch would.
            steps = collections.Counter(i.step for i in regs)
            self.run_step = max(steps, key=lambda k: (steps[k], k))
            holders = sorted(i.name for i in regs if i.step == self.run_step)
            if self.run_step > 0:
                self.rebuilt_from = "the step most islands hold"
                self.committed[self.run_step - 1] = {"id": 0, "step": self.run_step - 1, "members": holders,
                                                     "ok": holders, "at": now}
                for n in holders:
                    if self.islands[n].hash is not None:
                        self._vote_from_status(self.islands[n], now)
                self._say(logging.WARNING, "recovery", "no island names the epoch of its state; the run resumes at "
                          "outer step %d, the step most of them hold (%s); their hashes vote on it", self.run_step,
                          holders)
            else:
                log.info("fresh run: %d islands at outer step 0", len(regs))
            return
        eid, es, members = newest[0], newest[1], list(newest[2])
        supporters = claims[newest]
        committed = any(self.islands[n].last_epoch and self.islands[n].last_epoch["id"] == eid for n in supporters)
        for m in members:
            if m not in self.islands:
                self.islands[m] = Island(m, "?", alive=False, died_at=now)
        if committed:
            self.run_step = es + 1
            ok = sorted(n for n in supporters if (self.islands[n].last_epoch or {}).get("id") == eid or
                        ((self.islands[n].pending or {}).get("id") == eid and
                         self.islands[n].pending["status"] == "ok"))  # type: ignore[index]
            self.committed[es] = {"id": eid, "step": es, "members": members, "ok": ok, "at": now}
            self.decisions[eid] = ("commit", es)
            for n in ok:
                isl = self.islands[n]
                if isl.step == es + 1 and isl.hash is not None:
                    self._vote_from_status(isl, now)
                elif isl.step == es:  # told commit: it applies the mean and votes
                    pass
        else:
            self.run_step = es
            p = next(self.islands[n].pending for n in supporters if (self.islands[n].pending or {}).get("id") == eid)
            e = Epoch(eid, es, members, list(p.get("order", members)),  # type: ignore[union-attr]
                      p.get("streams") or self._streams(members), self.cfg.min_rate,  # type: ignore[union-attr]
                      topology=p.get("topology", "ring"))  # type: ignore[union-attr]
            for n in supporters:
                st = (self.islands[n].pending or {}).get("status")
                if st in ("ok", "fail"):
                    e.done[n] = st
            self.epoch = e
            log.info("resuming undecided epoch %d (outer step %d, members %s, done %s)", eid, es, members, e.done)
        log.info("rebuilt view from %d islands: run at outer step %d, newest epoch %d (%s)%s", len(regs),
                 self.run_step, eid, trusted, f", missing {missing}" if missing else "")
        for i in regs:  # results held for other epochs: commit only the believed one; the rest redo or re-fetch
            p = i.pending
            if p and p["id"] != eid and p["id"] not in self.decisions:
                self.decisions[p["id"]] = ("abort" if p["step"] == self.run_step else "stale", p["step"])


def _fmt_rate(r: float) -> str:
    return "unmeasured" if r in (0.0, float("inf")) else f"{r / 1e6:.1f} MB/s"
