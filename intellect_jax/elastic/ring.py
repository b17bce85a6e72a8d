"""Host-side ring all-reduce (mean) of a float32 vector among an epoch's members, over authenticated TCP.

Reduce-scatter then all-gather (Patarasuk & Yuan 2009), with two changes for slow links:

* reduce-scatter moves **int8 (or int4) codes + fp32 block scales** (``quant.pack_np``); each hop decodes, adds its own fp32
  values, and re-packs the partial sum (accumulation stays fp32). The owner of a segment divides by N and packs the
  mean once.
* all-gather **forwards the owner's packed bytes verbatim**, and every member (the owner too) decodes those same
  bytes, so the result is bit-identical on all members. PRIME re-quantized at every all-gather hop, so replicas
  could drift apart.

The vector is cut into N segments of whole quantization blocks (the last one zero-padded); each segment is cut into
chunks (``chunk_bytes`` of wire payload) that flow through the ring independently, chunk ``c`` on stream
``c % streams`` (several TCP connections per link). Per stream a sender and a receiver thread: while chunk k is on
the wire, the receiver decodes, accumulates and re-packs chunk k+1 in one fused pass (``quant.accumulate_pack_np``)
split over quant's small codec thread pool (numpy releases the GIL inside each tile's array passes). Buffers are
bounded: a member packs its own chunk c only once chunk c - window is complete on it (`_window`), so what waits
for a socket is bounded by the window, not by the vector. ``compression="none"`` sends raw fp32 the same way (for
comparison; also bit-identical, since the all-gather forwards the owner's fp32 bytes).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np

from intellect_jax import quant  # the numpy twin; imports no jax
# The wire codecs live in intellect_jax.codecs; re-exported here, where the ring's callers and tests look for them.
from intellect_jax.codecs import BlockCodec, Codec, Fp32Codec, Packed, make_codec  # noqa: F401

from . import ordering, wire

log = logging.getLogger("intellect_jax.elastic.ring")

PIPELINE_DEPTH = 4
CANCEL_POLL_S = 0.5  # how often a member waiting on the ring asks `cancel` whether to give up


class RingError(RuntimeError):
    """The ring broke (a peer died, timed out or sent a bad frame). Nothing of the result may be used.

    What the island reports to the coordinator, which compares the members' reports to tell the link that broke
    first from the failures it caused downstream: `suspect`, which neighbour's link failed ("pred": the one we
    receive from, "succ": the one we send to; None: cancelled, or a local failure); `cause`, how ("closed": the peer
    closed or reset the connection, "timeout": too slow, "bad": a malformed frame, "cancelled": the epoch was
    aborted elsewhere); `progress`, the share of the frames owed to us that arrived before it."""

    def __init__(self, msg: str, suspect: str | None = None, progress: float | None = None,
                 cause: str | None = None):
        super().__init__(msg)
        self.suspect = suspect
        self.progress = progress
        self.cause = cause


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


# --------------------------------------------------------------------------------------------------------------------
# Layout.


@dataclasses.dataclass(frozen=True)
class Layout:
    n: int  # caller's length
    members: int  # N
    seg: int  # elements per segment (a multiple of the block size)
    chunk: int  # elements per chunk (a multiple of the block size)

    @property
    def chunks(self) -> int:
        return math.ceil(self.seg / self.chunk)

    @property
    def padded(self) -> int:
        return self.seg * self.members

    def span(self, g: int, c: int) -> tuple[int, int]:
        lo = g * self.seg + c * self.chunk
        return lo, min(lo + self.chunk, (g + 1) * self.seg)


def make_layout(n: int, members: int, block_size: int, chunk_bytes: int, bits_per_elem: int,
                streams: int = 1) -> Layout:
    seg = math.ceil(max(n, 1) / members / block_size) * block_size
    chunk = max(block_size, chunk_bytes * 8 // bits_per_elem // block_size * block_size)
    # At least PIPELINE_DEPTH chunks per stream and segment when the segment is big enough: every stream carries
    # data, and a chunk is forwarded (decoded, accumulated, re-packed) while later ones are still on the wire.
    per_stream = math.ceil(seg / (streams * PIPELINE_DEPTH) / block_size) * block_size
    chunk = min(chunk, max(block_size, per_stream))
    return Layout(n, members, seg, chunk)


# --------------------------------------------------------------------------------------------------------------------
# The ring.


@dataclasses.dataclass
class RingStats:
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    members: int = 1
    chunks: int = 0
    peak_queued_bytes: int = 0  # the most payload bytes this member held packed and waiting for a socket at once


def _window(members: int, streams: int, chunk_wire_bytes: int) -> int:
    """Chunk indices a member may have in flight: it starts chunk c only once chunk c - window is complete here.

    A chunk index crosses 2(N-1) hops; on each, a link's S streams hold up to one TCP window each in the network
    (ordering.STREAM_WINDOW_BYTES: on a long path that, not the rate, is what is in flight) plus the chunk being
    coded, so 2(N-1) S (1 + window / chunk) indices keep every link busy (measured: a window of 5 S indices, blind to
    the round trip, cut a 1 Gbit/s ring with 300 ms round trips and 256 KiB chunks to 43% of the bound). What waits
    for a socket is then bounded by the window, not by the vector, and the ring cannot deadlock: chunk c - window
    never waits on chunk c.
    """
    per_hop = 1 + -(-ordering.STREAM_WINDOW_BYTES // max(1, chunk_wire_bytes))
    return 2 * (members - 1) * streams * per_hop


def ring_mean(vec: np.ndarray | Packed, rank: int, send: Sequence[wire.Conn], recv: Sequence[wire.Conn],
              members: int, codec: Codec, chunk_bytes: int, block_size: int, timeout: float,
              epoch: int = 0, cancel: Callable[[], str | None] | None = None, packed_out: bool = False,
              min_rate: float = 0.0) -> tuple[np.ndarray | Packed, RingStats]:
    """Mean of `vec` over the ring. `send[k]` goes to the successor, `recv[k]` comes from the predecessor.

    Deadlines: each read and write must progress within `timeout` seconds, and the whole reduce must finish within
    `timeout` plus the bytes this member sends at `min_rate` bytes/s (a peer that trickles each frame just inside the
    per-read timeout cannot stretch the reduce further); without `min_rate`, `timeout` per chunk hop.

    `vec` is float32, or `Packed` (made on the island's device): then this member's own chunks go out as they are
    (no host pack) and each hop adds their decoded values. Returns the mean, bit-identical on every member: float32
    of len(vec), or with `packed_out` the owners' codes as `Packed` (to be decoded on the device). Raises RingError
    on any failure; the caller then discards everything and redoes the reduce in a new epoch. `cancel`, asked every
    CANCEL_POLL_S while the ring runs, returns a reason to give up early (the epoch was aborted elsewhere) or None.
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
    N = members
    S = max(1, len(send))
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
        """Our chunk as it goes out at step 0: the device's codes as they are, else packed here."""
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
    if len(send) != len(recv) or not send:
        raise ValueError("ring_mean needs the same positive number of send and recv streams")

    errors: list[BaseException] = []
    failed = threading.Event()
    queues = [queue.SimpleQueue() for _ in range(S)]
    expected_units = [2 * (N - 1) * len(range(k, C, S)) for k in range(S)]
    got_units = [0] * S  # frames received per stream (the coordinator compares members' progress at a failure)
    landed = [0] * C  # segments of chunk c decoded into `out` here; N = chunk c is complete
    progress = threading.Condition()
    queued = [0]  # payload bytes waiting in `queues` (guarded by `progress`)

    def link_out(k: int) -> str:
        return f"link to successor {send[k].peer} (stream {k})"

    def link_in(k: int) -> str:
        return f"link from predecessor {recv[k].peer} (stream {k})"

    def enqueue(k: int, header: dict, parts: list) -> None:
        nbytes = sum(len(p) for p in parts)
        with progress:
            queued[0] += nbytes
            stats.peak_queued_bytes = max(stats.peak_queued_bytes, queued[0])
        queues[k].put((header, parts, nbytes))

    def fail(e: BaseException) -> None:
        if not failed.is_set():
            errors.append(e)
            failed.set()
            for q in queues:
                q.put(None)
            for conn in list(send) + list(recv):
                conn.close()
            with progress:
                progress.notify_all()

    def land(c: int, lo: int, hi: int, blob: memoryview) -> None:
        store(lo, hi, blob)
        with progress:
            landed[c] += 1
            if landed[c] == N:
                progress.notify_all()

    def sender(k: int) -> None:
        try:
            for _ in range(expected_units[k]):
                item = queues[k].get()
                if item is None:
                    return
                header, parts, nbytes = item
                with progress:
                    queued[0] -= nbytes
                send[k].send(wire.MsgType.DATA, header, parts)
        except BaseException as e:  # noqa: BLE001 - any failure breaks the ring
            fail(RingError(f"{link_out(k)}: {e}", "succ", cause=_cause(e)))

    def receiver(k: int) -> None:
        try:
            for _ in range(expected_units[k]):
                mtype, h, payload = recv[k].recv()
                if failed.is_set():
                    return
                got_units[k] += 1
                if mtype != wire.MsgType.DATA or h.get("e") != epoch:
                    raise wire.MalformedFrame(f"unexpected ring frame {mtype.name} {h}")
                phase, t, c = h["p"], int(h["t"]), int(h["c"])
                if c % S != k or not (0 <= c < C) or not (0 <= t <= N - 2):
                    raise wire.MalformedFrame(f"ring frame for chunk {c} step {t} on stream {k}")
                if phase == "rs":
                    g = (rank - t - 1) % N
                    lo, hi = lay.span(g, c)
                    if t < N - 2:
                        enqueue(k, {"e": epoch, "p": "rs", "t": t + 1, "c": c}, codec.accumulate(payload, own(lo, hi)))
                    else:  # this member owns segment g: pack the mean once, decode the same bytes as everyone
                        blob = memoryview(b"".join(codec.accumulate(payload, own(lo, hi), mean_of=N)))
                        enqueue(k, {"e": epoch, "p": "ag", "t": 0, "c": c}, [blob])
                        land(c, lo, hi, blob)
                elif phase == "ag":
                    g = (rank - t) % N
                    lo, hi = lay.span(g, c)
                    if t < N - 2:
                        enqueue(k, {"e": epoch, "p": "ag", "t": t + 1, "c": c}, [payload])
                    land(c, lo, hi, payload)
                else:
                    raise wire.MalformedFrame(f"unknown ring phase {phase!r}")
        except BaseException as e:  # noqa: BLE001
            fail(RingError(f"{link_in(k)}: {e}", "pred", cause=_cause(e)))

    finished = threading.Event()

    def watchdog() -> None:
        while not finished.wait(CANCEL_POLL_S) and not failed.is_set():
            why = cancel()
            if why:
                fail(RingError(why, cause="cancelled"))

    for conn in list(send) + list(recv):
        conn.settimeout(timeout)
    # A thread per stream and direction, with the link it serves: receivers first, since a receiver still waiting
    # at the deadline names the slow link (a sender waits on what its receivers pass on).
    links = {threading.Thread(target=f, args=(k,), daemon=True, name=f"ring-{f.__name__}-{k}"): (describe(k), who)
             for f, describe, who in ((receiver, link_in, "pred"), (sender, link_out, "succ")) for k in range(S)}
    threads = list(links)
    for th in threads:
        th.start()
    if cancel is not None:
        threading.Thread(target=watchdog, daemon=True, name="ring-watchdog").start()
    window = _window(N, S, codec.wire_bytes(lay.chunk))
    hops = max(1, 2 * (N - 1) * C)
    if min_rate > 0:
        budget = timeout + 2 * (N - 1) * C * codec.wire_bytes(lay.chunk) / min_rate
        why = (f"at least {min_rate * 8 / 1e6:.2f} Mbit/s (the run's slowest allowed link) plus the {timeout:g} s "
               "link timeout")
    else:
        budget = timeout * hops
        why = f"the link timeout {timeout:g} s x {hops} chunk hops"
    deadline = time.monotonic() + budget
    for c in range(C):  # reduce-scatter step 0: our own segment `rank`, packed while earlier chunks are in flight
        with progress:  # ... but at most `window` chunk indices ahead of the last complete one (bounded buffers)
            while c >= window and landed[c - window] < N and not failed.is_set() and time.monotonic() < deadline:
                progress.wait(CANCEL_POLL_S)
        if failed.is_set():
            break
        lo, hi = lay.span(rank, c)
        enqueue(c % S, {"e": epoch, "p": "rs", "t": 0, "c": c}, own_wire(lo, hi))
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    late = [links[th] for th in threads if th.is_alive()]
    if late:  # a link too slow for the deadline
        fail(RingError(f"{late[0][0]}: the reduce was not done within its deadline of {budget:.1f} s ({why}): the "
                       "link is slower than the run allows", late[0][1], cause="timeout"))
        for th in threads:
            th.join(5.0)
    finished.set()
    if errors:
        raise RingError(f"ring all-reduce (epoch {epoch}) failed: {errors[0]}", getattr(errors[0], "suspect", None),
                        sum(got_units) / max(1, sum(expected_units)), getattr(errors[0], "cause", None)) from errors[0]
    stats.seconds = time.perf_counter() - t0
    stats.bytes_sent = sum(c.bytes_sent for c in send)
    stats.bytes_received = sum(c.bytes_received for c in recv)
    return result(), stats


def reference_ring_mean(vecs: Sequence[np.ndarray | Packed], codec: Codec, chunk_bytes: int,
                        block_size: int, streams: int = 1) -> np.ndarray:
    """The same arithmetic as :func:`ring_mean`, sequentially in one process (ring order = list order), float32 out.

    For tests: the networked ring must equal this bit for bit (with `Packed` inputs too; all of one kind).
    """
    N = len(vecs)
    packed = isinstance(vecs[0], Packed)
    n = vecs[0].n if packed else vecs[0].size
    lay = make_layout(n, N, block_size, chunk_bytes, codec.bits, streams)
    enc = lambda a: memoryview(b"".join(codec.encode(a)))  # noqa: E731
    if packed:
        wires = [lambda lo, hi, v=v: memoryview(b"".join(np.ascontiguousarray(a).tobytes()
                                                         for a in v.parts(codec, lo, hi))) for v in vecs]
        xs = [np.concatenate([v.decode(codec), np.zeros(lay.padded - n, np.float32)]) for v in vecs]
    else:
        xs = [np.concatenate([np.asarray(v, np.float32), np.zeros(lay.padded - n, np.float32)]) for v in vecs]
        wires = [lambda lo, hi, x=x: enc(x[lo:hi]) for x in xs]
    out = np.empty(lay.padded, np.float32)
    for c in range(lay.chunks):
        for g in range(N):
            lo, hi = lay.span(g, c)
            # Segment g starts at member g (rs step 0) and is accumulated by g+1, g+2, ..., g+N-1 (its owner).
            blob = wires[g](lo, hi)
            for j in range(1, N):
                acc = codec.decode(blob, hi - lo) + xs[(g + j) % N][lo:hi]
                blob = enc(quant.mean_np(acc, N) if j == N - 1 else acc)
            out[lo:hi] = codec.decode(blob, hi - lo)
    return out[:n].copy()
