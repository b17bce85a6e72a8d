"""Runs a reduce plan (`plan.Plan`) for one member over authenticated TCP: the mean of a float32 vector, bit-identical
on every member.

The plan says which segment goes to whom in which round; this module moves the bytes. Each segment is cut into
chunks (``chunk_bytes`` of wire payload) that flow independently, chunk ``c`` on stream ``c % streams`` of every
link (several TCP connections per link). Per link and stream a sender and a receiver thread: while chunk k is on
the wire, the receiver decodes, accumulates and re-packs chunk k+1 in one fused pass (``codec.accumulate``; numpy
releases the GIL inside each tile's array passes). On the reduce path a member adds its own values to a segment
exactly once (to the one partial sum it receives, or, where a plan sends it several, to their sum, taken in the
plan's order), and the segment's owner divides by N and packs the mean once; on the gather path the owner's bytes
are forwarded verbatim and every member (the owner too) decodes those same bytes, so the result is bit-identical
everywhere. Buffers are bounded: a member starts its own chunk c only once chunk c - window is complete on it
(`window`), so what waits for a socket is bounded by the window, not by the vector.

Failure: every read and write has a timeout, the whole reduce a deadline, `cancel` is polled by a watchdog, and
any failure closes every connection and raises :class:`RingError` naming the link (and the peer) that failed.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import queue
import threading
import time
from typing import Callable, Mapping, Sequence

import numpy as np


from . import ordering, wire
from intellect_jax.codecs import BlockCodec, Codec, Packed
from .plan import Hop, Plan, make_layout

log = logging.getLogger("intellect_jax.elastic.executor")

CANCEL_POLL_S = 0.5  # how often a member waiting on the reduce asks `cancel` whether to give up


class RingError(RuntimeError):
    """The reduce broke (a peer died, timed out or sent a bad frame). Nothing of the result may be used.

    What the island reports to the coordinator, which compares the members' reports to tell the link that broke
    first from the failures it caused downstream: `suspect`, which kind of link failed ("pred": one we receive
    from, "succ": one we send to; None: cancelled, or a local failure) and `peer`, the rank (in the plan) at its
    other end, when known; `cause`, how ("closed": the peer closed or reset the connection, "timeout": too slow,
    "bad": a malformed frame, "cancelled": the epoch was aborted elsewhere); `progress`, the share of the frames
    owed to us that arrived before it."""

    def __init__(self, msg: str, suspect: str | None = None, progress: float | None = None,
                 cause: str | None = None, peer: int | None = None):
        super().__init__(msg)
        self.suspect = suspect
        self.progress = progress
        self.cause = cause
        self.peer = peer


def _cause(e: BaseException) -> str:
    """How a link failed (RingError.cause)."""
    if isinstance(e, wire.PeerClosed):
        return "closed"
    if isinstance(e, (wire.PeerTimeout, TimeoutError)):
        return "timeout"
    inner = e.__cause__ if isinstance(e, wire.WireError) and e.__cause__ is not None else e
    if isinstance(inner, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "closed"
    if isinstance(inner, OSError) and inner.errno in (errno.EBADF, errno.ENOTCONN):
        return "closed"
    return "bad"


@dataclasses.dataclass
class RingStats:
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    members: int = 1
    chunks: int = 0
    peak_queued_bytes: int = 0  # the most payload bytes this member held packed and waiting for a socket at once


def window(rounds: int, streams: int, chunk_wire_bytes: int) -> int:
    """Chunk indices a member may have in flight: it starts chunk c only once chunk c - window is complete here.

    A chunk index crosses `rounds` hops (the ring's 2(N-1)); on each, a link's S streams hold up to one TCP window
    each in the network (ordering.STREAM_WINDOW_BYTES: on a long path that, not the rate, is what is in flight) plus
    the chunk being coded, so rounds S (1 + window / chunk) indices keep every link busy (measured on the ring: a
    window of 5 S indices, blind to the round trip, cut a 1 Gbit/s ring with 300 ms round trips and 256 KiB chunks
    to 43% of the bound). What waits for a socket is then bounded by the window, not by the vector, and the reduce
    cannot deadlock: chunk c - window never waits on chunk c.
    """
    per_hop = 1 + -(-ordering.STREAM_WINDOW_BYTES // max(1, chunk_wire_bytes))
    return rounds * streams * per_hop


def run_plan(vec: np.ndarray | Packed, plan: Plan, rank: int, send: Mapping[int, Sequence[wire.Conn]],
             recv: Mapping[int, Sequence[wire.Conn]], codec: Codec, chunk_bytes: int, block_size: int,
             timeout: float, epoch: int = 0, cancel: Callable[[], str | None] | None = None,
             packed_out: bool = False, min_rate: float = 0.0) -> tuple[np.ndarray | Packed, RingStats]:
    """Mean of `vec` over the members of `plan`, as member `rank`. `send[p]` are the streams to member p (one entry
    per ``plan.out_links(rank)``), `recv[p]` those from member p (``plan.in_links(rank)``), every link with the same
    number of streams.

    Deadlines: each read and write must progress within `timeout` seconds, and the whole reduce must finish within
    `timeout` plus the bytes this member sends at `min_rate` bytes/s (a peer that trickles each frame just inside the
    per-read timeout cannot stretch the reduce further); without `min_rate`, `timeout` per chunk hop sent.

    `vec` is float32, or `Packed` (made on the island's device): then this member's own chunks go out as they are
    (no host pack) and each hop adds their decoded values. Returns the mean, bit-identical on every member: float32
    of len(vec), or with `packed_out` the owners' codes as `Packed` (to be decoded on the device). Raises RingError
    on any failure; the caller then discards everything and redoes the reduce in a new epoch. `cancel`, asked every
    CANCEL_POLL_S while the reduce runs, returns a reason to give up early (the epoch was aborted elsewhere) or None.
    """
    t0 = time.perf_counter()
    packed_in = isinstance(vec, Packed)
    if packed_in:
        vec.check(codec)
        n = vec.n
    else:
        vec = np.ascontiguousarray(vec, np.float32).reshape(-1)
        n = vec.size
    if packed_out and not isinstance(codec, BlockCodec):
        raise ValueError(f"packed_out needs an int8/int4 ring, not compression={codec.name!r}")
    N = plan.members
    S = max(1, max((len(s) for s in send.values()), default=0))
    lay = make_layout(n, N, block_size, chunk_bytes, codec.bits, S)
    C = lay.chunks
    stats = RingStats(members=N, chunks=C)
    if packed_out:
        out_codes = np.empty(codec.codes_size(lay.padded), codec.codes_dtype)
        out_scales = np.empty(codec.scales_size(lay.padded), np.float32)
    else:
        out = np.empty(lay.padded, np.float32)

    def own(lo: int, hi: int) -> np.ndarray:
        """Our values on [lo, hi) in float32: a view of vec (zero-padded past its end), or the packed ones decoded."""
        if packed_in:
            return codec.unpack_np(*vec.parts(codec, lo, hi))
        if hi <= vec.size:
            return vec[lo:hi]
        part = np.zeros(hi - lo, np.float32)
        part[:max(0, vec.size - lo)] = vec[lo:vec.size]
        return part

    def own_wire(lo: int, hi: int) -> list[memoryview]:
        """Our chunk as it starts a segment: the device's codes as they are, else packed here."""
        if packed_in:
            return [memoryview(np.ascontiguousarray(a)).cast("B") for a in vec.parts(codec, lo, hi)]
        return codec.encode(own(lo, hi))

    def store(lo: int, hi: int, blob: memoryview) -> None:
        """The mean's chunk (the owner's bytes) into the result."""
        if packed_out:
            codes, scales = codec.split(blob, hi - lo)
            out_codes[codec.codes_size(lo):codec.codes_size(hi)] = codes
            out_scales[codec.scales_size(lo):codec.scales_size(hi)] = scales
        else:
            out[lo:hi] = codec.decode(blob, hi - lo)

    def result():
        if not packed_out:
            return out[:n]
        m = codec.padded(n)
        return Packed(out_codes[:codec.codes_size(m)], out_scales[:codec.scales_size(m)], n)

    if N == 1:  # the mean of one: its own values, through the codec once (packed ones as they are)
        for c in range(C):
            lo, hi = lay.span(0, c)
            store(lo, hi, memoryview(b"".join(own_wire(lo, hi))))
        stats.seconds = time.perf_counter() - t0
        return result(), stats
    outs, ins = plan.out_links(rank), plan.in_links(rank)
    if (sorted(send) != outs or sorted(recv) != ins
            or any(len(s) != S for s in list(send.values()) + list(recv.values()))):
        raise ValueError(f"member {rank} of a {plan.topology} of {N} needs {S} streams to each of {outs} and from "
                         f"each of {ins}, got {({p: len(s) for p, s in send.items()})} and "
                         f"{({p: len(s) for p, s in recv.items()})}")
    # The hop structure, as this member reads it.
    tags = {(h.src, h.phase, h.step): h for h in plan.received(rank)}
    inbound = {g: plan.inbound(rank, g) for g in range(N)}
    onward = {(g, f): plan.outbound(rank, g, f) for g in range(N) for f in (False, True)}
    starts = [(g, onward[g, False]) for g in plan.starts(rank)]
    per_stream = [len(range(k, C, S)) for k in range(S)]
    n_sent = {p: sum(h.dst == p for h in plan.sent(rank)) for p in outs}
    n_recv = {p: sum(h.src == p for h in plan.received(rank)) for p in ins}
    all_conns = [c for p in outs for c in send[p]] + [c for p in ins for c in recv[p]]

    errors: list[BaseException] = []
    failed = threading.Event()
    queues = {(p, k): queue.SimpleQueue() for p in outs for k in range(S)}
    expected_units = {(p, k): n_recv[p] * per_stream[k] for p in ins for k in range(S)}
    got_units = dict.fromkeys(expected_units, 0)  # frames received (the coordinator compares members' progress)
    landed = [0] * C  # segments of chunk c decoded into `out` here; N = chunk c is complete
    progress = threading.Condition()
    queued = [0]  # payload bytes waiting in `queues` (guarded by `progress`)
    gathering: dict[tuple[int, int], dict[Hop, memoryview]] = {}  # (segment, chunk) -> partial sums so far

    def link_out(p: int, k: int) -> str:
        return f"link to {plan.role(True)} {send[p][k].peer} (stream {k})"

    def link_in(p: int, k: int) -> str:
        return f"link from {plan.role(False)} {recv[p][k].peer} (stream {k})"

    def enqueue(hops: list[Hop], c: int, parts: list) -> None:
        nbytes = sum(len(p) for p in parts)
        for h in hops:
            with progress:
                queued[0] += nbytes
                stats.peak_queued_bytes = max(stats.peak_queued_bytes, queued[0])
            queues[h.dst, c % S].put(({"e": epoch, "p": h.phase, "t": h.step, "c": c}, parts, nbytes))

    def fail(e: BaseException) -> None:
        if not failed.is_set():
            errors.append(e)
            failed.set()
            for q in queues.values():
                q.put(None)
            for conn in all_conns:
                conn.close()
            with progress:
                progress.notify_all()

    def land(c: int, lo: int, hi: int, blob: memoryview) -> None:
        store(lo, hi, blob)
        with progress:
            landed[c] += 1
            if landed[c] == N:
                progress.notify_all()

    def reduce(hop: Hop, c: int, payload: memoryview) -> None:
        """A partial sum of hop.seg's chunk c arrived: once every one the plan sends us has, add our values and send
        the sum on, or (as the owner) pack the mean, send it along the gather path and keep it."""
        g = hop.seg
        lo, hi = lay.span(g, c)
        mine = inbound[g]
        if len(mine) == 1:
            last, partial = payload, own(lo, hi)
        else:
            with progress:
                got = gathering.setdefault((g, c), {})
                got[hop] = payload
                if len(got) < len(mine):
                    return
                del gathering[g, c]
            partial = own(lo, hi)
            for h in mine[:-1]:
                partial = codec.decode(got[h], hi - lo) + partial
            last = got[mine[-1]]
        if plan.owner[g] == rank:  # pack the mean once; decode the same bytes as everyone
            blob = memoryview(b"".join(codec.accumulate(last, partial, mean_of=N)))
            enqueue(onward[g, True], c, [blob])
            land(c, lo, hi, blob)
        else:
            enqueue(onward[g, False], c, codec.accumulate(last, partial))

    def sender(p: int, k: int) -> None:
        try:
            for _ in range(n_sent[p] * per_stream[k]):
                item = queues[p, k].get()
                if item is None:
                    return
                header, parts, nbytes = item
                with progress:
                    queued[0] -= nbytes
                send[p][k].send(wire.MsgType.DATA, header, parts)
        except BaseException as e:  # noqa: BLE001 - any failure breaks the reduce
            fail(RingError(f"{link_out(p, k)}: {e}", "succ", cause=_cause(e), peer=p))

    def receiver(p: int, k: int) -> None:
        try:
            for _ in range(expected_units[p, k]):
                mtype, h, payload = recv[p][k].recv()
                if failed.is_set():
                    return
                got_units[p, k] += 1
                if mtype != wire.MsgType.DATA or h.get("e") != epoch:
                    raise wire.MalformedFrame(f"unexpected ring frame {mtype.name} {h}")
                phase, t, c = h["p"], int(h["t"]), int(h["c"])
                hop = tags.get((p, phase, t)) if isinstance(phase, str) else None
                if hop is None or c % S != k or not (0 <= c < C):
                    raise wire.MalformedFrame(f"ring frame for chunk {c} step {t} ({phase!r:.20}) on stream {k}")
                if hop.final:  # the owner's bytes: pass them on as they are, and keep them
                    lo, hi = lay.span(hop.seg, c)
                    enqueue(onward[hop.seg, True], c, [payload])
                    land(c, lo, hi, payload)
                else:
                    reduce(hop, c, payload)
        except BaseException as e:  # noqa: BLE001
            fail(RingError(f"{link_in(p, k)}: {e}", "pred", cause=_cause(e), peer=p))

    finished = threading.Event()

    def watchdog() -> None:
        while not finished.wait(CANCEL_POLL_S) and not failed.is_set():
            why = cancel()
            if why:
                fail(RingError(why, cause="cancelled"))

    for conn in all_conns:
        conn.settimeout(timeout)
    # A thread per link, stream and direction, with the link it serves: receivers first, since a receiver still
    # waiting at the deadline names the slow link (a sender waits on what its receivers pass on).
    links = {}
    for f, peers, describe, who in ((receiver, ins, link_in, "pred"), (sender, outs, link_out, "succ")):
        for p in peers:
            for k in range(S):
                th = threading.Thread(target=f, args=(p, k), daemon=True, name=f"ring-{f.__name__}-{p}-{k}")
                links[th] = (describe(p, k), who, p)
    threads = list(links)
    for th in threads:
        th.start()
    if cancel is not None:
        threading.Thread(target=watchdog, daemon=True, name="ring-watchdog").start()
    ahead = window(plan.rounds, S, codec.wire_bytes(lay.chunk))
    hops = max(1, len(plan.sent(rank)) * C)
    if min_rate > 0:
        budget = timeout + hops * codec.wire_bytes(lay.chunk) / min_rate
        why = (f"at least {min_rate * 8 / 1e6:.2f} Mbit/s (the run's slowest allowed link) plus the {timeout:g} s "
               "link timeout")
    else:
        budget = timeout * hops
        why = f"the link timeout {timeout:g} s x {hops} chunk hops"
    deadline = time.monotonic() + budget
    for c in range(C):  # the segments we start, packed while earlier chunks are in flight ...
        with progress:  # ... but at most `ahead` chunk indices past the last complete one (bounded buffers)
            while c >= ahead and landed[c - ahead] < N and not failed.is_set() and time.monotonic() < deadline:
                progress.wait(CANCEL_POLL_S)
        if failed.is_set():
            break
        for g, to in starts:
            enqueue(to, c, own_wire(*lay.span(g, c)))
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    late = [links[th] for th in threads if th.is_alive()]
    if late:  # a link too slow for the deadline
        fail(RingError(f"{late[0][0]}: the reduce was not done within its deadline of {budget:.1f} s ({why}): the "
                       "link is slower than the run allows", late[0][1], cause="timeout", peer=late[0][2]))
        for th in threads:
            th.join(5.0)
    finished.set()
    if errors:
        raise RingError(f"ring all-reduce (epoch {epoch}) failed: {errors[0]}", getattr(errors[0], "suspect", None),
                        sum(got_units.values()) / max(1, sum(expected_units.values())),
                        getattr(errors[0], "cause", None), getattr(errors[0], "peer", None)) from errors[0]
    stats.seconds = time.perf_counter() - t0
    stats.bytes_sent = sum(c.bytes_sent for p in outs for c in send[p])
    stats.bytes_received = sum(c.bytes_received for p in ins for c in recv[p])
    return result(), stats
