"""launch/delay_relay.py: each direction is held for the one-way delay, and a stream moves at most window / RTT."""

import socket
import sys
import threading
import time
from pathlib import Path

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
