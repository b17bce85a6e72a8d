"""launch/delay_relay.py: each direction is held for the one-way delay, and a stream moves at most window / RTT."""

import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))

from delay_relay import DelayRelay  # noqa: E402


def _server(handler):
    srv = socket.create_server(("127.0.0.1", 0))

    def loop():
        c, _ = srv.accept()
        handler(c)
        c.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()[1]


def _recv_n(c, n):
    got = 0
    while got < n:
        k = len(c.recv(min(1 << 20, n - got)))
        assert k, "closed early"
        got += k


def test_round_trip_is_twice_the_one_way_delay():
    def echo(c):
        while data := c.recv(100):
            c.sendall(data)

    relay = DelayRelay(("127.0.0.1", 0), ("127.0.0.1", _server(echo)), delay_s=0.1).start()
    c = socket.create_connection(("127.0.0.1", relay.port))
    rtts = []
    for _ in range(3):
        t0 = time.monotonic()
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        rtts.append(time.monotonic() - t0)
    c.close()
    relay.close()
    assert all(0.2 <= r < 0.35 for r in rtts), rtts


def test_a_stream_is_limited_to_window_per_round_trip_and_loses_nothing():
    n, window, delay = 6 << 20, 1 << 20, 0.05  # 6 windows: >= 5 round trips of 0.1 s after the first
    done = threading.Event()

    def sink(c):
        _recv_n(c, n)
        c.sendall(b"k")
        done.set()

    relay = DelayRelay(("127.0.0.1", 0), ("127.0.0.1", _server(sink)), delay_s=delay, window=window).start()
    c = socket.create_connection(("127.0.0.1", relay.port))
    t0 = time.monotonic()
    c.sendall(bytes(n))
    assert c.recv(1) == b"k"
    took = time.monotonic() - t0
    c.close()
    relay.close()
    assert done.is_set()
    assert took >= (n / window - 1) * 2 * delay, took  # window / RTT, not the loopback's GB/s
    assert took < 3.0, took


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _exchange(c: socket.socket, out: bytes) -> tuple[str, int]:
    """Sends `out` then half-closes while reading to EOF; returns the SHA-256 and length of what arrived."""
    sender = threading.Thread(target=lambda: (c.sendall(out), c.shutdown(socket.SHUT_WR)))
    sender.start()
    h, size = hashlib.sha256(), 0
    while data := c.recv(1 << 20):
        h.update(data)
        size += len(data)
    sender.join()
    c.close()
    return h.hexdigest(), size


def test_many_connections_both_ways_arrive_intact_and_the_relay_leaks_no_pipes():
    """Four connections at once, each carrying 6 MiB of random bytes each way: every byte arrives, in order, the
    half-close is forwarded after the bytes, and once the connections end the relay's pipes are closed."""
    n, conns = 6 << 20, 4
    rng = np.random.default_rng(0)
    up = [rng.integers(0, 256, n, np.uint8).tobytes() for _ in range(conns)]
    down = [rng.integers(0, 256, n, np.uint8).tobytes() for _ in range(conns)]
    got_up: dict[int, tuple[str, int]] = {}
    srv = socket.create_server(("127.0.0.1", 0))

    def serve(c):
        k = int(c.recv(1)[0])
        got_up[k] = _exchange(c, down[k])

    def accept_loop():
        for _ in range(conns):
            threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    fds0 = _open_fds()
    relay = DelayRelay(("127.0.0.1", 0), srv.getsockname(), delay_s=0.02, window=1 << 20).start()
    got_down: dict[int, tuple[str, int]] = {}

    def client(k):
        c = socket.create_connection(("127.0.0.1", relay.port))
        c.sendall(bytes([k]))
        got_down[k] = _exchange(c, up[k][1:])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in range(conns):
        assert got_down[k] == (hashlib.sha256(down[k]).hexdigest(), n), k
    deadline = time.monotonic() + 5
    while len(got_up) < conns and time.monotonic() < deadline:
        time.sleep(0.05)
    for k in range(conns):
        assert got_up[k] == (hashlib.sha256(up[k][1:]).hexdigest(), n - 1), k
    while _open_fds() > fds0 + 4 and time.monotonic() < deadline:  # listener, wake-up pair, epoll
        time.sleep(0.05)
    assert _open_fds() <= fds0 + 4, os.listdir("/proc/self/fd")
    relay.close()
    while _open_fds() > fds0 and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    assert _open_fds() == fds0, os.listdir("/proc/self/fd")
    srv.close()
