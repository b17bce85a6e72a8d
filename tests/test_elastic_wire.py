"""Framing, authentication and refusal of bad peers (real sockets on 127.0.0.1)."""

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from intellect_jax.elastic import wire

SECRET = b"s" * 32
RUN = "test-run"


class Echo:
    """A wire.Server that echoes REQUESTs; records what it refused."""

    def __init__(self, run_id=RUN, secret=SECRET, max_frame_bytes=1 << 20, **server_kw):
        self.server = wire.Server("127.0.0.1:0", secret, run_id, max_frame_bytes, self.handle, "echo",
                                  **server_kw).start()
        self.addr = f"127.0.0.1:{self.server.port}"

    def handle(self, conn, hello):
        while True:
            mtype, h, data = conn.recv()
            conn.send(wire.MsgType.REPLY, h, bytes(data))

    def close(self):
        self.server.close()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def _connect(addr, secret=SECRET, run=RUN, **kw):
    return wire.connect(addr, secret, run, 1 << 20, hello={"name": "t"}, timeout=5, **kw)[0]


def test_roundtrip_header_and_array_bytes(echo):
    conn = _connect(echo.addr)
    x = np.arange(1000, dtype=np.float32)
    for i in range(3):
        rep, data = conn.request({"i": i, "s": "x"}, [memoryview(x), b"tail"])
        assert rep == {"i": i, "s": "x"}
        assert bytes(data) == x.tobytes() + b"tail"
    conn.close()


def _refused(caplog, needle, wait_s=5.0):
    """Refusal log lines containing `needle` (the server logs just after dropping the connection: poll briefly)."""
    for _ in range(int(wait_s / 0.02)):
        msgs = [r.getMessage() for r in caplog.records if "refused" in r.getMessage() and needle in r.getMessage()]
        if msgs:
            return msgs
        threading.Event().wait(0.02)
    return []


class _Tap:
    """Wraps a socket and records every byte string sent through it (what an eavesdropper on the link sees)."""

    def __init__(self, sock, captured: list):
        self.sock, self.captured = sock, captured

    def sendall(self, b):
        self.captured.append(bytes(b))
        return self.sock.sendall(b)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def _still_serves(echo):
    conn = _connect(echo.addr)
    assert conn.request({"ok": 1})[0] == {"ok": 1}
    conn.close()


def test_wrong_secret_refused_and_logged(echo, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises((wire.WireError, OSError)):
        _connect(echo.addr, secret=b"x" * 32)
    msgs = _refused(caplog, "bad HMAC (wrong secret?)")
    assert msgs and msgs[0].startswith("refused connection from 127.0.0.1:")
    _still_serves(echo)


def _hello_frame(mutate=None, hello=None):
    """A handcrafted HELLO frame, MAC'd with the hello key as a real client does."""
    import hashlib, hmac, json, struct, time  # noqa: E401
    js = json.dumps(hello or {"nonce": os.urandom(16).hex(), "time": time.time(), "encrypt": True}).encode()
    fields = dict(magic=wire.MAGIC, version=wire.PROTOCOL_VERSION, run=wire.run_tag(RUN), json_len=len(js))
    fields.update(mutate or {})
    head = struct.pack(">4sHHQ16sIQ4s", fields["magic"], fields["version"], 1, 0, fields["run"], fields["json_len"],
                       fields.get("data_len", 0), b"\0" * 4)
    key = wire._hkdf(SECRET, wire.run_tag(RUN), b"intellect-jax/2 hello")
    return head + js + hmac.new(key, head + js, hashlib.sha256).digest()


def _raw_hello(echo, mutate=None, hello=None):
    """Sends a handcrafted HELLO frame and returns once the server dropped the connection."""
    s = socket.create_connection(("127.0.0.1", echo.server.port), timeout=5)
    s.sendall(_hello_frame(mutate, hello))
    assert s.recv(100) == b""  # dropped, nothing answered
    s.close()


@pytest.mark.parametrize("mutate,needle", [
    ({"version": 99}, f"protocol version 99, this build speaks {wire.PROTOCOL_VERSION}"),
    ({"run": wire.run_tag("other-run")}, "another run id"),
    ({"data_len": 1 << 30}, "byte frame before authentication (at most 4096"),
    ({"magic": b"GET "}, "bad magic"),
])
def test_bad_frames_refused_with_specific_reason(echo, caplog, mutate, needle):
    caplog.set_level(logging.WARNING)
    _raw_hello(echo, mutate)
    msgs = _refused(caplog, needle)
    assert msgs, [r.getMessage() for r in caplog.records]
    _still_serves(echo)


def test_stale_and_replayed_hellos_refused(echo, caplog):
    """A HELLO outside the replay window, or one whose nonce the server has seen, never gets a HELLO_ACK."""
    import time

    caplog.set_level(logging.WARNING)
    _raw_hello(echo, hello={"nonce": os.urandom(16).hex(), "time": time.time() - 600, "encrypt": True})
    assert _refused(caplog, "outside the 120 s replay window")
    hello = {"nonce": os.urandom(16).hex(), "time": time.time(), "encrypt": True}
    s = socket.create_connection(("127.0.0.1", echo.server.port), timeout=5)
    s.sendall(_hello_frame(hello=hello))  # the first time it is answered (and then the READY never comes)
    assert s.recv(4096)
    s.close()
    _raw_hello(echo, hello=hello)
    assert _refused(caplog, "HELLO nonce seen before (a replayed handshake)")
    _still_serves(echo)


def test_encrypt_mismatch_refused_with_the_fix(caplog):
    caplog.set_level(logging.WARNING)
    echo = Echo(encrypt=False)
    try:
        with pytest.raises((wire.WireError, OSError)):
            _connect(echo.addr)
        assert _refused(caplog, "the peer has elastic.encrypt=True and this side False; set the same")
        conn = wire.connect(echo.addr, SECRET, RUN, 1 << 20, hello={"name": "t"}, timeout=5, encrypt=False)[0]
        assert conn.request({"plain": 1}, b"abc")[0] == {"plain": 1}
        conn.close()
    finally:
        echo.close()


@pytest.mark.parametrize("encrypt", [True, False])
def test_payloads_are_sealed_unless_encrypt_is_off(encrypt):
    """What crosses the wire: with encrypt on, neither the JSON nor the payload appears in clear."""
    echo = Echo(encrypt=encrypt)
    captured = []
    try:
        conn = wire.connect(echo.addr, SECRET, RUN, 1 << 20, hello={"name": "t"}, timeout=5, encrypt=encrypt)[0]

        real, conn.sock = conn.sock, _Tap(conn.sock, captured)
        secret_payload = b"GLOBAL-PARAMS-" * 100
        rep, data = conn.request({"field": "visible-json"}, secret_payload)
        conn.sock = real
        assert rep == {"field": "visible-json"} and bytes(data) == secret_payload
        wire_bytes = b"".join(captured)
        assert (b"GLOBAL-PARAMS-" in wire_bytes) is (not encrypt)
        assert (b"visible-json" in wire_bytes) is (not encrypt)
        conn.close()
    finally:
        echo.close()


def test_reflected_frame_refused(echo, caplog):
    """A frame the client sent, reflected back to it, fails: each direction has its own session key."""
    caplog.set_level(logging.WARNING)
    conn = _connect(echo.addr)
    captured = []

    real, conn.sock = conn.sock, _Tap(conn.sock, captured)
    conn.send(wire.MsgType.REQUEST, {"x": 1})
    conn.sock = real
    frame = b"".join(captured)
    conn.recv()  # the echo's reply (sequence 1 from the server)
    # feed the client's own frame (client->server key, sequence 2) to the client's receive side
    a, b = socket.socketpair()
    mirror = wire.Conn(a, SECRET, RUN, 1 << 20, "mirror")
    mirror._send_key, mirror._recv_key = conn._send_key, conn._recv_key
    mirror._recv_aead, mirror._recv_seq, mirror.authenticated = conn._recv_aead, 2, True
    b.sendall(frame)
    with pytest.raises(wire.BadMac, match="reflected"):
        mirror.recv()
    a.close(), b.close()
    conn.close()


def test_random_bytes_refused(echo, caplog):
    caplog.set_level(logging.WARNING)
    s = socket.create_connection(("127.0.0.1", echo.server.port), timeout=5)
    s.sendall(np.random.default_rng(0).bytes(4096))
    assert s.recv(100) == b""
    s.close()
    assert _refused(caplog, "bad magic")
    _still_serves(echo)


def test_replayed_frame_from_another_connection_refused(echo, caplog):
    """A frame recorded on one connection fails on another (per-connection session key), and reordering fails."""
    caplog.set_level(logging.WARNING)
    c1 = _connect(echo.addr)
    captured = []

    real = c1.sock
    c1.sock = _Tap(real, captured)
    c1.request({"pay": 1})
    c1.sock = real
    frame = b"".join(captured)
    c2 = _connect(echo.addr)
    c2.sock.sendall(frame)
    assert c2.sock.recv(100) == b""
    assert _refused(caplog, "bad authentication tag (wrong secret, a tampered, reflected or replayed frame")
    # Within one connection: resending the same frame repeats sequence 2 (0: HELLO, 1: READY) -> refused.
    c1.sock.sendall(frame)
    c1.sock.settimeout(5)
    head = c1.sock.recv(65536)  # the reply to the first copy may already be in flight; then EOF
    while head:
        head = c1.sock.recv(65536)
    assert _refused(caplog, "sequence 2, expected 3")
    _still_serves(echo)


def test_oversized_send_refused_locally(echo):
    conn = _connect(echo.addr)
    with pytest.raises(wire.FrameTooLarge):
        conn.send(wire.MsgType.REQUEST, {}, bytes(2 << 20))
    assert conn.request({"still": "fine"})[0] == {"still": "fine"}


def _raw_socket(echo):
    host, port = wire.parse_hostport(echo.addr)
    return socket.create_connection((host, port), timeout=10)


def test_a_big_frame_before_authentication_is_refused_unread(caplog):
    """A bare header declaring 200 MB is refused before anything is allocated (max_frame_bytes allows it)."""
    echo = Echo(max_frame_bytes=256 << 20)
    try:
        head = wire._HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(wire.MsgType.HELLO), 0, wire.run_tag(RUN), 16,
                                 200 << 20, b"\0" * 4)
        with _raw_socket(echo) as s:
            s.sendall(head)
            assert s.recv(1) == b""  # closed by the server without waiting for the 200 MB
        assert _refused(caplog, "before authentication (at most 4096 bytes")
        _still_serves(echo)
    finally:
        echo.close()


def test_a_trickled_handshake_is_cut_at_its_deadline(caplog):
    """Slowloris: a byte every 0.2 s keeps each recv alive but not the whole handshake (deadline 1 s)."""
    echo = Echo(handshake_timeout=1.0)
    try:
        head = wire._HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(wire.MsgType.HELLO), 0, wire.run_tag(RUN), 64,
                                 0, b"\0" * 4)
        t0 = time.monotonic()
        with _raw_socket(echo) as s:
            try:
                for b in head + b"{" * 64:
                    s.sendall(bytes([b]))
                    time.sleep(0.2)
                    if time.monotonic() - t0 > 5:
                        break
            except OSError:
                pass  # reset by the server: what we want
            closed_after = time.monotonic() - t0
        assert closed_after < 3.0, closed_after
        assert _refused(caplog, "handshake was not complete within its deadline")
        _still_serves(echo)
    finally:
        echo.close()


def test_pending_handshakes_are_capped(caplog):
    """More silent connections than max_pending: the extra ones are closed at once with one log line; once the
    pending ones time out, a real client is served again."""
    echo = Echo(handshake_timeout=1.0, max_pending=4)
    try:
        silent = [_raw_socket(echo) for _ in range(4)]
        time.sleep(0.2)
        extra = [_raw_socket(echo) for _ in range(3)]
        for s in extra:
            s.settimeout(2.0)
            assert s.recv(1) == b""  # closed without a handshake thread
        assert _refused(caplog, "4 handshakes already in progress")
        assert sum("already in progress" in r.getMessage() for r in caplog.records) == 1  # one line, not three
        time.sleep(1.2)  # the silent ones hit their deadline
        _still_serves(echo)
        for s in silent + extra:
            s.close()
    finally:
        echo.close()


def test_secret_file_checks(tmp_path):
    with pytest.raises(wire.SecretError, match="intellect-jax secret --out"):
        wire.load_secret(tmp_path / "missing")
    path = wire.write_secret(tmp_path / "good")
    assert path.stat().st_mode & 0o777 == 0o600 and len(wire.load_secret(path)) == wire.SECRET_BYTES
    assert wire.load_secret(path) != wire.load_secret(wire.write_secret(tmp_path / "other"))
    with pytest.raises(wire.SecretError, match="already exists"):
        wire.write_secret(path)
    os.chmod(path, 0o644)
    with pytest.raises(wire.SecretError, match=r"mode 0644: group or others can read it; run `chmod 600 "):
        wire.load_secret(path)
    short = tmp_path / "short"
    short.write_bytes(b"a passphrase")
    os.chmod(short, 0o600)
    with pytest.raises(wire.SecretError, match="12 bytes, fewer than 32 random bytes; make a new one"):
        wire.load_secret(short)


def test_elastic_layer_imports_no_jax():
    code = ("import sys; import intellect_jax.elastic.coordinator, intellect_jax.elastic.client, "
            "intellect_jax.elastic.ring, intellect_jax.elastic.recovery, intellect_jax.elastic.ordering; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
