"""A user-space TCP relay that adds a one-way delay to each direction of every connection through it (netem and fq,
the kernel's delay qdiscs, are not available on the machines this project is tested on).

Put it in front of a listener (e.g. an island's, inside its network namespace behind the tbf links of
launch/wan_emulation.py): peers connect to the relay's address, the relay connects on to the real one, and every byte
is held ``delay`` seconds before it is forwarded, in both directions. What a real long path does to TCP is also
emulated: a sender may have at most ``window`` bytes in flight per connection, and a byte stops counting against the
window only one round trip (2 x delay) after the relay read it, as if its ACK had travelled back; so one connection
moves at most window / RTT, like a TCP stream whose window is full (the relay's own sockets use small kernel buffers
so that they add little hidden window). It does not reorder, drop or jitter.

    python launch/delay_relay.py --listen 10.77.0.2:7000 --to 127.0.0.1:7000 --delay-ms 50 --window-mb 4

Library use: ``DelayRelay(("0.0.0.0", 7000), ("127.0.0.1", 7001), delay_s=0.05).start()``.
"""

from __future__ import annotations

import argparse
import collections
import signal
import socket
import threading
import time

READ_BYTES = 256 << 10
SOCK_BUF = 256 << 10  # the relay's kernel buffers: small, so the emulated window is what limits a stream
DEFAULT_WINDOW = 4 << 20  # Linux's default net.ipv4.tcp_wmem max (autotuned send window)


class _Pipe:
    """One direction of one connection: read, hold `delay`, write; at most `window` bytes unacknowledged."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, window: int):
        self.src, self.dst, self.delay, self.window = src, dst, delay, window
        self.queue: collections.deque = collections.deque()  # (due time, bytes | None at EOF)
        self.inflight: collections.deque = collections.deque()  # (time its "ACK" arrives, nbytes)
        self.used = 0
        self.cv = threading.Condition()
        self.dead = False

    def _release(self, now: float) -> None:
        while self.inflight and self.inflight[0][0] <= now:
            self.used -= self.inflight.popleft()[1]

    def reader(self) -> None:
        try:
            while True:
                with self.cv:
                    while True:
                        now = time.monotonic()
                        self._release(now)
                        if self.used < self.window or self.dead:
                            break
                        self.cv.wait(self.inflight[0][0] - now if self.inflight else 0.1)
                    room = self.window - self.used
                if self.dead:
                    return
                data = self.src.recv(min(READ_BYTES, max(room, 1)))
                now = time.monotonic()
                with self.cv:
                    self.queue.append((now + self.delay, data or None))
                    if data:
                        self.inflight.append((now + 2 * self.delay, len(data)))
                        self.used += len(data)
                    self.cv.notify_all()
                if not data:
                    return
        except OSError:
            self._kill()

    def writer(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.dead:
                        now = time.monotonic()
                        if self.queue and self.queue[0][0] <= now:
                            break
                        self.cv.wait(self.queue[0][0] - now if self.queue else None)
                    if self.dead:
                        return
                    _, data = self.queue.popleft()
                if data is None:  # the sender closed: half-close on, after the delay
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
        except OSError:
            self._kill()

    def _kill(self) -> None:
        with self.cv:
            self.dead = True
            self.cv.notify_all()
        for s in (self.src, self.dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class DelayRelay:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float,
                 window: int = DEFAULT_WINDOW):
        if delay_s < 0 or window < READ_BYTES:
            raise ValueError(f"delay must be >= 0 and window >= {READ_BYTES} bytes")
        self.target, self.delay, self.window = target, delay_s, window
        self.sock = socket.create_server(listen, reuse_port=False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()

    def start(self) -> "DelayRelay":
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._join, args=(a,), daemon=True).start()

    def _join(self, a: socket.socket) -> None:
        try:
            b = socket.create_connection(self.target, timeout=10)
        except OSError:
            a.close()
            return
        b.settimeout(None)
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
        pipes = [_Pipe(a, b, self.delay, self.window), _Pipe(b, a, self.delay, self.window)]
        threads = [threading.Thread(target=f, daemon=True) for p in pipes for f in (p.reader, p.writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a.close()
        b.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT peers connect to")
    ap.add_argument("--to", required=True, help="HOST:PORT of the real listener")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each direction (RTT = 2x)")
    ap.add_argument("--window-mb", type=float, default=DEFAULT_WINDOW / 2**20,
                    help="bytes in flight per connection and direction (MiB), released one RTT after reading")
    a = ap.parse_args(argv)
    relay = DelayRelay(_hostport(a.listen), _hostport(a.to), a.delay_ms / 1e3, int(a.window_mb * 2**20)).start()
    print(f"relay {a.listen} -> {a.to}, one-way delay {a.delay_ms:g} ms, window {a.window_mb:g} MiB", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    relay.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
