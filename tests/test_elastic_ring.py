"""Ring all-reduce over real TCP on 127.0.0.1: bit-identical results, exact equality with the sequential reference,
int8 error bound, failure behaviour; and the bandwidth-aware ring order."""

import itertools
import math
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest

from intellect_jax import quant
from intellect_jax.elastic import identity, ordering, ring, wire

SECRET = b"k" * 32
SERVER, CLIENT = identity.secret_auth(SECRET, "server"), identity.secret_auth(SECRET, "client")
RUN = "ring-test"
MAXF = 64 << 20
BLOCK = 256


def _link(streams):
    """One link of `streams` handshaken loopback connections: (the sending ends, the accepted ends in connect order,
    so stream k is the k-th connection)."""
    lsock = __import__("socket").create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    accepted = []

    def acc():
        for _ in range(streams):
            s, (h, p) = lsock.accept()
            accepted.append(wire.accept(s, f"{h}:{p}", SERVER, RUN, MAXF)[0])

    th = threading.Thread(target=acc)
    th.start()
    sends = [wire.connect(("127.0.0.1", port), CLIENT, "server", RUN, MAXF)[0] for _ in range(streams)]
    th.join(10)
    lsock.close()
    return sends, accepted


def _links(n_members, streams):
    """send[i][k] (i -> i+1) and recv[i][k] (from i-1) as handshaken TCP connections."""
    send = [[None] * streams for _ in range(n_members)]
    recv = [[None] * streams for _ in range(n_members)]
    for i in range(n_members):
        send[i], recv[(i + 1) % n_members] = _link(streams)
    return send, recv


def _run_ring(vecs, codec, streams=2, chunk_bytes=4096, epoch=7, stats=None, packed_out=False):
    n = len(vecs)
    send, recv = _links(n, streams) if n > 1 else ([[]], [[]])
    outs, errs = [None] * n, []
    stats = [None] * n if stats is None else stats

    def member(i):
        try:
            outs[i], stats[i] = ring.ring_mean(vecs[i], i, send[i], recv[i], n, codec, chunk_bytes, BLOCK,
                                               timeout=10, epoch=epoch, packed_out=packed_out)
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    ths = [threading.Thread(target=member, args=(i,)) for i in range(n)]
    [t.start() for t in ths]
    [t.join(60) for t in ths]
    for c in itertools.chain(*send, *recv):
        c.close()
    assert not errs, errs
    return outs


@pytest.mark.parametrize("n_members,size,streams", [(1, 1000, 1), (2, 5000, 2), (3, 70_001, 3), (4, 12_345, 2),
                                                   (5, 300, 1)])
@pytest.mark.parametrize("compression", ["int8", "int4", "none"])
def test_ring_bit_identical_and_equal_to_reference(n_members, size, streams, compression):
    rng = np.random.default_rng(size)
    vecs = [rng.standard_normal(size).astype(np.float32) * (i + 1) for i in range(n_members)]
    codec = ring.make_codec(compression, BLOCK)
    outs = _run_ring(vecs, codec, streams=streams)
    for o in outs[1:]:
        assert o.tobytes() == outs[0].tobytes()  # bit-identical on every member
    ref = ring.reference_ring_mean(vecs, codec, 4096, BLOCK, streams)
    assert outs[0].tobytes() == ref.tobytes()
    exact = np.mean(np.stack(vecs).astype(np.float64), axis=0)
    if compression == "none":
        np.testing.assert_allclose(outs[0], exact, rtol=1e-6, atol=1e-6)
    else:
        # Each hop re-packs a partial sum (|.| <= sum_i max|x_i|): error <= half a step, N-1 hops + the final pack.
        step = sum(np.abs(v).max() for v in vecs) / (127 if compression == "int8" else 7)
        bound = (n_members - 1) * step / 2 / n_members + step / n_members / 2 * 1.01
        err = np.abs(outs[0] - exact).max()
        assert err <= bound, (err, bound)
        assert err > 0 or n_members == 1  # it really went through the codes


def _packed(v, codec):
    """What an island's device makes of its vector (quant.pack's numpy twin: the same bytes)."""
    m = -(-v.size // BLOCK) * BLOCK
    codes, scales = quant.pack_np(np.pad(v, (0, m - v.size)), bits=codec.bits, block_size=BLOCK)
    return ring.Packed(codes, scales, v.size)


@pytest.mark.parametrize("n_members,size,streams", [(1, 1000, 1), (2, 5000, 2), (3, 70_001, 3), (4, 12_345, 2)])
@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_ring_of_device_codes_in_and_out(n_members, size, streams, compression):
    """Codes made on the device go out at step 0 as they are, each hop adds its decoded codes, and the mean can come
    back as the owners' codes: bit-identical everywhere and equal to the sequential reference."""
    rng = np.random.default_rng(size)
    vecs = [rng.standard_normal(size).astype(np.float32) * (i + 1) for i in range(n_members)]
    codec = ring.make_codec(compression, BLOCK)
    packed = [_packed(v, codec) for v in vecs]
    ref = ring.reference_ring_mean(packed, codec, 4096, BLOCK, streams)
    outs = _run_ring(packed, codec, streams=streams)
    for o in outs:
        assert o.tobytes() == ref.tobytes()
    stats = [None] * n_members
    outs = _run_ring(packed, codec, streams=streams, packed_out=True, stats=stats)
    for o in outs:
        assert isinstance(o, ring.Packed) and o.n == size
        assert o.codes.tobytes() == outs[0].codes.tobytes() and o.scales.tobytes() == outs[0].scales.tobytes()
        assert o.decode(codec).tobytes() == ref.tobytes()
    if n_members > 1:  # the contributions were quantized once more than the fp32 ring's, within the same kind of bound
        exact = np.mean(np.stack(vecs).astype(np.float64), axis=0)
        step = sum(np.abs(v).max() for v in vecs) / (127 if compression == "int8" else 7)
        assert np.abs(ref - exact).max() <= step
        fp32_in = ring.reference_ring_mean(vecs, codec, 4096, BLOCK, streams)
        assert ref.tobytes() != fp32_in.tobytes()  # really a different input path
    # A packed vector must match the ring's codec
    other = ring.make_codec("int4" if compression == "int8" else "int8", BLOCK)
    with pytest.raises(ValueError, match="packed vector"):
        ring.ring_mean(packed[0], 0, [], [], 1, other, 4096, BLOCK, timeout=1)
    with pytest.raises(ValueError, match="needs an int8/int4 ring"):
        ring.ring_mean(packed[0], 0, [], [], 1, ring.make_codec("none", BLOCK), 4096, BLOCK, timeout=1)


def test_ring_buffers_are_bounded_by_the_window_not_the_vector(monkeypatch):
    """Many small chunks: a member may not pack its whole segment ahead; what waits for a socket stays within
    window x N chunks (every chunk index in the window has one item per segment somewhere in the ring). (No TCP
    window allowance here, so that the window is a few chunks.)"""
    monkeypatch.setattr(ordering, "STREAM_WINDOW_BYTES", 0)
    n_members, streams, chunk_bytes = 3, 2, 2048
    vecs = [np.random.default_rng(i).standard_normal(600_000).astype(np.float32) for i in range(n_members)]
    codec = ring.make_codec("int8", BLOCK)
    stats = [None] * n_members
    outs = _run_ring(vecs, codec, streams=streams, chunk_bytes=chunk_bytes, stats=stats)
    assert outs[0].tobytes() == ring.reference_ring_mean(vecs, codec, chunk_bytes, BLOCK, streams).tobytes()
    lay = ring.make_layout(600_000, n_members, BLOCK, chunk_bytes, 8, streams)
    chunk_wire = codec.wire_bytes(lay.chunk)
    window = ring._window(n_members, streams, chunk_wire)
    assert lay.chunks > 4 * window  # the window binds: far more chunks than it admits
    for st in stats:
        assert 0 < st.peak_queued_bytes <= window * n_members * chunk_wire
        assert st.peak_queued_bytes < codec.wire_bytes(lay.seg) / 2


def test_int8_ring_moves_a_quarter_of_the_fp32_bytes():
    vecs = [np.ones(65536, np.float32) * i for i in range(3)]
    sent = {}
    for comp in ("int8", "none"):
        send, recv = _links(3, 1)
        res = [None] * 3
        ths = [threading.Thread(target=lambda i=i: res.__setitem__(i, ring.ring_mean(
            vecs[i], i, send[i], recv[i], 3, ring.make_codec(comp, BLOCK), 1 << 16, BLOCK, timeout=10)[1]))
            for i in range(3)]
        [t.start() for t in ths]
        [t.join(30) for t in ths]
        sent[comp] = sum(s.bytes_sent for s in res)
    # payload 2 (N-1)/N of the vector per member; int8: 1 byte + 4/256 per element.
    assert 0.25 < sent["int8"] / sent["none"] < 0.27


def _member_proc(i, n, port_q, ports, vec, die):
    """One ring member in its own process, with its own listener; member `die` SIGKILLs itself mid-ring."""
    import socket
    lsock = socket.create_server(("127.0.0.1", 0))
    port_q.put((i, lsock.getsockname()[1]))
    all_ports = ports.get()
    recv = []

    def acc():
        s, (h, p) = lsock.accept()
        recv.append(wire.accept(s, f"{h}:{p}", SERVER, RUN, MAXF)[0])

    th = threading.Thread(target=acc)
    th.start()
    send = [wire.connect(("127.0.0.1", all_ports[(i + 1) % n]), CLIENT, "server", RUN, MAXF)[0]]
    th.join(10)
    if i == die:
        class Dying:
            def __init__(self, c):
                self.c, self.n = c, 0

            def send(self, *a, **k):
                self.c.send(*a, **k)
                self.n += 1
                if self.n == 3:
                    os.kill(os.getpid(), signal.SIGKILL)

            def __getattr__(self, name):
                return getattr(self.c, name)

        send = [Dying(send[0])]
    try:
        ring.ring_mean(vec, i, send, recv, n, ring.make_codec("none", BLOCK), 4096, BLOCK, timeout=5)
        return "ok"
    except ring.RingError as e:
        return f"RingError: {e}"


def _worker(i, n, port_q, ports_q, res_q, vec, die):
    res_q.put((i, _member_proc(i, n, port_q, ports_q, vec, die)))


def test_member_killed_mid_ring_makes_survivors_raise_quickly():
    ctx = mp.get_context("fork")
    n = 3
    port_q, res_q = ctx.Queue(), ctx.Queue()
    ports_qs = [ctx.Queue() for _ in range(n)]
    vec = np.ones(200_000, np.float32)
    procs = [ctx.Process(target=_worker, args=(i, n, port_q, ports_qs[i], res_q, vec, 1)) for i in range(n)]
    [p.start() for p in procs]
    ports = dict(port_q.get(timeout=30) for _ in range(n))
    for q in ports_qs:
        q.put(ports)
    results = dict(res_q.get(timeout=30) for _ in range(n - 1))
    [p.join(10) for p in procs]
    assert procs[1].exitcode == -signal.SIGKILL
    assert set(results) == {0, 2}
    assert all(r.startswith("RingError") for r in results.values()), results


@pytest.mark.parametrize("compression", ["int8", "int4", "none"])
def test_non_finite_payloads_are_refused_by_the_link_that_receives_them(compression):
    """A peer's NaN/inf block scales (or fp32 values) break the ring at the receiving link, naming the frame; they
    never reach an accumulator (the hash vote could not catch it: every member would decode the same bad bytes)."""
    codec = ring.make_codec(compression, BLOCK)
    parts = codec.encode(np.ones(4 * BLOCK, np.float32))
    blob = bytearray(b"".join(bytes(p) for p in parts))
    blob[-4:] = np.array([np.inf], np.float32).tobytes()  # the last scale (or value)
    with pytest.raises(wire.MalformedFrame, match="non-finite"):
        codec.decode(memoryview(bytes(blob)), 4 * BLOCK)


def test_cancel_breaks_a_ring_waiting_on_a_silent_peer():
    """A member whose predecessor never sends gives up when `cancel` says the epoch was aborted elsewhere, long
    before its link timeout."""
    send, recv = _links(2, 1)
    t0 = __import__("time").monotonic()
    with pytest.raises(ring.RingError, match="aborted elsewhere"):
        ring.ring_mean(np.ones(50_000, np.float32), 0, send[0], recv[0], 2, ring.make_codec("int8", BLOCK), 4096,
                       BLOCK, timeout=30, cancel=lambda: "aborted elsewhere")
    assert __import__("time").monotonic() - t0 < 5
    for c in itertools.chain(*send, *recv):
        c.close()


def _ring_threads(settle_s=3.0):
    """The ring's threads still alive once those of earlier rings had `settle_s` to finish."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and any(t.name.startswith("ring-") for t in threading.enumerate()):
        time.sleep(0.05)
    return [t for t in threading.enumerate() if t.name.startswith("ring-")]


def _one_real_member(peer_action, timeout=2.0, min_rate=0.0):
    """Member 0 of a 2-ring runs ring_mean; `peer_action(send, recv)` plays member 1 badly. Returns member 0's error,
    the neighbour it blames and how long it took."""
    send, recv = _links(2, 1)
    out = {}

    def member0():
        t0 = __import__("time").monotonic()
        try:
            ring.ring_mean(np.ones(8 * BLOCK, np.float32), 0, send[0], recv[0], 2, ring.make_codec("int8", BLOCK), 1024,
                           BLOCK, timeout=timeout, epoch=7, min_rate=min_rate)
        except ring.RingError as e:
            out["error"], out["suspect"], out["cause"] = str(e), e.suspect, e.cause
        out["seconds"] = __import__("time").monotonic() - t0

    th = threading.Thread(target=member0)
    th.start()
    peer_action(send[1][0], recv[1][0])
    th.join(30)
    for c in itertools.chain(*send, *recv):
        c.close()
    return out


def test_a_chunk_that_fails_to_decode_aborts_naming_the_link_and_leaks_no_thread():
    assert not _ring_threads()

    def bad_peer(send, recv):
        send.send(wire.MsgType.DATA, {"e": 7, "p": "rs", "t": 0, "c": 0}, b"not an int8 chunk")

    out = _one_real_member(bad_peer)
    assert "link from predecessor 127.0.0.1:" in out["error"] and "int8 chunk of 17 bytes" in out["error"], out
    assert out["suspect"] == "pred"
    assert not _ring_threads()  # every ring thread (senders, receivers, watchdog) ended


def test_a_peer_stalling_mid_chunk_aborts_after_the_timeout_naming_the_link():
    assert not _ring_threads()

    def stalling_peer(send, recv):  # a frame header promising 1000 bytes, then nothing
        head = wire._HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(wire.MsgType.DATA), 0, wire.run_tag(RUN),
                                 20, 1000, b"\0" * 4)
        send.sock.sendall(head + b"{}")
        time.sleep(3.5)

    out = _one_real_member(stalling_peer, timeout=1.0)
    assert "link from predecessor 127.0.0.1:" in out["error"] and "stalled mid-frame: nothing within 1.0 s" in out["error"], out
    assert out["seconds"] < 3.0, out
    assert not _ring_threads()  # every ring thread (senders, receivers, watchdog) ended


def test_a_link_slower_than_the_deadline_aborts_naming_the_link():
    """A peer that never stalls long enough for the per-read timeout but trickles a frame a few bytes at a time: the
    reduce gives up at its deadline (timeout x chunk hops), names the slow link and leaks no thread."""
    assert not _ring_threads()

    def trickling_peer(send, recv):
        head = wire._HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(wire.MsgType.DATA), 0, wire.run_tag(RUN),
                                 20, 100_000, b"\0" * 4)
        send.sock.sendall(head + b"{}")
        for _ in range(40):  # one byte every 0.2 s: each read returns well inside the 0.5 s timeout
            time.sleep(0.2)
            try:
                send.sock.sendall(b"\0")
            except OSError:
                return

    out = _one_real_member(trickling_peer, timeout=0.5)
    assert "link from predecessor 127.0.0.1:" in out["error"] and "not done within its deadline" in out["error"], out
    assert out["seconds"] < 6.0 and out["suspect"] == "pred", out
    assert not _ring_threads()


def test_a_peer_trickling_just_inside_the_read_timeout_is_cut_by_the_rate_deadline():
    """The same trickle against a 2 s per-read timeout (hop deadline 2 s x 16 hops = 32 s): with the run's minimum
    link rate the reduce must end within 2 s + its ~4 kB at 1 Mbit/s, naming the link."""
    assert not _ring_threads()

    def trickling_peer(send, recv):
        head = wire._HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(wire.MsgType.DATA), 0, wire.run_tag(RUN),
                                 20, 100_000, b"\0" * 4)
        send.sock.sendall(head + b"{}")
        for _ in range(100):
            time.sleep(0.2)
            try:
                send.sock.sendall(b"\0")
            except OSError:
                return

    out = _one_real_member(trickling_peer, timeout=2.0, min_rate=1e6 / 8)
    assert "at least 1.00 Mbit/s (the run's slowest allowed link)" in out["error"], out
    assert 2.0 < out["seconds"] < 5.0 and out["suspect"] == "pred" and out["cause"] == "timeout", out
    assert not _ring_threads(settle_s=10)


def test_ring_order_maximises_slowest_link():
    names = ["a", "b", "c", "d", "e"]
    rng = np.random.default_rng(3)
    rates = {a: {b: float(rng.uniform(1, 100)) for b in names if b != a} for a in names}
    order = ordering.ring_order(names, rates)
    best = max(ordering.bottleneck(["a", *p], rates) for p in itertools.permutations(names[1:]))
    assert ordering.bottleneck(order, rates) == best
    assert sorted(order) == names
    # A slow link is avoided when possible.
    rates2 = {a: {b: 100.0 for b in names if b != a} for a in names}
    rates2["a"]["b"] = rates2["b"]["a"] = 1.0
    order2 = ordering.ring_order(names, rates2)
    assert ordering.bottleneck(order2, rates2) == 100.0


def test_ring_order_heuristic_large_ring():
    names = [f"n{i:02d}" for i in range(12)]
    rng = np.random.default_rng(0)
    rates = {a: {b: float(rng.uniform(50, 100)) for b in names if b != a} for a in names}
    for a in names:  # two slow islands: any link touching them is slow except between them
        for b in names:
            if a != b and ({a, b} & {"n03", "n07"}):
                rates[a][b] = 1.0
    rates["n03"]["n07"] = rates["n07"]["n03"] = 200.0
    order = ordering.ring_order(names, rates)
    assert sorted(order) == names
    # Optimal: the slow pair sits together, so only 2 slow links (unavoidable: each slow node needs one
    # other neighbour); bottleneck is 1.0 either way (so it cannot tell), but the slow links must be those 2: the
    # name order (n03 and n07 apart) has 4, and the total rate (ring_order's tie-break) tells them apart.
    assert ordering.bottleneck(order, rates) >= ordering.bottleneck(names, rates)
    i = order.index("n03")
    assert "n07" in (order[i - 1], order[(i + 1) % len(order)]), order
    links = [rates[order[k]][order[(k + 1) % len(order)]] for k in range(len(order))]
    assert sum(link == 1.0 for link in links) == 2, (order, links)
    fast = {a: {b: (10.0 if abs(int(a[1:]) - int(b[1:])) in (1, 11) else 1.0) for b in names if b != a}
            for a in names}
    shuffled = list(rng.permutation(names))
    assert ordering.bottleneck(ordering._heuristic(shuffled, fast), fast) == 10.0


def test_ring_order_without_measurements_is_deterministic():
    assert ordering.ring_order(["c", "a", "b"], None) == ["a", "b", "c"]
    assert math.isinf(ordering.bottleneck(["a"], {}))
