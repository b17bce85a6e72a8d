"""Framed, versioned, authenticated and (by default) encrypted messages between islands and the coordinator.

One frame on the wire::

    fixed header (48 bytes, big-endian; sent in clear, always authenticated)
        magic      4s   b"IJXE"
        version    H    PROTOCOL_VERSION
        type       H    MsgType
        seq        Q    per-connection, per-direction sequence number (0, 1, 2, ...)
        run        16s  sha256(run_id)[:16]
        json_len   I    length of the JSON header
        data_len   Q    length of the raw payload
        reserved   4s
    then either (sealed, after the handshake with encrypt on)
        AES-256-GCM(session key of this direction, nonce = seq, associated data = fixed header)
            of JSON header + raw payload, followed by its 16-byte tag
    or (the handshake's frames, and every frame with encrypt off)
        JSON header  (json_len bytes, UTF-8)
        raw payload  (data_len bytes; arrays travel here, never in the JSON)
        mac          32 bytes: HMAC-SHA256(key, fixed header + JSON header + payload)

Handshake: the client sends HELLO (a fresh 16-byte nonce, its clock time, its encrypt setting), the server answers
HELLO_ACK (its nonce and the client's echoed), both MAC'd with a hello key HKDF(secret, run tag, "hello"); a HELLO
older than the replay window or with a nonce seen within it is refused, and an ACK that does not echo this HELLO's
nonce too. Each side then derives two session keys HKDF(secret, nonce_c + nonce_s, "session" + run tag), one per
direction (so a frame reflected back to its sender fails), and the client sends READY, the first session-keyed
frame; a server hands a connection to its handler (a coordinator session, a ring stream, a state transfer) only
after READY verifies. Until then frames are capped at PREAUTH_MAX_BYTES and the whole handshake has a deadline.

Checks run in this order so that the error names the real cause: magic (random bytes), version, lengths
(``max_frame_bytes``), MAC or tag (wrong secret, tampering), run id, sequence. Every refusal raises a
:class:`WireError` subclass; servers log it as ``refused ... from HOST:PORT: <reason>`` and drop only that connection.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("intellect_jax.elastic.wire")

MAGIC = b"IJXE"
# 3: streaming islands name their state snapshot per fragment (hash votes and state transfers of version 2 builds
# would disagree with it: refused at the handshake instead)
PROTOCOL_VERSION = 3
_HEADER = struct.Struct(">4sHHQ16sIQ4s")
HEADER_BYTES = _HEADER.size
MAC_BYTES = 32
TAG_BYTES = 16  # AES-GCM tag
REPLAY_WINDOW_S = 120.0  # a HELLO must be this fresh (clock skew included), and its nonce unseen within the window
MAX_JSON_BYTES = 1 << 20
PREAUTH_MAX_BYTES = 4096  # a frame before the handshake is done (HELLO / HELLO_ACK): nothing is allocated beyond this
MAX_PENDING_HANDSHAKES = 16  # per listener: connections accepted but not yet authenticated
NONCE_BYTES = 16
SEND_SLICE = 1 << 20


class MsgType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    REQUEST = 3
    REPLY = 4
    ERROR = 5
    DATA = 6
    READY = 7  # the client's first session-keyed frame, which completes the handshake


class WireError(ConnectionError):
    """A frame was refused or the connection broke; the connection must be dropped."""


class BadMagic(WireError):
    pass


class VersionMismatch(WireError):
    pass


class FrameTooLarge(WireError):
    pass


class MalformedFrame(WireError):
    pass


class BadMac(WireError):
    pass


class WrongRun(WireError):
    pass


class BadSequence(WireError):
    pass


class ReplayedHello(WireError):
    pass


class EncryptMismatch(WireError):
    pass


class PeerClosed(WireError):
    pass


class PeerTimeout(WireError):
    pass


class RemoteError(RuntimeError):
    """The peer answered a request with an ERROR frame."""


SECRET_BYTES = 32


class SecretError(ValueError):
    """A secret file that is missing, too short or readable by others; the message says the command that fixes it."""


def write_secret(path: str | os.PathLike) -> Path:
    """Writes SECRET_BYTES random bytes to a new file with mode 0600 (``intellect-jax secret --out FILE``)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretError(f"{str(p)!r} already exists; keep it (every island needs the same secret) or remove it "
                          "first to make a new one") from None
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(SECRET_BYTES))
    return p


def load_secret(path: str | os.PathLike) -> bytes:
    """Reads the shared secret file. Refuses a missing one, one shorter than SECRET_BYTES (a passphrase is not a
    key) and one that group or others may read, each with the command that fixes it."""
    p = Path(path)
    if not p.is_file():
        raise SecretError(f"secret file {str(p)!r} does not exist; create one with `intellect-jax secret --out {p}` "
                          "and give the same file to every island and the coordinator")
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise SecretError(f"secret file {str(p)!r} has mode {mode:04o}: group or others can read it; run "
                          f"`chmod 600 {p}`")
    data = p.read_bytes()
    if len(data) < SECRET_BYTES:
        raise SecretError(f"secret file {str(p)!r} holds {len(data)} bytes, fewer than {SECRET_BYTES} random bytes; "
                          f"make a new one with `intellect-jax secret --out NEWFILE` and give it to every island")
    return data


def run_tag(run_id: str) -> bytes:
    return hashlib.sha256(run_id.encode()).digest()[:16]


def _recv_exact(sock: socket.socket, n: int, into: bytearray | None = None, deadline: float | None = None,
                ) -> bytearray:
    """n bytes from sock; with a `deadline` (time.monotonic()) the whole read must finish by then, however the
    peer trickles its bytes."""
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"the handshake was not complete within its deadline ({got}/{n} bytes of a frame)")
            sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:n])
        except TimeoutError:
            if deadline is None:
                raise
            raise PeerTimeout(f"the handshake was not complete within its deadline ({got}/{n} bytes of a frame)") \
                from None
        if k == 0:
            raise PeerClosed("peer closed the connection" if got == 0 else f"peer closed mid-frame ({got}/{n} bytes)")
        got += k
    return buf


def _hkdf(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _aead(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _seal(aead, nonce: bytes, plain, aad: bytes):
    if hasattr(aead, "encrypt_into"):  # cryptography >= 45: no second copy of a large frame
        out = bytearray(len(plain) + TAG_BYTES)
        aead.encrypt_into(nonce, plain, aad, out)
        return out
    return aead.encrypt(nonce, bytes(plain), aad)


def _open(aead, nonce: bytes, sealed, aad: bytes, n: int):
    if hasattr(aead, "decrypt_into"):
        out = bytearray(n)
        aead.decrypt_into(nonce, sealed, aad, out)
        return out
    return aead.decrypt(nonce, bytes(sealed), aad)


def _nonce(seq: int) -> bytes:
    return b"\0\0\0\0" + seq.to_bytes(8, "big")  # unique per (session, direction) key: the frame's sequence


class ReplayGuard:
    """HELLO nonces seen within the replay window (a server's, shared by its connections)."""

    def __init__(self, window_s: float = REPLAY_WINDOW_S):
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, nonce: str, sent_at: float) -> None:
        now = time.time()
        if abs(now - sent_at) > self.window_s:
            raise ReplayedHello(f"HELLO sent {now - sent_at:+.0f} s from now, outside the {self.window_s:.0f} s "
                                "replay window (a replayed handshake, or this host's clock is off: sync it with NTP)")
        with self._lock:
            self._seen = {k: t for k, t in self._seen.items() if now - t <= 2 * self.window_s}
            if nonce in self._seen:
                raise ReplayedHello("HELLO nonce seen before (a replayed handshake)")
            self._seen[nonce] = now


class Conn:
    """One authenticated TCP connection. ``send`` is thread-safe; ``recv`` must be called from one thread at a time.

    Build one with :func:`connect` (client side) or :func:`accept` (server side); both run the handshake (module
    docstring). Until it is done frames are HMAC-SHA256'd with a hello key derived from the secret and the run id;
    after it each direction has its own session key, used for AES-256-GCM (``encrypt``, the default) or HMAC.
    """

    def __init__(self, sock: socket.socket, secret: bytes, run_id: str, max_frame_bytes: int, peer: str,
                 encrypt: bool = True):
        self.sock = sock
        self.peer = peer
        self._secret = secret
        self._run = run_tag(run_id)
        self.encrypt = encrypt
        self._send_key = self._recv_key = _hkdf(secret, self._run, b"intellect-jax/2 hello")
        self._send_aead = self._recv_aead = None
        self.max_frame_bytes = max_frame_bytes
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = threading.Lock()
        self.authenticated = False  # set once the peer has proven it holds this session's key
        self.deadline: float | None = None  # time.monotonic() by which the handshake must be done
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    # -- framing ---------------------------------------------------------------------------------------------------

    def send(self, mtype: MsgType, header: dict[str, Any] | None = None,
             payload: bytes | memoryview | Sequence[bytes | memoryview] = b"") -> None:
        js = json.dumps(header or {}, separators=(",", ":")).encode()
        parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
        parts = [memoryview(p).cast("B") for p in parts]
        data_len = sum(p.nbytes for p in parts)
        if data_len + len(js) > self.max_frame_bytes:
            raise FrameTooLarge(f"refusing to send a {data_len + len(js)}-byte frame: max_frame_bytes="
                                f"{self.max_frame_bytes}")
        with self._send_lock:
            head = _HEADER.pack(MAGIC, PROTOCOL_VERSION, int(mtype), self._send_seq, self._run, len(js), data_len,
                                b"\0" * 4)
            if self._send_aead is not None:  # sealed: header as associated data, JSON + payload encrypted
                plain = b"".join([js, *parts]) if parts else js
                sealed = _seal(self._send_aead, _nonce(self._send_seq), plain, head)
                body, trailer = [memoryview(sealed)], b""
            else:
                mac = hmac.new(self._send_key, head, hashlib.sha256)
                mac.update(js)
                for p in parts:
                    mac.update(p)
                body, trailer = [memoryview(js), *parts], mac.digest()
            try:
                self.sock.sendall(head)
                for p in body:
                    # Slices: a socket timeout bounds one sendall in total, and a big chunk on a slow shared link
                    # may legitimately take longer than that; each slice must still make progress in time.
                    for off in range(0, p.nbytes, SEND_SLICE):
                        self.sock.sendall(p[off:off + SEND_SLICE])
                if trailer:
                    self.sock.sendall(trailer)
            except OSError as e:
                raise WireError(f"send to {self.peer} failed: {e}") from e
            self._send_seq += 1
            self.bytes_sent += HEADER_BYTES + len(js) + data_len + (TAG_BYTES if self._send_aead else MAC_BYTES)

    def recv(self, into: bytearray | None = None) -> tuple[MsgType, dict[str, Any], memoryview]:
        """Next frame as (type, JSON header, payload). `into` may supply a buffer of at least data_len bytes."""
        deadline = None if self.authenticated else self.deadline
        try:
            head = bytes(_recv_exact(self.sock, HEADER_BYTES, deadline=deadline))
        except OSError as e:
            if isinstance(e, WireError):
                raise
            if isinstance(e, TimeoutError):
                raise PeerTimeout(f"nothing from {self.peer} within {self.sock.gettimeout()} s") from e
            raise WireError(f"recv from {self.peer} failed: {e}") from e
        magic, version, mtype, seq, run, json_len, data_len, _ = _HEADER.unpack(head)
        if magic != MAGIC:
            raise BadMagic(f"bad magic {magic!r} (not an intellect-jax elastic peer, or garbage)")
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(f"protocol version {version}, this build speaks {PROTOCOL_VERSION}")
        if not self.authenticated and json_len + data_len > PREAUTH_MAX_BYTES:
            raise FrameTooLarge(f"a {json_len + data_len}-byte frame before authentication (at most "
                                f"{PREAUTH_MAX_BYTES} bytes until the handshake is done)")
        if json_len > MAX_JSON_BYTES or json_len + data_len > self.max_frame_bytes:
            raise FrameTooLarge(f"frame of {json_len + data_len} bytes exceeds max_frame_bytes="
                                f"{self.max_frame_bytes}")
        n = json_len + data_len
        try:
            if self._recv_aead is not None:
                sealed = _recv_exact(self.sock, n + TAG_BYTES, deadline=deadline)
            else:
                js = bytes(_recv_exact(self.sock, json_len, deadline=deadline))
                if into is not None and len(into) >= data_len:
                    payload = memoryview(into)[:data_len]
                    _recv_exact(self.sock, data_len, into, deadline=deadline)
                else:
                    payload = memoryview(_recv_exact(self.sock, data_len, deadline=deadline))
                mac = bytes(_recv_exact(self.sock, MAC_BYTES, deadline=deadline))
        except WireError:
            raise
        except TimeoutError as e:
            raise PeerTimeout(f"{self.peer} stalled mid-frame: nothing within {self.sock.gettimeout()} s") from e
        except OSError as e:
            raise WireError(f"recv from {self.peer} failed: {e}") from e
        if self._recv_aead is not None:
            from cryptography.exceptions import InvalidTag

            try:
                plain = _open(self._recv_aead, _nonce(seq), sealed, head, n)
            except InvalidTag:
                raise BadMac("bad authentication tag (wrong secret, a tampered, reflected or replayed frame, or "
                             "the peers disagree on elastic.encrypt)") from None
            js = bytes(plain[:json_len])
            payload = memoryview(plain)[json_len:]
            if into is not None and len(into) >= data_len:
                into[:data_len] = payload
                payload = memoryview(into)[:data_len]
        else:
            want = hmac.new(self._recv_key, head, hashlib.sha256)
            want.update(js)
            want.update(payload)
            if not hmac.compare_digest(want.digest(), mac):
                raise BadMac("bad HMAC (wrong secret?)" if not self.authenticated else
                             "bad HMAC (wrong secret, a reflected frame, or one replayed from another connection)")
        if not hmac.compare_digest(run, self._run):
            raise WrongRun("frame belongs to another run id")
        if seq != self._recv_seq:
            raise BadSequence(f"sequence {seq}, expected {self._recv_seq} (replayed or reordered frame)")
        self._recv_seq += 1
        try:
            header = json.loads(js) if json_len else {}
            mt = MsgType(mtype)
        except (ValueError, UnicodeDecodeError) as e:
            raise MalformedFrame(f"malformed frame: {e}") from e
        if not isinstance(header, dict):
            raise MalformedFrame("malformed frame: JSON header is not an object")
        self.bytes_received += HEADER_BYTES + n + (TAG_BYTES if self._recv_aead else MAC_BYTES)
        return mt, header, payload

    # -- request / reply helpers -----------------------------------------------------------------------------------

    def request(self, header: dict[str, Any], payload: bytes | memoryview | Sequence = b"",
                into: bytearray | None = None) -> tuple[dict[str, Any], memoryview]:
        self.send(MsgType.REQUEST, header, payload)
        mtype, rep, data = self.recv(into)
        if mtype == MsgType.ERROR:
            raise RemoteError(rep.get("error", "remote error"))
        if mtype != MsgType.REPLY:
            raise MalformedFrame(f"expected REPLY, got {mtype.name}")
        return rep, data

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # -- handshake -------------------------------------------------------------------------------------------------

    def _derive(self, nonce_c: bytes, nonce_s: bytes, client: bool) -> None:
        """Per-direction session keys from both nonces (a reflected frame is under the wrong key)."""
        okm = _hkdf(self._secret, nonce_c + nonce_s, b"intellect-jax/2 session " + self._run, 64)
        c2s, s2c = okm[:32], okm[32:]
        self._send_key, self._recv_key = (c2s, s2c) if client else (s2c, c2s)
        if self.encrypt:
            self._send_aead, self._recv_aead = _aead(self._send_key), _aead(self._recv_key)


def parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {text!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def connect(addr: str | tuple[str, int], secret: bytes, run_id: str, max_frame_bytes: int,
            hello: dict[str, Any] | None = None, timeout: float = 10.0,
            encrypt: bool = True) -> tuple[Conn, dict[str, Any]]:
    """Opens a connection, runs the handshake (sending `hello` fields), returns it with the server's HELLO_ACK."""
    host, port = parse_hostport(addr) if isinstance(addr, str) else addr
    sock = socket.create_connection((host, port), timeout=timeout)
    conn = Conn(sock, secret, run_id, max_frame_bytes, f"{host}:{port}", encrypt)
    conn.deadline = time.monotonic() + timeout
    try:
        nonce_c = os.urandom(NONCE_BYTES)
        conn.send(MsgType.HELLO, dict(hello or {}, nonce=nonce_c.hex(), time=time.time(), encrypt=encrypt))
        mtype, ack, _ = conn.recv()
        if mtype == MsgType.ERROR:
            raise RemoteError(ack.get("error", "handshake refused"))
        if mtype != MsgType.HELLO_ACK or not isinstance(ack.get("nonce"), str):
            raise MalformedFrame(f"expected HELLO_ACK, got {mtype.name}")
        if ack.get("echo") != nonce_c.hex():
            raise ReplayedHello("HELLO_ACK does not answer this HELLO (a replayed handshake)")
        conn._derive(nonce_c, bytes.fromhex(ack["nonce"]), client=True)
        conn.authenticated, conn.deadline = True, None  # the ACK's MAC and echo prove the server, now
        conn.send(MsgType.READY)  # the first session-keyed frame: the server adopts nothing before it
        sock.settimeout(timeout)
    except ValueError as e:
        conn.close()
        raise MalformedFrame(f"malformed HELLO_ACK: {e}") from e
    except BaseException:
        conn.close()
        raise
    return conn, ack


def accept(sock: socket.socket, peer: str, secret: bytes, run_id: str, max_frame_bytes: int,
           ack: dict[str, Any] | None = None, timeout: float = 10.0, encrypt: bool = True,
           replay: ReplayGuard | None = None) -> tuple[Conn, dict[str, Any]]:
    """Server side of the handshake. Raises WireError (the caller logs ``refused ... from peer``) on a bad HELLO.

    The whole handshake (HELLO, HELLO_ACK, then the client's session-keyed READY) must finish within `timeout`
    seconds, however slowly the peer sends; a HELLO outside the replay window or seen before is refused.
    """
    sock.settimeout(timeout)
    conn = Conn(sock, secret, run_id, max_frame_bytes, peer, encrypt)
    conn.deadline = time.monotonic() + timeout
    try:
        mtype, hello, _ = conn.recv()
        if mtype != MsgType.HELLO:
            raise MalformedFrame(f"expected HELLO, got {mtype.name}")
        if not isinstance(hello.get("nonce"), str):
            raise MalformedFrame("HELLO without a nonce")
        sent_at = hello.get("time")
        if not isinstance(sent_at, (int, float)) or isinstance(sent_at, bool):
            raise MalformedFrame("HELLO without a time")
        (replay or ReplayGuard()).check(hello["nonce"], float(sent_at))
        if hello.get("encrypt") is not encrypt:
            raise EncryptMismatch(f"the peer has elastic.encrypt={hello.get('encrypt')} and this side {encrypt}; set "
                                  "the same elastic.encrypt on every island and the coordinator")
        nonce_c = bytes.fromhex(hello["nonce"])
        nonce_s = os.urandom(NONCE_BYTES)
        conn.send(MsgType.HELLO_ACK, dict(ack or {}, nonce=nonce_s.hex(), echo=hello["nonce"]))
        conn._derive(nonce_c, nonce_s, client=False)
        mtype, _, _ = conn.recv()
        if mtype != MsgType.READY:
            raise MalformedFrame(f"expected READY after the handshake, got {mtype.name}")
        conn.authenticated, conn.deadline = True, None
    except ValueError as e:
        conn.close()
        raise MalformedFrame(f"malformed HELLO: {e}") from e
    except BaseException:
        conn.close()
        raise
    return conn, hello


def log_refused(logger: logging.Logger, what: str, peer: str, err: BaseException) -> None:
    logger.warning("refused %s from %s: %s", what, peer, err)


class Server:
    """A threaded TCP server: accepts, runs the handshake, hands each good connection to `handler(conn, hello)`.

    The connection is closed when the handler returns, unless it returns True (it adopted the connection).
    `idle_timeout` bounds each receive in the handler (None: wait forever, for long-polling peers).

    A refused handshake is logged as ``refused connection from HOST:PORT: <reason>`` and affects nothing else.
    At most `max_pending` connections may be in their handshake at once (each has `handshake_timeout` seconds for
    all of it); more are closed at once, so unauthenticated peers hold a bounded number of threads and buffers.
    """

    def __init__(self, bind: str, secret: bytes, run_id: str, max_frame_bytes: int, handler, name: str,
                 logger: logging.Logger | None = None, handshake_timeout: float = 10.0,
                 idle_timeout: float | None = None, max_pending: int = MAX_PENDING_HANDSHAKES,
                 encrypt: bool = True):
        host, port = parse_hostport(bind)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.host = host
        self._secret, self._run_id, self._max = secret, run_id, max_frame_bytes
        self._handler = handler
        self._log = logger or log
        self._name = name
        self._timeout = handshake_timeout
        self._idle = idle_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-accept", daemon=True)
        self._conns: set[Conn] = set()
        self._lock = threading.Lock()
        self._encrypt = encrypt
        self._replay = ReplayGuard()
        self._pending = threading.BoundedSemaphore(max_pending)
        self._max_pending = max_pending
        self._last_full_log = 0.0

    def start(self) -> "Server":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                s, (h, p) = self.sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if not self._pending.acquire(blocking=False):
                now = time.monotonic()
                if now - self._last_full_log > 5.0:  # one line per 5 s, not one per connection of a flood
                    self._last_full_log = now
                    self._log.warning("refused connection from %s:%s: %d handshakes already in progress (the "
                                      "limit); closing new connections until they finish or time out", h, p,
                                      self._max_pending)
                s.close()
                continue
            threading.Thread(target=self._serve, args=(s, f"{h}:{p}"), name=f"{self._name}-conn",
                             daemon=True).start()

    def _serve(self, s: socket.socket, peer: str) -> None:
        try:
            conn, hello = accept(s, peer, self._secret, self._run_id, self._max, timeout=self._timeout,
                                 encrypt=self._encrypt, replay=self._replay)
        except WireError as e:
            log_refused(self._log, "connection", peer, e)
            s.close()
            return
        except OSError as e:
            self._log.info("handshake with %s failed: %s", peer, e)
            s.close()
            return
        finally:
            self._pending.release()
        with self._lock:
            self._conns.add(conn)
        adopted = False
        try:
            conn.settimeout(self._idle)
            adopted = bool(self._handler(conn, hello))
        except PeerTimeout as e:
            self._log.info("closing idle connection: %s", e)
        except WireError as e:
            if not isinstance(e, PeerClosed):
                log_refused(self._log, "frame", peer, e)
        except Exception:  # a handler bug must not take the server down
            self._log.exception("handler for %s failed", peer)
        finally:
            with self._lock:
                self._conns.discard(conn)
            if not adopted:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
