"""Framed, versioned, mutually authenticated and (by default) encrypted messages between islands and the coordinator.

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
    then either (sealed: every frame after the key agreement, with encrypt on)
        AES-256-GCM(session key of this direction, nonce = seq, associated data = fixed header)
            of JSON header + raw payload, followed by its 16-byte tag
    or (HELLO / HELLO_ACK, and every frame with encrypt off)
        JSON header  (json_len bytes, UTF-8)
        raw payload  (data_len bytes; arrays travel here, never in the JSON)
        mac          32 bytes: HMAC-SHA256(key, fixed header + JSON header + payload); before the key agreement the
                     key is public (derived from the run id): a checksum, the signatures below authenticate

Handshake (SIGMA-I, as in TLS 1.3 and SSH: ephemeral X25519, static Ed25519 identities; identity.py):

    client -> server  HELLO      {eph: client's ephemeral X25519 public key, encrypt}            clear
    server -> client  HELLO_ACK  {eph: server's ephemeral X25519 public key}                      clear
                      both derive two session keys (one per direction, so a reflected frame fails) from
                      HKDF(X25519 shared secret, salt = SHA-256 of the two frames' exact bytes, run id)
    server -> client  AUTH       {key, sig: Ed25519 over "server" + run + transcript}             sealed
    client -> server  AUTH       {key, name, sig over "client" + run + transcript, the HELLO fields}  sealed

The client checks that the server's key is the one it meant to reach (the coordinator's, or the peer's that the
coordinator named); the server looks the client's proven key up in the admitted identities (``identity.Keys``): the
peer's name is that lookup's answer (``Conn.identity``), never a field it sends, and a key that is not admitted is
refused with a sealed ERROR naming its fingerprint. Identities and the HELLO fields (what the connection is for) travel
sealed, so an eavesdropper sees neither. Fresh ephemeral keys make every connection's keys new: a replayed HELLO or AUTH
cannot complete a handshake. A server hands a connection to its handler only after the client's AUTH verifies.

Until then frames are capped at PREAUTH_MAX_BYTES, the HELLO must arrive within HELLO_TIMEOUT_S of the connection and
the whole handshake within the server's handshake deadline; each source address may hold at most
``max_pending_per_host`` handshakes in progress. Receive buffers grow with the bytes that arrive, never to a size a peer
declares.

Checks run in this order so that the error names the real cause: magic (random bytes), version, lengths
(``max_frame_bytes``), MAC or tag (tampering, wrong key), run id, sequence. Every refusal raises a
:class:`WireError` subclass; servers log it as ``refused ... from HOST:PORT: <reason>`` and drop only that connection.
"""

from __future__ import annotations

import collections
import enum
import errno
import hashlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Sequence

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .identity import Auth, fingerprint, public_bytes, valid_name

log = logging.getLogger("intellect_jax.elastic.wire")

MAGIC = b"IJXE"
# 3: streaming islands name their state snapshot per fragment (hash votes and state transfers of version 2 builds
# would disagree with it: refused at the handshake instead)
# 4: per-island identities (an X25519 + Ed25519 handshake instead of a shared-secret MAC; names from keys)
PROTOCOL_VERSION = 4
_HEADER = struct.Struct(">4sHHQ16sIQ4s")
HEADER_BYTES = _HEADER.size
MAC_BYTES = 32
TAG_BYTES = 16  # AES-GCM tag
KEY_BYTES = 32  # X25519 and Ed25519 public keys
SIG_BYTES = 64
MAX_JSON_BYTES = 1 << 20
PREAUTH_MAX_BYTES = 4096  # a frame before the handshake is done (HELLO / HELLO_ACK): nothing is allocated beyond this
HELLO_TIMEOUT_S = 1.0  # a client sends its HELLO as soon as it is connected
HANDSHAKE_TIMEOUT_S = 5.0  # the whole handshake, on the server (a few round trips)
MAX_PENDING_HANDSHAKES = 64  # per listener: connections accepted but not yet authenticated
MAX_PENDING_PER_HOST = 24  # of those, from one source address (a ring link opens up to 16 streams at once)
MAX_CONNECTIONS = 1024  # authenticated connections one listener holds at once
# New connections one source address may start per second (a token bucket): a handshake costs the server two
# public-key operations, so a flood from one address must not take a core. An island opens at most ~40 at a burst
# (its ring streams, a state transfer, probes).
HANDSHAKES_PER_S, HANDSHAKE_BURST = 20.0, 64.0
RECV_START = 1 << 20  # a frame's buffer starts at this size and doubles as its bytes arrive
SEND_SLICE = 1 << 20
_LABEL = b"intellect-jax/4 "


class MsgType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    REQUEST = 3
    REPLY = 4
    ERROR = 5
    DATA = 6
    AUTH = 7  # each side's proof of its identity, the first sealed frame in each direction


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


class NotAdmitted(WireError):
    """The peer's key is not an admitted identity, or not the one expected, or its proof of the key failed."""


class EncryptMismatch(WireError):
    pass


class PeerClosed(WireError):
    pass


class PeerTimeout(WireError):
    pass


class RemoteError(RuntimeError):
    """The peer answered a request with an ERROR frame."""


def run_tag(run_id: str) -> bytes:
    return hashlib.sha256(run_id.encode()).digest()[:16]


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None, start: int = RECV_START) -> bytearray:
    """n bytes from sock. The buffer starts at `start` bytes and doubles as bytes arrive (a peer that declares a
    large frame and sends little of it holds little memory). With a `deadline` (time.monotonic()) the whole read must
    finish by then, however the peer trickles its bytes."""
    buf = bytearray(min(n, start))
    got = 0
    while got < n:
        if got == len(buf):
            buf += bytes(min(n, 2 * len(buf)) - len(buf))
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"the handshake was not complete within its deadline ({got}/{n} bytes of a frame)")
            sock.settimeout(left)
        try:
            with memoryview(buf) as view:
                k = sock.recv_into(view[got:])
        except TimeoutError:
            if deadline is None:
                raise
            raise PeerTimeout(f"the handshake was not complete within its deadline ({got}/{n} bytes of a frame)") \
                from None
        if k == 0:
            raise PeerClosed("peer closed the connection" if got == 0 else f"peer closed mid-frame ({got}/{n} bytes)")
        got += k
    return buf


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


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


def _key_field(d: dict, field: str, n: int = KEY_BYTES) -> bytes:
    v = d.get(field)
    if not isinstance(v, str) or len(v) != 2 * n:
        raise MalformedFrame(f"handshake field {field!r} must be {n} bytes in hex")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise MalformedFrame(f"handshake field {field!r} must be {n} bytes in hex") from None


class Conn:
    """One authenticated TCP connection. ``send`` is thread-safe; ``recv`` must be called from one thread at a time.

    Build one with :func:`connect` (client side) or :func:`accept` (server side); both run the handshake (module
    docstring). ``identity`` is the other side's name, as its proven key is listed.
    """

    def __init__(self, sock: socket.socket, run_id: str, max_frame_bytes: int, peer: str, encrypt: bool = True):
        self.sock = sock
        self.peer = peer
        self._run = run_tag(run_id)
        self.encrypt = encrypt
        self._send_key = self._recv_key = _hkdf(self._run, b"", _LABEL + b"hello")  # public: a checksum
        self._send_aead = self._recv_aead = None
        self._transcript: Any = hashlib.sha256()  # the handshake's clear frames, as sent and received
        self.max_frame_bytes = max_frame_bytes  # the largest frame sent or received
        self.max_recv_bytes = max_frame_bytes  # a server may lower it for what it expects to receive (e.g. requests)
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = threading.Lock()
        self.authenticated = False  # set once the peer has proven its identity
        self.identity: str | None = None  # the peer's admitted name
        self.deadline: float | None = None  # time.monotonic() by which the handshake must be done
        self.evicted = False  # closed by its server to make room for a newer connection of the same identity
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
                if self._transcript is not None:
                    self._transcript.update(head + js + b"".join(parts) + trailer)
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

    def recv(self) -> tuple[MsgType, dict[str, Any], memoryview]:
        """Next frame as (type, JSON header, payload)."""
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
            raise VersionMismatch(f"protocol version {version}, this build speaks {PROTOCOL_VERSION}: every island "
                                  "and the coordinator must run the same intellect-jax release")
        if not self.authenticated and json_len + data_len > PREAUTH_MAX_BYTES:
            raise FrameTooLarge(f"a {json_len + data_len}-byte frame before authentication (at most "
                                f"{PREAUTH_MAX_BYTES} bytes until the handshake is done)")
        cap = min(self.max_frame_bytes, self.max_recv_bytes)
        if json_len > MAX_JSON_BYTES or json_len + data_len > cap:
            raise FrameTooLarge(f"frame of {json_len + data_len} bytes exceeds the {cap} bytes this connection "
                                "accepts (max_frame_bytes)")
        n = json_len + data_len
        try:
            if self._recv_aead is not None:
                sealed = _recv_exact(self.sock, n + TAG_BYTES, deadline=deadline)
            else:
                body = _recv_exact(self.sock, n + MAC_BYTES, deadline=deadline)
        except WireError:
            raise
        except TimeoutError as e:
            raise PeerTimeout(f"{self.peer} stalled mid-frame: nothing within {self.sock.gettimeout()} s") from e
        except OSError as e:
            raise WireError(f"recv from {self.peer} failed: {e}") from e
        if self._recv_aead is not None:
            try:
                plain = _open(self._recv_aead, _nonce(seq), sealed, head, n)
            except InvalidTag:
                raise BadMac("bad authentication tag (a tampered, reflected or replayed frame, or the peers disagree "
                             "on elastic.encrypt)") from None
            js = bytes(plain[:json_len])
            payload = memoryview(plain)[json_len:]
        else:
            js, payload, mac = bytes(body[:json_len]), memoryview(body)[json_len:n], bytes(body[n:])
            want = hmac.new(self._recv_key, head, hashlib.sha256)
            want.update(js)
            want.update(payload)
            if not hmac.compare_digest(want.digest(), mac):
                raise BadMac("bad HMAC (a corrupted frame)" if self._transcript is not None else
                             "bad HMAC (a tampered, reflected or replayed frame)")
            if self._transcript is not None:
                self._transcript.update(head + bytes(body))
        if not hmac.compare_digest(run, self._run):
            raise WrongRun("frame belongs to another run id")
        if seq != self._recv_seq:
            raise BadSequence(f"sequence {seq}, expected {self._recv_seq} (replayed or reordered frame)")
        self._recv_seq += 1
        try:
            header = json.loads(js) if json_len else {}
            mt = MsgType(mtype)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise MalformedFrame(f"malformed frame: {type(e).__name__}: {str(e)[:100]}") from None
        if not isinstance(header, dict):
            raise MalformedFrame("malformed frame: JSON header is not an object")
        self.bytes_received += HEADER_BYTES + n + (TAG_BYTES if self._recv_aead else MAC_BYTES)
        return mt, header, payload

    # -- request / reply helpers -----------------------------------------------------------------------------------

    def request(self, header: dict[str, Any], payload: bytes | memoryview | Sequence = b"",
                ) -> tuple[dict[str, Any], memoryview]:
        try:
            self.send(MsgType.REQUEST, header, payload)
        except WireError:
            self._why_closed()
            raise
        mtype, rep, data = self.recv()
        if mtype == MsgType.ERROR:
            raise RemoteError(str(rep.get("error", "remote error"))[:2000])
        if mtype != MsgType.REPLY:
            raise MalformedFrame(f"expected REPLY, got {mtype.name}")
        return rep, data

    def _why_closed(self) -> None:
        """After a failed send: an ERROR the peer sent before closing (e.g. "not admitted") is raised as RemoteError."""
        try:
            self.sock.settimeout(0.5)
            mtype, rep, _ = self.recv()
        except (OSError, WireError):
            return
        if mtype == MsgType.ERROR:
            raise RemoteError(str(rep.get("error", "remote error"))[:2000])

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

    def _agree(self, eph: X25519PrivateKey, peer_eph: bytes, client: bool) -> bytes:
        """Session keys from the ephemeral exchange and the transcript so far; returns the transcript hash, which
        both identities sign."""
        try:
            shared = eph.exchange(X25519PublicKey.from_public_bytes(peer_eph))
        except ValueError as e:  # a low-order point: no shared secret
            raise MalformedFrame(f"bad ephemeral key: {e}") from None
        th = self._transcript.digest()
        self._transcript = None
        okm = _hkdf(shared, th, _LABEL + b"session " + self._run, 64)
        c2s, s2c = okm[:32], okm[32:]
        self._send_key, self._recv_key = (c2s, s2c) if client else (s2c, c2s)
        if self.encrypt:
            self._send_aead, self._recv_aead = AESGCM(self._send_key), AESGCM(self._recv_key)
        return th

    def _signed(self, role: bytes, th: bytes) -> bytes:
        return _LABEL + role + b"\0" + self._run + th


def _verify(raw: bytes, sig: bytes, msg: bytes, who: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, msg)
    except (InvalidSignature, ValueError):
        raise NotAdmitted(f"{who} failed to prove it holds key {fingerprint(raw)} (bad signature)") from None


def parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {text!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def connect(addr: str | tuple[str, int], auth: Auth, expect: str, run_id: str, max_frame_bytes: int,
            hello: dict[str, Any] | None = None, timeout: float = 10.0,
            encrypt: bool = True, source: tuple[str, int] | None = None) -> tuple[Conn, dict[str, Any]]:
    """Opens a connection to `expect` (the coordinator, or an island by name) at `addr` (from the local address
    `source`, if given) and runs the handshake; the server must prove it holds the key `auth.keys` has for that name.
    `hello`: what the connection is for (sealed, sent with our proof). Returns the connection and the server's AUTH
    fields."""
    want = auth.keys.public(expect)
    if want is None:
        raise NotAdmitted(f"no admitted key is known for {expect!r}; it cannot be authenticated")
    host, port = parse_hostport(addr) if isinstance(addr, str) else addr
    sock = socket.create_connection((host, port), timeout=timeout, source_address=source)
    conn = Conn(sock, run_id, max_frame_bytes, f"{host}:{port}", encrypt)
    conn.deadline = time.monotonic() + timeout
    try:
        eph = X25519PrivateKey.generate()
        conn.send(MsgType.HELLO, {"eph": public_bytes_x(eph).hex(), "encrypt": encrypt})
        mtype, ack, _ = conn.recv()
        if mtype == MsgType.ERROR:
            raise RemoteError(str(ack.get("error", "handshake refused"))[:2000])
        if mtype != MsgType.HELLO_ACK:
            raise MalformedFrame(f"expected HELLO_ACK, got {mtype.name}")
        th = conn._agree(eph, _key_field(ack, "eph"), client=True)
        mtype, sa, _ = conn.recv()
        if mtype == MsgType.ERROR:
            raise RemoteError(str(sa.get("error", "handshake refused"))[:2000])
        if mtype != MsgType.AUTH:
            raise MalformedFrame(f"expected AUTH, got {mtype.name}")
        key = _key_field(sa, "key")
        if key != want:
            raise NotAdmitted(f"{host}:{port} proved key {fingerprint(key)}, but {expect!r} is admitted with "
                              f"{fingerprint(want)} (the wrong address, or someone else listening there)")
        _verify(key, _key_field(sa, "sig", SIG_BYTES), conn._signed(b"server", th), f"{expect} at {host}:{port}")
        mine = dict(hello or {}, key=auth.me.public.hex(), name=auth.me.name,
                    sig=auth.me.key.sign(conn._signed(b"client", th)).hex())
        conn.send(MsgType.AUTH, mine)
        conn.authenticated, conn.deadline, conn.identity = True, None, expect
        sock.settimeout(timeout)
    except BaseException:
        conn.close()
        raise
    return conn, sa


def public_bytes_x(eph: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def accept(sock: socket.socket, peer: str, auth: Auth, run_id: str, max_frame_bytes: int,
           timeout: float = HANDSHAKE_TIMEOUT_S, encrypt: bool = True,
           hello_timeout: float = HELLO_TIMEOUT_S) -> tuple[Conn, dict[str, Any]]:
    """Server side of the handshake. Raises WireError (the caller logs ``refused ... from peer``) on a bad HELLO, a
    key that is not admitted or a failed proof; returns the connection (``identity`` set) and the client's fields.

    The HELLO must arrive within `hello_timeout` and the whole handshake within `timeout` seconds, however slowly
    the peer sends."""
    sock.settimeout(timeout)
    conn = Conn(sock, run_id, max_frame_bytes, peer, encrypt)
    t0 = time.monotonic()
    conn.deadline = t0 + min(hello_timeout, timeout)
    try:
        try:
            mtype, hello, _ = conn.recv()
        except VersionMismatch as e:
            _tell_version(sock, run_id)
            raise e
        conn.deadline = t0 + timeout
        if mtype != MsgType.HELLO:
            raise MalformedFrame(f"expected HELLO, got {mtype.name}")
        if hello.get("encrypt") is not encrypt:
            raise EncryptMismatch(f"the peer has elastic.encrypt={hello.get('encrypt')} and this side {encrypt}; set "
                                  "the same elastic.encrypt on every island and the coordinator")
        peer_eph = _key_field(hello, "eph")
        eph = X25519PrivateKey.generate()
        conn.send(MsgType.HELLO_ACK, {"eph": public_bytes_x(eph).hex()})
        th = conn._agree(eph, peer_eph, client=False)
        conn.send(MsgType.AUTH, {"key": auth.me.public.hex(),
                                 "sig": auth.me.key.sign(conn._signed(b"server", th)).hex()})
        mtype, ca, _ = conn.recv()
        if mtype != MsgType.AUTH:
            raise MalformedFrame(f"expected AUTH, got {mtype.name}")
        key = _key_field(ca, "key")
        claimed = ca.get("name")
        claimed = claimed if valid_name(claimed) else None
        _verify(key, _key_field(ca, "sig", SIG_BYTES), conn._signed(b"client", th), f"the client at {peer}")
        name = auth.keys.identify(key, claimed)
        if name is None:
            why = (f"key {fingerprint(key)} (claiming to be {claimed!r}) is not admitted to this run; add its "
                   "line to the islands file on the coordinator" if auth.mode == "keys" else
                   f"{claimed!r} did not prove the key derived from this run's secret (a different secret file?)")
            _refuse(conn, why)
        if claimed is not None and claimed != name:
            _refuse(conn, f"key {fingerprint(key)} is admitted as {name!r}, not {claimed!r}: set elastic.island_name="
                          f"{name} (or leave it empty)")
        conn.authenticated, conn.deadline, conn.identity = True, None, name
    except BaseException:
        conn.close()
        raise
    return conn, {k: v for k, v in ca.items() if k not in ("key", "sig", "name")}


def _refuse(conn: Conn, why: str) -> None:
    """Tells a refused peer why (sealed), then raises NotAdmitted. The peer may already be sending its first request:
    closing with it unread would reset the connection and could drop the ERROR, so our side is shut for writing and
    what arrives is read and dropped (at most a moment, 64 KiB) until the peer closes."""
    try:
        conn.send(MsgType.ERROR, {"error": f"not admitted: {why}"})
        conn.sock.shutdown(socket.SHUT_WR)
        conn.sock.settimeout(1.0)
        drained = 0
        while drained < 65536:
            b = conn.sock.recv(4096)
            if not b:
                break
            drained += len(b)
    except (OSError, WireError):
        pass
    raise NotAdmitted(why)


def _tell_version(sock: socket.socket, run_id: str) -> None:
    """An ERROR frame of this version to a peer of another one: its own version check then names both versions."""
    try:
        c = Conn(sock, run_id, PREAUTH_MAX_BYTES, "")
        c._transcript = None
        c.send(MsgType.ERROR, {"error": f"this peer speaks protocol version {PROTOCOL_VERSION}"})
    except (OSError, WireError):
        pass


def log_refused(logger: logging.Logger, what: str, peer: str, err: BaseException) -> None:
    logger.warning("refused %s from %s: %s", what, peer, err)


class RateLimitedLog:
    """At most one line per `key` per `every_s` seconds, with how many were held back (a flood of the same refusal
    is one line, not thousands)."""

    def __init__(self, logger: logging.Logger, every_s: float = 5.0, max_keys: int = 1024):
        self._log, self.every_s, self._max = logger, every_s, max_keys
        self._last: dict[Any, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, key: Any, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (-1e18, 0))
            if now - last < self.every_s:
                self._last[key] = (last, held + 1)
                return
            if len(self._last) >= self._max:
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.every_s}
            self._last[key] = (now, 0)
        self._log.log(level, msg + (f" ({held} more like it in the last {self.every_s:.0f} s)" if held else ""), *args)


class Server:
    """A threaded TCP server: accepts, runs the handshake, hands each good connection to `handler(conn, hello)`.

    The connection is closed when the handler returns, unless it returns True (it adopted the connection).
    `idle_timeout` bounds each receive in the handler (None: wait forever, for long-polling peers).

    Before authentication: at most `max_pending` connections in their handshake at once and `max_pending_per_host`
    from one source address, which may start at most HANDSHAKES_PER_S per second (more are closed at once, one log
    line per 5 s), each with HELLO_TIMEOUT_S for its HELLO and `handshake_timeout` for all of it. After:
    `group(identity, hello) -> (name, cap)` puts each connection in a group (e.g. an island's heartbeat connection)
    that holds at most `cap` connections: a new one closes the oldest
    of its group (an honest peer that reconnects replaces its stale connection; nobody holds more); at most
    `max_connections` in all. An accept that fails (e.g. out of file descriptors) backs off and is logged.
    """

    def __init__(self, bind: str, auth: Auth, run_id: str, max_frame_bytes: int, handler, name: str,
                 logger: logging.Logger | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 idle_timeout: float | None = None, max_pending: int = MAX_PENDING_HANDSHAKES,
                 max_pending_per_host: int = MAX_PENDING_PER_HOST, encrypt: bool = True,
                 group: Callable[[str, dict], tuple[str, int]] | None = None,
                 max_connections: int = MAX_CONNECTIONS, hello_timeout: float = HELLO_TIMEOUT_S):
        host, port = parse_hostport(bind)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.host = host
        self.auth, self._run_id, self._max = auth, run_id, max_frame_bytes
        self._handler = handler
        self._log = logger or log
        self._limited = RateLimitedLog(self._log)
        self._name = name
        self._timeout = handshake_timeout
        self._hello_timeout = hello_timeout
        self._idle = idle_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-accept", daemon=True)
        self._lock = threading.Lock()
        self._encrypt = encrypt
        self._pending: collections.Counter[str] = collections.Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # host -> (handshake tokens, when counted)
        self._max_pending, self._max_per_host = max_pending, max_pending_per_host
        self._group = group or (lambda identity, hello: (identity, 64))
        self._groups: dict[tuple[str, str], collections.deque[Conn]] = {}
        self._conns: set[Conn] = set()
        self._max_connections = max_connections

    def start(self) -> "Server":
        self._thread.start()
        return self

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                s, addr = self.sock.accept()
                backoff = 0.0
            except OSError as e:
                if self._stop.is_set():
                    return
                # Out of file descriptors (EMFILE/ENFILE) or memory: spinning on accept would burn a core and starve
                # everyone; wait for connections to close.
                backoff = min(1.0, max(0.05, 2 * backoff))
                self._limited("accept", logging.WARNING, "%s: accept failed (%s); backing off %.2f s",
                              self._name, errno.errorcode.get(e.errno or 0, str(e)), backoff)
                time.sleep(backoff)
                continue
            h, p = addr[0], addr[1]
            with self._lock:
                total, mine = sum(self._pending.values()), self._pending[h]
                full = total >= self._max_pending or mine >= self._max_per_host
                fast = not full and not self._token(h)
                if not full and not fast:
                    self._pending[h] += 1
            if full or fast:
                why = (f"{HANDSHAKES_PER_S:g} new connections per second from {h} (the limit per address)" if fast
                       else f"{mine} handshakes from {h} already in progress (the limit per address)"
                       if mine >= self._max_per_host else f"{total} handshakes already in progress (the limit)")
                self._limited(("full", h), logging.WARNING, "refused connection from %s:%s: %s; closing new "
                              "connections until they finish or time out", h, p, why)
                s.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(s, h, f"{h}:{p}"), name=f"{self._name}-conn",
                                 daemon=True).start()
            except RuntimeError as e:  # can't start a thread: out of memory or thread limits
                self._release(h)
                s.close()
                self._limited("thread", logging.WARNING, "%s: refused connection from %s: %s", self._name, h, e)

    def _token(self, host: str) -> bool:
        """Takes one of `host`'s handshake tokens (under self._lock); False: it is over its rate."""
        now = time.monotonic()
        tokens, last = self._buckets.get(host, (HANDSHAKE_BURST, now))
        tokens = min(HANDSHAKE_BURST, tokens + (now - last) * HANDSHAKES_PER_S)
        if len(self._buckets) > 4096:  # forget full buckets (hosts that stopped)
            self._buckets = {k: v for k, v in self._buckets.items()
                             if v[0] + (now - v[1]) * HANDSHAKES_PER_S < HANDSHAKE_BURST}
        if tokens < 1.0:
            self._buckets[host] = (tokens, now)
            return False
        self._buckets[host] = (tokens - 1.0, now)
        return True

    def _release(self, host: str) -> None:
        with self._lock:
            self._pending[host] -= 1
            if self._pending[host] <= 0:
                del self._pending[host]

    def _serve(self, s: socket.socket, host: str, peer: str) -> None:
        try:
            conn, hello = accept(s, peer, self.auth, self._run_id, self._max, timeout=self._timeout,
                                 encrypt=self._encrypt, hello_timeout=self._hello_timeout)
        except WireError as e:
            self._limited(("refused", host, type(e)), logging.WARNING, "refused connection from %s: %s", peer, e)
            s.close()
            return
        except OSError as e:
            self._log.info("handshake with %s failed: %s", peer, e)
            s.close()
            return
        finally:
            self._release(host)
        if not self._admit(conn, hello):
            return
        adopted = False
        try:
            conn.settimeout(self._idle)
            adopted = bool(self._handler(conn, hello))
        except PeerTimeout as e:
            self._log.info("closing idle connection of %s: %s", conn.identity, e)
        except WireError as e:
            if not isinstance(e, PeerClosed) and not conn.evicted:
                self._limited(("frame", conn.identity, type(e)), logging.WARNING, "refused frame from %s (%s): %s",
                              conn.identity, peer, e)
        except Exception as e:  # a handler bug must not take the server down, nor flood the log
            self._limited(("handler", conn.identity, type(e)), logging.ERROR, "handler for %s (%s) failed: %s: %s",
                          conn.identity, peer, type(e).__name__, e)
            self._log.debug("handler traceback", exc_info=True)
        finally:
            if not adopted:
                self.release(conn)
                conn.close()

    def _admit(self, conn: Conn, hello: dict) -> bool:
        """Puts an authenticated connection in its group (closing the group's oldest when full); False: refused."""
        try:
            gname, cap = self._group(conn.identity or "", hello)
        except Exception as e:  # noqa: BLE001 - a bad HELLO field
            self._limited(("group", conn.identity), logging.WARNING, "refused connection of %s (%s): %s",
                          conn.identity, conn.peer, e)
            conn.close()
            return False
        key = (conn.identity or "", gname)
        evict = []
        with self._lock:
            # Adopted connections are closed by their adopters (e.g. the ring): forget the closed ones here.
            self._conns = {c for c in self._conns if not c.closed}
            for k in [k for k, q in self._groups.items() if any(c.closed for c in q)]:
                q = collections.deque(c for c in self._groups[k] if not c.closed)
                if q:
                    self._groups[k] = q
                else:
                    del self._groups[k]
            if len(self._conns) >= self._max_connections:
                full = True
            else:
                full = False
                q = self._groups.setdefault(key, collections.deque())
                while len(q) >= max(1, cap):
                    old = q.popleft()
                    self._conns.discard(old)
                    evict.append(old)
                q.append(conn)
                self._conns.add(conn)
                conn._group = key  # type: ignore[attr-defined]
        if full:
            self._limited("conns", logging.WARNING, "refused connection of %s (%s): %d connections held (the limit)",
                          conn.identity, conn.peer, self._max_connections)
            conn.close()
            return False
        for old in evict:
            old.evicted = True
            self._limited(("evict", key), logging.WARNING, "closing the oldest %s connection of %s: a newer one "
                          "replaces it (at most %d per identity)", gname, conn.identity, cap)
            old.close()
        return True

    def release(self, conn: Conn) -> None:
        """Forgets an adopted connection (its adopter closes it)."""
        key = getattr(conn, "_group", None)
        with self._lock:
            self._conns.discard(conn)
            q = self._groups.get(key) if key is not None else None
            if q is not None:
                try:
                    q.remove(conn)
                except ValueError:
                    pass
                if not q:
                    del self._groups[key]

    def close_identity(self, identity: str) -> int:
        """Closes every connection of `identity` (revoked); returns how many."""
        with self._lock:
            conns = [c for c in self._conns if c.identity == identity]
        for c in conns:
            c.close()
        return len(conns)

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
