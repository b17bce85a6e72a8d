"""Framing, the identity handshake and refusal of bad peers (real sockets on 127.0.0.1)."""

import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intellect_jax.elastic import identity, wire
from intellect_jax.elastic.identity import Auth, Identity, RosterKeys
from tests.elastic_keys import Keyring

RUN = "test-run"
KEYS = Keyring(("t", "u"))


class Echo:
    """A wire.Server (identity "a"... here "coordinator") that echoes REQUESTs; records who connected."""

    def __init__(self, run_id=RUN, max_frame_bytes=1 << 20, auth=None, **server_kw):
        self.seen = []
        self.server = wire.Server("127.0.0.1:0", auth or KEYS.auth(identity.COORDINATOR), run_id, max_frame_bytes,
                                  self.handle, "echo", **server_kw).start()
        self.addr = f"127.0.0.1:{self.server.port}"

    def handle(self, conn, hello):
        self.seen.append((conn.identity, hello))
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


def _connect(addr, name="t", run=RUN, auth=None, expect=identity.COORDINATOR, **kw):
    return wire.connect(addr, auth or KEYS.auth(name), expect, run, 1 << 20, hello={"kind": "rpc"}, timeout=5,
                        **kw)[0]


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


def test_roundtrip_header_and_array_bytes_and_the_peer_is_named_by_its_key(echo):
    conn = _connect(echo.addr, "t")
    x = np.arange(1000, dtype=np.float32)
    for i in range(3):
        rep, data = conn.request({"i": i, "s": "x"}, [memoryview(x), b"tail"])
        assert rep == {"i": i, "s": "x"}
        assert bytes(data) == x.tobytes() + b"tail"
    assert conn.identity == identity.COORDINATOR
    conn.close()
    assert echo.seen == [("t", {"kind": "rpc"})]  # the proven name; the HELLO fields, without the proof


def test_a_key_that_is_not_admitted_is_refused_naming_its_fingerprint(echo, caplog):
    caplog.set_level(logging.WARNING)
    stranger = Auth(Identity("t", Ed25519PrivateKey.generate()), RosterKeys(KEYS.roster))  # claims "t"
    with pytest.raises(wire.RemoteError, match="not admitted: key SHA256:.* \\(claiming to be 't'\\) is not admitted"):
        _connect(echo.addr, auth=stranger).request({"x": 1})
    assert _refused(caplog, "is not admitted to this run; add its line to the islands file")
    assert echo.seen == []
    _still_serves(echo)


def test_a_claimed_name_other_than_the_keys_is_refused_with_the_fix(echo, caplog):
    liar = Auth(Identity("u", KEYS.keys["t"]), RosterKeys(KEYS.roster))  # t's key, claiming to be u
    with pytest.raises(wire.RemoteError, match="admitted as 't', not 'u': set elastic.island_name=t"):
        _connect(echo.addr, auth=liar).request({"x": 1})
    assert echo.seen == []


def test_the_client_refuses_a_server_with_another_key(echo):
    """An island that reaches the wrong listener (a stale address, or someone else there) finds out at once."""
    with pytest.raises(wire.NotAdmitted, match="proved key SHA256:.*but 'u' is admitted with SHA256:"):
        _connect(echo.addr, expect="u")
    with pytest.raises(wire.NotAdmitted, match="no admitted key is known for 'nobody'"):
        _connect(echo.addr, expect="nobody")


def test_shared_secret_mode_derives_every_identity_from_the_secret(caplog):
    caplog.set_level(logging.WARNING)
    secret = b"s" * 32
    echo = Echo(auth=identity.secret_auth(secret, identity.COORDINATOR))
    try:
        conn = _connect(echo.addr, auth=identity.secret_auth(secret, "anyone"))
        assert conn.request({"ok": 1})[0] == {"ok": 1}
        conn.close()
        assert echo.seen[0][0] == "anyone"
        with pytest.raises(wire.NotAdmitted, match="proved key"):  # a wrong secret: the server's key is not ours
            _connect(echo.addr, auth=identity.secret_auth(b"x" * 32, "anyone"))
    finally:
        echo.close()


def _frame(mtype=wire.MsgType.HELLO, fields=None, **head):
    """A handcrafted clear frame with the public checksum key, as a real client's HELLO."""
    import hashlib
    import hmac
    import json

    js = json.dumps(fields if fields is not None else {"eph": os.urandom(32).hex(), "encrypt": True}).encode()
    h = dict(magic=wire.MAGIC, version=wire.PROTOCOL_VERSION, run=wire.run_tag(RUN), json_len=len(js), data_len=0)
    h.update(head)
    raw = wire._HEADER.pack(h["magic"], h["version"], int(mtype), 0, h["run"], h["json_len"], h["data_len"],
                            b"\0" * 4)
    key = wire._hkdf(wire.run_tag(RUN), b"", wire._LABEL + b"hello")
    return raw + js + hmac.new(key, raw + js, hashlib.sha256).digest()


def _raw(echo, data: bytes) -> bytes:
    """Sends raw bytes, returns what came back before the server closed."""
    s = socket.create_connection(("127.0.0.1", echo.server.port), timeout=5)
    s.sendall(data)
    out = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        out += b
    s.close()
    return out


@pytest.mark.parametrize("mutate,needle", [
    ({"run": wire.run_tag("other-run")}, "another run id"),
    ({"data_len": 1 << 30}, "byte frame before authentication (at most 4096"),
    ({"magic": b"GET "}, "bad magic"),
])
def test_bad_frames_refused_with_specific_reason(echo, caplog, mutate, needle):
    caplog.set_level(logging.WARNING)
    _raw(echo, _frame(**mutate))
    msgs = _refused(caplog, needle)
    assert msgs, [r.getMessage() for r in caplog.records]
    _still_serves(echo)


def test_another_protocol_version_is_refused_and_told_which_we_speak(echo, caplog):
    """An old build's HELLO (version 3) is refused; it gets an ERROR frame of our version back, so its own version
    check names both versions instead of a bare closed connection."""
    caplog.set_level(logging.WARNING)
    reply = _raw(echo, _frame(version=3))
    assert _refused(caplog, f"protocol version 3, this build speaks {wire.PROTOCOL_VERSION}: every island and the "
                            "coordinator must run the same intellect-jax release")
    assert reply[:4] == wire.MAGIC and wire._HEADER.unpack(reply[:wire.HEADER_BYTES])[1] == wire.PROTOCOL_VERSION
    _still_serves(echo)


def test_a_replayed_handshake_cannot_complete(echo, caplog):
    """A client's HELLO and AUTH, recorded and replayed: the server answers with a fresh ephemeral key, so the
    replayed AUTH (signed over the old transcript, sealed under the old keys) fails."""
    caplog.set_level(logging.WARNING)
    captured = []
    real = socket.create_connection
    try:
        def tapped(*a, **k):
            return _Tap(real(*a, **k), captured)
        socket.create_connection = tapped
        _connect(echo.addr).close()
    finally:
        socket.create_connection = real
    _raw(echo, b"".join(captured))
    assert _refused(caplog, "bad authentication tag")
    assert [who for who, _ in echo.seen] == ["t"]  # only the real connection got through
    _still_serves(echo)


def test_encrypt_mismatch_refused_with_the_fix(caplog):
    caplog.set_level(logging.WARNING)
    echo = Echo(encrypt=False)
    try:
        with pytest.raises((wire.WireError, OSError)):
            _connect(echo.addr)
        assert _refused(caplog, "the peer has elastic.encrypt=True and this side False; set the same")
        conn = _connect(echo.addr, encrypt=False)
        assert conn.request({"plain": 1}, b"abc")[0] == {"plain": 1}
        conn.close()
    finally:
        echo.close()


@pytest.mark.parametrize("encrypt", [True, False])
def test_identities_and_payloads_are_sealed_unless_encrypt_is_off(encrypt):
    """What crosses the wire: with encrypt on, neither the identities (names, public keys), the HELLO fields, the
    JSON nor the payload appears in clear."""
    echo = Echo(encrypt=encrypt)
    captured = []
    real = socket.create_connection
    try:
        socket.create_connection = lambda *a, **k: _Tap(real(*a, **k), captured)
        try:
            conn = wire.connect(echo.addr, KEYS.auth("t"), identity.COORDINATOR, RUN, 1 << 20,
                                hello={"kind": "rpc-secret-purpose"}, timeout=5, encrypt=encrypt)[0]
        finally:
            socket.create_connection = real
        secret_payload = b"GLOBAL-PARAMS-" * 100
        rep, data = conn.request({"field": "visible-json"}, secret_payload)
        assert rep == {"field": "visible-json"} and bytes(data) == secret_payload
        wire_bytes = b"".join(captured)
        for needle in (b"GLOBAL-PARAMS-", b"visible-json", b"rpc-secret-purpose", b'"name":"t"',
                       KEYS.auth("t").me.public.hex().encode()):
            assert (needle in wire_bytes) is (not encrypt), needle
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
    conn.recv()  # the echo's reply
    # feed the client's own frame (client->server key, sequence 2) to the client's receive side
    a, b = socket.socketpair()
    mirror = wire.Conn(a, RUN, 1 << 20, "mirror")
    mirror._send_key, mirror._recv_key, mirror._transcript = conn._send_key, conn._recv_key, None
    mirror._recv_aead, mirror._recv_seq, mirror.authenticated = conn._recv_aead, 2, True
    b.sendall(frame)
    with pytest.raises(wire.BadMac, match="reflected"):
        mirror.recv()
    a.close(), b.close()
    conn.close()


def test_random_bytes_refused(echo, caplog):
    caplog.set_level(logging.WARNING)
    _raw(echo, np.random.default_rng(0).bytes(4096))
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
    assert _refused(caplog, "bad authentication tag (a tampered, reflected or replayed frame")
    # Within one connection: resending the same frame repeats sequence 2 (0: HELLO, 1: AUTH) -> refused.
    c1.sock.sendall(frame)
    c1.sock.settimeout(5)
    head = c1.sock.recv(65536)  # the reply to the first copy may already be in flight; then EOF
    while head:
        head = c1.sock.recv(65536)
    assert _refused(caplog, "sequence 2, expected 3")
    _still_serves(echo)


def test_deeply_nested_json_is_a_malformed_frame_not_a_traceback(echo, caplog):
    caplog.set_level(logging.WARNING)
    conn = _connect(echo.addr)
    nested = b"[" * 100_000 + b"]" * 100_000
    head = wire._HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(wire.MsgType.REQUEST), conn._send_seq,
                             wire.run_tag(RUN), len(nested), 0, b"\0" * 4)
    sealed = wire._seal(conn._send_aead, wire._nonce(conn._send_seq), nested, head)
    conn.sock.sendall(head + bytes(sealed))
    assert _refused(caplog, "malformed frame: RecursionError")
    assert "Traceback" not in caplog.text
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


def test_an_authenticated_peer_declaring_a_huge_frame_holds_only_what_it_sent():
    """Receive buffers grow with the bytes that arrive: a header declaring 200 MB followed by 1 kB allocates about
    RECV_START, not 200 MB."""
    import tracemalloc

    a, b = socket.socketpair()
    conn = wire.Conn(a, RUN, 256 << 20, "peer")
    conn.authenticated, conn._transcript = True, None
    head = wire._HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(wire.MsgType.DATA), 0, wire.run_tag(RUN), 2,
                             200 << 20, b"\0" * 4)
    b.sendall(head + b"{}" + bytes(1024))
    b.close()  # then nothing more: the read fails
    tracemalloc.start()
    with pytest.raises(wire.PeerClosed, match="mid-frame"):
        conn.recv()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * wire.RECV_START, peak
    a.close()


def test_a_trickled_handshake_is_cut_at_its_deadline(caplog):
    """Slowloris: a byte every 0.2 s keeps each recv alive but not the HELLO (1 s) nor the whole handshake."""
    echo = Echo(handshake_timeout=2.0)
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
        assert closed_after < 2.5, closed_after
        assert _refused(caplog, "handshake was not complete within its deadline")
        _still_serves(echo)
    finally:
        echo.close()


def test_pending_handshakes_are_capped_per_address_and_in_all(caplog):
    """More silent connections from one address than max_pending_per_host: the extra ones are closed at once with
    one log line; once the pending ones time out (HELLO deadline), a real client is served again."""
    echo = Echo(max_pending_per_host=4, max_pending=6, hello_timeout=1.0)
    try:
        silent = [_raw_socket(echo) for _ in range(4)]
        time.sleep(0.2)
        extra = [_raw_socket(echo) for _ in range(3)]
        for s in extra:
            s.settimeout(2.0)
            assert s.recv(1) == b""  # closed without a handshake thread
        assert _refused(caplog, "4 handshakes from 127.0.0.1 already in progress (the limit per address)")
        assert sum("already in progress" in r.getMessage() for r in caplog.records) == 1  # one line, not three
        time.sleep(1.2)  # the silent ones hit their HELLO deadline
        _still_serves(echo)
        for s in silent + extra:
            s.close()
    finally:
        echo.close()


def test_an_identity_holds_a_bounded_number_of_connections_per_purpose():
    """A group holds at most `cap` connections: a new one closes the oldest (an honest reconnect replaces its stale
    connection; an insider opening many holds no more than the cap)."""
    echo = Echo(group=lambda name, hello: (hello.get("kind", "?"), 2))
    try:
        conns = [_connect(echo.addr) for _ in range(5)]
        time.sleep(0.3)
        alive = []
        for c in conns:
            try:
                c.settimeout(2)
                alive.append(c.request({"ping": 1})[0] == {"ping": 1})
            except (wire.WireError, OSError):
                alive.append(False)
        assert alive == [False, False, False, True, True]
        other = _connect(echo.addr, "u")  # another identity has its own groups
        assert other.request({"ping": 1})[0] == {"ping": 1}
    finally:
        echo.close()


def test_keygen_key_files_and_the_islands_file(tmp_path):
    line = identity.write_key(tmp_path / "a.key")
    assert line.startswith("ssh-ed25519 AAAA") and (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    key = identity.load_key(tmp_path / "a.key")
    assert identity.public_text(key) == line
    with pytest.raises(identity.IdentityError, match="already exists"):
        identity.write_key(tmp_path / "a.key")
    os.chmod(tmp_path / "a.key", 0o644)
    with pytest.raises(identity.IdentityError, match="mode 0644: group or others can read it; run `chmod 600"):
        identity.load_key(tmp_path / "a.key")
    with pytest.raises(identity.IdentityError, match="intellect-jax keygen --out"):
        identity.load_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("not a key")
    os.chmod(tmp_path / "junk.key", 0o600)
    with pytest.raises(identity.IdentityError, match="is not an unencrypted Ed25519 private key"):
        identity.load_key(tmp_path / "junk.key")
    other = identity.write_key(tmp_path / "b.key")
    text = f"# comment\n\ncoordinator {line} ops\nalice {other}\n"
    r = identity.parse_roster(text)
    assert sorted(r.keys) == ["alice", "coordinator"] and r.name_of(identity.public_bytes(key)) == "coordinator"
    for bad, needle in [(f"alice {line}\nbob {line}", "already listed as 'alice'"),
                        (f"alice {line}\nalice {other}", "listed twice"),
                        ("alice ssh-rsa AAAA", "not supported: use ssh-ed25519"),
                        ("alice ssh-ed25519 AAAAnotbase64", "not a valid ssh-ed25519 public key"),
                        (f"bad/name {line}", "not a valid name"),
                        ("alice", "expected `NAME ssh-ed25519 PUBLIC_KEY [COMMENT]`")]:
        with pytest.raises(identity.IdentityError, match=re.escape(needle)):
            identity.parse_roster(bad, "f")


def test_key_auth_takes_the_name_from_the_islands_file_and_refuses_mismatches(tmp_path):
    from tests.elastic_keys import write_roster

    islands, keys = write_roster(tmp_path, ["alice"])
    assert identity.key_auth(str(keys["alice"]), str(islands)).me.name == "alice"
    assert identity.key_auth(str(keys["coordinator"]), str(islands), coordinator=True).me.name == "coordinator"
    with pytest.raises(identity.IdentityError, match="listed as 'alice' .* but elastic.island_name is 'bob'"):
        identity.key_auth(str(keys["alice"]), str(islands), "bob")
    with pytest.raises(identity.IdentityError, match="is not the one the islands file .* lists as 'coordinator'"):
        identity.key_auth(str(keys["alice"]), str(islands), coordinator=True)
    with pytest.raises(identity.IdentityError, match="'coordinator' is the coordinator's name and key"):
        identity.key_auth(str(keys["coordinator"]), str(islands))
    identity.write_key(tmp_path / "new.key")
    with pytest.raises(identity.IdentityError, match="is not in this island's copy"):
        identity.key_auth(str(tmp_path / "new.key"), str(islands))
    assert identity.key_auth(str(tmp_path / "new.key"), str(islands), "carol").me.name == "carol"  # admitted later
    (tmp_path / "nocoord").write_text(islands.read_text().split("\n", 2)[2])
    with pytest.raises(identity.IdentityError, match="has no 'coordinator' line"):
        identity.key_auth(str(keys["alice"]), str(tmp_path / "nocoord"))


def test_secret_file_checks(tmp_path):
    with pytest.raises(identity.SecretError, match="intellect-jax secret --out"):
        identity.load_secret(tmp_path / "missing")
    path = identity.write_secret(tmp_path / "good")
    assert path.stat().st_mode & 0o777 == 0o600 and len(identity.load_secret(path)) == identity.SECRET_BYTES
    assert identity.load_secret(path) != identity.load_secret(identity.write_secret(tmp_path / "other"))
    with pytest.raises(identity.SecretError, match="already exists"):
        identity.write_secret(path)
    os.chmod(path, 0o644)
    with pytest.raises(identity.SecretError, match=r"mode 0644: group or others can read it; run `chmod 600 "):
        identity.load_secret(path)
    short = tmp_path / "short"
    short.write_bytes(b"a passphrase")
    os.chmod(short, 0o600)
    with pytest.raises(identity.SecretError, match="12 bytes, fewer than 32 random bytes; make a new one"):
        identity.load_secret(short)


def test_elastic_layer_imports_no_jax():
    code = ("import sys; import intellect_jax.elastic.coordinator, intellect_jax.elastic.client, "
            "intellect_jax.elastic.ring, intellect_jax.elastic.recovery, intellect_jax.elastic.ordering; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_accept_that_fails_backs_off_and_is_logged_not_spun(caplog):
    """Out of file descriptors, accept() fails at once every time: the loop backs off (here: fewer than 30 tries in
    2 s, not millions) and says so, once per 5 s; when descriptors come back, clients get in again."""
    import errno

    caplog.set_level(logging.WARNING)
    echo = Echo.__new__(Echo)
    echo.seen = []
    echo.server = wire.Server("127.0.0.1:0", KEYS.auth(identity.COORDINATOR), RUN, 1 << 20, echo.handle, "echo")
    echo.addr = f"127.0.0.1:{echo.server.port}"
    real, calls = echo.server.sock, []

    class Failing:  # the listening socket, out of descriptors for 2 s
        def accept(self):
            calls.append(1)
            if time.monotonic() < until:
                raise OSError(errno.EMFILE, "Too many open files")
            return real.accept()

        def __getattr__(self, name):
            return getattr(real, name)

    until = time.monotonic() + 2.0
    echo.server.sock = Failing()
    echo.server.start()
    try:
        time.sleep(2.2)
        assert 5 <= len(calls) < 30, len(calls)
        assert sum("accept failed (EMFILE)" in r.getMessage() for r in caplog.records) == 1
        _still_serves(echo)
    finally:
        echo.close()


def test_one_address_may_start_only_so_many_handshakes_per_second(caplog, monkeypatch):
    """A burst beyond the per-address bucket is closed before any public-key work, with one log line; the bucket
    refills."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(wire, "HANDSHAKE_BURST", 5.0)
    monkeypatch.setattr(wire, "HANDSHAKES_PER_S", 5.0)
    echo = Echo()
    try:
        socks = [_raw_socket(echo) for _ in range(12)]
        time.sleep(0.3)
        assert _refused(caplog, "new connections per second from 127.0.0.1 (the limit per address)")
        for s in socks:
            s.close()
        time.sleep(1.5)
        _still_serves(echo)
    finally:
        echo.close()
