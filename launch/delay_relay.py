"""A user-space TCP relay that adds a one-way delay to each direction of every connection through it (netem and fq,
the kernel's delay qdiscs, are not available on the machines this project is tested on).

Put it in front of a listener (e.g. an island's, inside its network namespace behind the tbf links of
launch/wan_emulation.py): peers connect to the relay's address, the relay connects on to the real one, and every byte
is held ``delay`` seconds before it is forwarded, in both directions. What a real long path does to TCP is also
emulated: a sender may have at most ``window`` bytes in flight per connection, and a byte stops counting against the
window only one round trip (2 x delay) after the relay read it, as if its ACK had travelled back; so one connection
moves at most window / RTT, like a TCP stream whose window is full (the relay's own sockets use small kernel buffers
so that they add little hidden window). It does not reorder, drop or jitter.

The relay is part of the emulated network, not of the system under test, so it is built to take little of the
host's CPU (it shares the cores with the processes it measures): one thread runs every connection from an event
loop, and the bytes never enter user space: they are spliced (``os.splice``) from the source socket into a chain of
kernel pipes and, when due, from the pipes into the destination socket. Each direction keeps a FIFO of (due time,
byte count) segments over its pipe chain.

    python launch/delay_relay.py --listen 10.77.0.2:7000 --to 127.0.0.1:7000 --delay-ms 50 --window-mb 4

Library use: ``DelayRelay(("0.0.0.0", 7000), ("127.0.0.1", 7001), delay_s=0.05).start()``.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import heapq
import itertools
import os
import selectors
import signal
import socket
import struct
import termios
import threading
import time

READ_BYTES = 256 << 10  # the most one splice moves
SOCK_BUF = 256 << 10  # the relay's kernel buffers: small, so the emulated window is what limits a stream
DEFAULT_WINDOW = 4 << 20  # Linux's default net.ipv4.tcp_wmem max (autotuned send window)
PIPE_BYTES = 1 << 20  # each pipe of a direction's chain (fs.pipe-max-size's default: no privilege needed)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _Pipe:
    """One kernel pipe of a direction's chain and the bytes it holds."""

    __slots__ = ("r", "w", "held", "full")

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.held, self.full = 0, False
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # over the user's pipe quota: the default 64 KiB still works, in more pipes
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _pending(s: socket.socket) -> int:
    """Bytes waiting in a socket's receive queue."""
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


class _Direction:
    """src -> dst of one connection: bytes spliced into a pipe chain, forwarded `delay` after they were read."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, window: int):
        self.src, self.dst, self.delay, self.window = src, dst, delay, window
        self.pipes: collections.deque[_Pipe] = collections.deque()
        self.due: collections.deque = collections.deque()  # [due time, bytes left]; bytes 0 = the sender's EOF
        self.acks: collections.deque = collections.deque()  # (time its "ACK" arrives, nbytes)
        self.used = 0  # bytes read and not yet "acknowledged"
        self.eof = False  # the source closed (the EOF is queued)
        self.done = False  # the EOF was forwarded
        self.readable = False
        self.write_blocked = False

    def release(self, now: float) -> None:
        while self.acks and self.acks[0][0] <= now:
            self.used -= self.acks.popleft()[1]

    def wants_read(self) -> bool:
        return not self.eof and self.used < self.window

    def read(self, now: float) -> None:
        """Splice what the source has (within the window) into the chain; one segment per call."""
        got = 0
        while not self.eof and self.used + got < self.window:
            if not self.pipes or self.pipes[-1].full:
                self.pipes.append(_Pipe())
            pipe = self.pipes[-1]
            try:
                n = os.splice(self.src.fileno(), pipe.w, min(READ_BYTES, self.window - self.used - got),
                              flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:  # the socket is drained, or the pipe is full (its slots, not its bytes)
                if pipe.held and _pending(self.src):
                    pipe.full = True
                    continue
                self.readable = False
                break
            if n == 0:
                self.eof = True
                break
            pipe.held += n
            got += n
        if got:
            self.due.append([now + self.delay, got])
            self.acks.append((now + 2 * self.delay, got))
            self.used += got
        if self.eof:
            self.due.append([now + self.delay, 0])

    def write(self, now: float) -> None:
        """Forward every due segment the destination takes now."""
        while self.due and self.due[0][0] <= now and not self.write_blocked:
            seg = self.due[0]
            if seg[1] == 0:  # the sender's EOF: half-close on, after the delay
                self.due.popleft()
                self.dst.shutdown(socket.SHUT_WR)
                self.done = True
                return
            pipe = self.pipes[0]
            try:
                n = os.splice(pipe.r, self.dst.fileno(), min(seg[1], pipe.held), flags=os.SPLICE_F_MOVE)
            except BlockingIOError:
                self.write_blocked = True
                return
            pipe.held -= n
            seg[1] -= n
            if seg[1] == 0:
                self.due.popleft()
            if pipe.held == 0:  # drained: the next pipe of the chain, or this one again from empty
                if len(self.pipes) > 1:
                    self.pipes.popleft().close()
                else:
                    pipe.full = False

    def next_time(self) -> float | None:
        """When this direction next has something to do without an I/O event (a segment due, the window opening)."""
        times = []
        if self.due and not self.write_blocked:
            times.append(self.due[0][0])
        if not self.eof and self.used >= self.window and self.acks:
            times.append(self.acks[0][0])
        return min(times) if times else None

    def close(self) -> None:
        for p in self.pipes:
            p.close()
        self.pipes.clear()


class _Connection:
    def __init__(self, a: socket.socket, b: socket.socket, delay: float, window: int):
        self.socks = (a, b)
        self.dirs = (_Direction(a, b, delay, window), _Direction(b, a, delay, window))
        self.registered: dict[socket.socket, int] = {}  # the selector events each socket is registered for
        self.timer: float | None = None  # the latest wake-up pushed for this connection

    def interest(self, s: socket.socket) -> int:
        out, inn = (self.dirs[0], self.dirs[1]) if s is self.socks[0] else (self.dirs[1], self.dirs[0])
        ev = selectors.EVENT_READ if out.wants_read() else 0
        return ev | (selectors.EVENT_WRITE if inn.write_blocked else 0)

    @property
    def finished(self) -> bool:
        return all(d.done for d in self.dirs)

    def close(self) -> None:
        for d in self.dirs:
            d.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


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
        self._new: collections.deque = collections.deque()  # socket pairs from the accept thread
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)

    def start(self) -> "DelayRelay":
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()
        threading.Thread(target=self._loop, name="relay-loop", daemon=True).start()
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
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
            s.setblocking(False)
        self._new.append((a, b))
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        """Every connection, one thread: each pass touches only the connections with an I/O event or a due timer."""
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        conns: dict[socket.socket, _Connection] = {}
        live: set[_Connection] = set()
        timers: list = []  # heap of (time, seq, connection); stale entries are harmless (a pass is idempotent)
        seq = itertools.count()
        while not self._stop.is_set():
            now = time.monotonic()
            events = sel.select(max(0.0, timers[0][0] - now) if timers else None)
            now = time.monotonic()
            active: set[_Connection] = set()
            for key, ev in events:
                s = key.fileobj
                if s is self._wake_r:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                c = conns.get(s)
                if c is None:
                    continue
                i = 0 if s is c.socks[0] else 1
                if ev & selectors.EVENT_READ:
                    c.dirs[i].readable = True
                if ev & selectors.EVENT_WRITE:
                    c.dirs[1 - i].write_blocked = False
                active.add(c)
            while self._new:
                a, b = self._new.popleft()
                c = _Connection(a, b, self.delay, self.window)
                live.add(c)
                for s in (a, b):
                    conns[s] = c
                    c.dirs[0 if s is a else 1].readable = True
                active.add(c)
            while timers and timers[0][0] <= now:
                active.add(heapq.heappop(timers)[2])
            for c in active:
                if c not in live:
                    continue
                try:
                    for d in c.dirs:
                        d.release(now)
                        if d.readable and d.wants_read():
                            d.read(now)
                        d.write(now)
                except OSError:  # a peer reset or closed early: drop the whole connection, as a real path would
                    c.dirs[0].done = c.dirs[1].done = True
                if c.finished:
                    live.discard(c)
                    for s in c.socks:
                        if c.registered.pop(s, 0):
                            sel.unregister(s)
                        conns.pop(s, None)
                    c.close()
                    continue
                t = min((t for t in (d.next_time() for d in c.dirs) if t is not None), default=None)
                if t is not None and t != c.timer:
                    c.timer = t
                    heapq.heappush(timers, (t, next(seq), c))
                for s in c.socks:
                    want, have = c.interest(s), c.registered.get(s, 0)
                    if want != have:
                        if not have:
                            sel.register(s, want)
                        elif not want:
                            sel.unregister(s)
                        else:
                            sel.modify(s, want)
                        c.registered[s] = want
        for c in live:
            c.close()
        sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def close(self) -> None:
        """Stops accepting and ends every connection through the relay (the loop closes them and its own fds)."""
        self._stop.set()
        self.sock.close()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass


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
