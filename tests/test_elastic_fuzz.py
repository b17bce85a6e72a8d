"""Hostile bytes against a live run: hypothesis throws random, truncated, oversized, wrong-typed, extreme and replayed
frames at the coordinator and at an island's listener while three islands train. Both stay up, their memory and
thread counts stay bounded, nothing raises past a handler (no traceback in their logs), and the run's outer steps
are all there with identical hashes on every island (the e2e replay checks them bit for bit).

Strategies, per connection: raw random bytes; a well-formed fixed header with random fields (magic, version, type,
sequence number, run tag, declared lengths up to 2**64-1) and a body cut at a random point; a handshake whose HELLO
has random fields and ephemeral keys (well-formed or not), followed by a random AUTH; a real client's handshake
captured and replayed; and, as an admitted insider (its own key, listed in the islands file), every coordinator op
with random, wrong-typed and extreme but well-typed fields (integers at and past every bound, 1e308, huge name
lists, deep nesting), and random peer HELLOs to the island (ring / state / probe with wrong-typed fields).
"""

import json
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intellect_jax.elastic import identity, wire
from tests.test_elastic_e2e import Run, check_run

RUN_ID = "run"  # sim_island's default run id
EXAMPLES = 400  # per strategy family and target: ~2,000 connections in all, ~20 s


def _proc(pid: int) -> dict[str, int]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "Threads"):
            out[k] = int(v.split()[0])
    return out


def _settled(pid: int, seconds: float = 3.0) -> dict[str, int]:
    """The least RSS and thread count seen over `seconds`: a ring reduce in flight adds 2 x streams + 1 threads and
    its buffers for a moment (the sample must not catch one); a leak shows in every sample."""
    samples = []
    deadline = time.monotonic() + seconds
    while not samples or time.monotonic() < deadline:
        samples.append(_proc(pid))
        time.sleep(0.05)
    return {k: min(s[k] for s in samples) for k in samples[0]}


def _head(magic=wire.MAGIC, version=wire.PROTOCOL_VERSION, mtype=1, seq=0, run=None, json_len=0, data_len=0):
    return struct.pack(">4sHHQ16sIQ4s", magic, version, mtype, seq, run or wire.run_tag(RUN_ID), json_len, data_len,
                       b"\0" * 4)


def _send(port: int, data: bytes, read: bool = True) -> None:
    """One connection: send `data`, read whatever comes back for a moment, close. Refusals are the point."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(data)
            if read:
                s.settimeout(0.2)
                try:
                    s.recv(4096)
                except OSError:
                    pass
    except OSError:  # reset by the server mid-send: also a refusal
        pass


extreme = (st.sampled_from([0, -1, 1, 2**31, 2**53, 2**53 + 1, 2**62, 2**63 - 1, 2**64, -(2**63), 1e308, -1e308,
                             5e-324, 0.0, -0.0, "", "a" * 70, "x" * 5000, "coordinator", "a", "b", "c"])
           | st.lists(st.sampled_from(["a", "b", "c", "fz0"]), max_size=8)
           | st.lists(st.text(max_size=3), min_size=200, max_size=400))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
    | extreme,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
FIELDS = ["op", "name", "kind", "step", "epoch", "ok", "hash", "norm", "status", "incarnation", "stream", "from",
          "eph", "key", "sig", "encrypt", "rates", "rtts", "blame", "finished", "last_epoch", "pending"]
headers = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=6)

raw = st.binary(max_size=3000)
truncated = st.builds(
    lambda magic, version, mtype, seq, run, jl, dl, body, cut: (_head(magic, version, mtype, seq, run, jl, dl)
                                                               + body)[:cut],
    st.sampled_from([wire.MAGIC, b"XXXX", b"\0\0\0\0"]), st.sampled_from([wire.PROTOCOL_VERSION, 1, 3, 65535]),
    st.integers(0, 65535), st.integers(0, 2**64 - 1), st.sampled_from([None, b"\0" * 16]),
    st.integers(0, 2**32 - 1) | st.integers(0, 5000), st.integers(0, 2**64 - 1) | st.integers(0, 5000),
    st.binary(max_size=3000), st.integers(0, 6000))


def _clear(fields: dict, mtype=wire.MsgType.HELLO, seq=0) -> bytes:
    """A clear handshake frame with the (public) checksum key: it gets past the MAC to the fields."""
    import hashlib
    import hmac

    js = json.dumps(fields).encode()
    head = _head(mtype=int(mtype), seq=seq, json_len=len(js))
    key = wire._hkdf(wire.run_tag(RUN_ID), b"", wire._LABEL + b"hello")
    return head + js + hmac.new(key, head + js, hashlib.sha256).digest()


def _hello(fields: dict, good_eph: bool, auth: bytes) -> bytes:
    if good_eph:  # a well-formed ephemeral key, so the server answers and waits for an AUTH
        fields = dict(fields, eph=os.urandom(32).hex(), encrypt=True)
    return _clear(fields) + auth


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("fuzz"), names=("a", "b", "c", "fz0", "fz1", "fz2", "fz3"))
    run.start_coordinator(min_islands=3)
    for i, n in enumerate("abc"):
        run.start_island(n, 90 + i, 10_000, inner_s=0.3)  # until stopped
    run.wait_for(lambda: all(run.events(n, "step") for n in "abc"), 60, "first outer step on every island")
    # A real client's handshake (an admitted insider's), captured: replaying it must be refused.
    captured = []
    real = socket.create_connection

    class Tap:
        def __init__(self, sock):
            self.sock = sock

        def sendall(self, b):
            captured.append(bytes(b))
            return self.sock.sendall(b)

        def __getattr__(self, name):
            return getattr(self.sock, name)

    socket.create_connection = lambda *a, **k: Tap(real(*a, **k))
    try:
        wire.connect(("127.0.0.1", run.port), run.auth("fz0"), identity.COORDINATOR, RUN_ID, 1 << 20,
                     hello={"kind": "rpc"}, timeout=5)[0].close()
    finally:
        socket.create_connection = real
    run.replayed = b"".join(captured)
    run.island_port = run.events("b", "joined")[0]["port"]
    run.targets = {"coordinator": run.port, "island": run.island_port}
    run.pids = {"coordinator": run.procs["coordinator"].pid, "island": run.procs["b"].pid}
    run.before = {k: _settled(p) for k, p in run.pids.items()}
    yield run
    run.stop()


def _log(live, target: str) -> str:
    return live.coord_log() if target == "coordinator" else (live.tmp / "b.log").read_text()


def _answers(live, target: str, timeout: float = 60.0) -> dict:
    """A fresh, valid handshake and request to `target` is answered: the coordinator replies to an admitted island's
    request, island b serves its state manifest. Retried until `timeout`: right after the fuzzing the target may still
    refuse new connections for a moment (its handshake slots and per-address rate are spent, by design)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if target == "coordinator":
                conn, _ = wire.connect(("127.0.0.1", live.port), live.auth("fz3"), identity.COORDINATOR, RUN_ID,
                                       1 << 20, hello={"kind": "rpc"}, timeout=5)
                req = {"op": "members", "incarnation": "inc-check"}
            else:
                conn, _ = wire.connect(("127.0.0.1", live.island_port), live.auth("fz2"), "b", RUN_ID, 1 << 26,
                                       hello={"op": "state"}, timeout=5)
                req = {"op": "manifest"}
            try:
                conn.settimeout(10)
                rep, _ = conn.request(req)
            finally:
                conn.close()
            return rep
        except (OSError, wire.WireError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{target} no longer answers a valid request: {e!r}\n{live.dump_logs()}") \
                    from None
            time.sleep(0.2)


def _survived(live, target: str, since: int, refused: list[str]) -> None:
    """After fuzzing `target`: it runs, answers a fresh valid request, nothing raised past a handler (no traceback,
    no 'handler for' line in its log), and its log from offset `since` (this test's part) names each of `refused`
    (polled: a line may lag its refusal)."""
    assert live.procs["coordinator" if target == "coordinator" else "b"].poll() is None, live.dump_logs()
    rep = _answers(live, target)
    if target == "coordinator":
        assert rep == {"reregister": True}, rep  # an admitted island that is not registered is told to register
    else:
        assert rep.get("arrays") and "meta" in rep, rep
    deadline = time.monotonic() + 30
    while not all(r in _log(live, target)[since:] for r in refused) and time.monotonic() < deadline:
        time.sleep(0.2)
    log = _log(live, target)
    assert "Traceback" not in log and "handler for" not in log, log[-5000:]
    log = log[since:]
    for r in refused:
        assert r in log, (r, log[-5000:])


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("target", ["coordinator", "island"])
def test_unauthenticated_garbage(live, target):
    port, since = live.targets[target], len(_log(live, target))

    @FUZZ
    @given(data=raw | truncated)
    def fuzz(data):
        _send(port, data, read=False)

    fuzz()
    # one refusal for certain (a random one may have been turned away by the rate limit instead), then the checks
    _send(port, _head(magic=b"XXXX"), read=False)
    _survived(live, target, since, ["refused connection from", "bad magic"])


@pytest.mark.parametrize("target", ["coordinator", "island"])
def test_handshakes_with_wrong_types_wrong_keys_and_replays(live, target):
    port, since = live.targets[target], len(_log(live, target))

    @FUZZ
    @given(fields=headers, good_eph=st.booleans(), replay=st.integers(0, 9),
           auth=st.binary(max_size=300) | st.builds(lambda f: _clear(f, wire.MsgType.AUTH, 1), headers))
    def fuzz(fields, good_eph, replay, auth):
        if replay == 0:
            _send(port, live.replayed)
        else:
            _send(port, _hello(fields, good_eph, auth))

    fuzz()
    _send(port, live.replayed)  # one replay for certain: its AUTH's tag does not verify under a fresh handshake
    _survived(live, target, since, ["refused connection from", "bad authentication tag"])


OPS = ["register", "heartbeat", "sync", "done", "commit", "epoch", "members", "keys", "rates", "bye", "nope"]
not_a_step = json_values.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**6))


def test_authenticated_insider_with_wrong_typed_and_extreme_requests(live):
    """An admitted island (one of a few keys, registered with no state, so the run never waits for it) sends every op
    with random, wrong-typed and extreme fields: each is answered (or refused with an ERROR), none breaks a thread;
    it never becomes a member (it holds no state the run committed)."""
    since = {t: len(_log(live, t)) for t in live.targets}

    @settings(FUZZ, max_examples=EXAMPLES // 2)
    @given(k=st.integers(0, 3), kind=st.sampled_from(["rpc", "hb", 3]),
           reqs=st.lists(st.tuples(st.sampled_from(OPS), headers, not_a_step), min_size=1, max_size=5))
    def coordinator(k, kind, reqs):
        name = f"fz{k}"
        status = {"incarnation": f"inc-{name}", "step": -1, "hash": None, "advertise_host": "127.0.0.1",
                  "port": 9, "last_epoch": None, "pending": None}
        try:
            conn, _ = wire.connect(("127.0.0.1", live.port), live.auth(name), identity.COORDINATOR, RUN_ID, 1 << 20,
                                   hello={"kind": kind}, timeout=3)
        except (OSError, wire.WireError, wire.RemoteError):
            return
        try:
            try:
                conn.request({"op": "register", "incarnation": status["incarnation"], "status": status})
            except wire.RemoteError:
                pass
            for op, fields, step in reqs:
                r = dict(fields, op=op, incarnation=status["incarnation"])
                if op == "sync":
                    r["step"] = step
                if op in ("register", "heartbeat") and "status" not in fields:
                    r["status"] = dict(status, **{f: v for f, v in fields.items() if f in status})
                try:
                    conn.request(r)
                except wire.RemoteError:
                    pass
        except (OSError, wire.WireError):
            pass
        finally:
            conn.close()

    ring_fields = st.fixed_dictionaries({}, optional={"epoch": st.integers(-5, 10**6) | json_values,
                                                      "from": st.sampled_from(["a", "c"]) | json_values,
                                                      "stream": st.integers(-1, 5) | json_values})

    @settings(FUZZ, max_examples=EXAMPLES // 2)
    @given(hello=ring_fields, extra=headers, op=st.sampled_from(["ring", "state", "probe", "x", None]),
           frames=st.lists(st.tuples(st.sampled_from(["manifest", "chunk", "x"]), headers), max_size=3))
    def island(hello, extra, op, frames):
        try:
            conn, _ = wire.connect(("127.0.0.1", live.island_port), live.auth("fz1"), "b", RUN_ID, 1 << 20,
                                   hello=dict(extra, **hello, op=op), timeout=3)
        except (OSError, wire.WireError, wire.RemoteError):
            return
        try:
            for sop, h in frames:
                conn.send(wire.MsgType.REQUEST, dict(h, op=sop))
                conn.settimeout(1.0)
                conn.recv()
        except (OSError, wire.WireError, wire.RemoteError):
            pass
        finally:
            conn.close()

    coordinator()
    island()
    # and one bad registration for certain (the random ones may all time out on a machine under load): refused with
    # an ERROR naming the field, and logged naming the island (test_the_run_went_on... reads the log)
    conn, _ = wire.connect(("127.0.0.1", live.port), live.auth("fz0"), identity.COORDINATOR, RUN_ID, 1 << 20,
                           hello={"kind": "rpc"}, timeout=60)
    try:
        with pytest.raises(wire.RemoteError, match="step"):
            conn.request({"op": "register", "incarnation": "inc-fz0", "status": {
                "incarnation": "inc-fz0", "step": "x", "hash": None, "advertise_host": "127.0.0.1", "port": 9,
                "last_epoch": None, "pending": None}})
    finally:
        conn.close()
    _survived(live, "coordinator", since["coordinator"], ["refused 'register' request from island fz0"])
    try:  # and one peer connection for no known purpose, for certain: refused, naming it
        wire.connect(("127.0.0.1", live.island_port), live.auth("fz1"), "b", RUN_ID, 1 << 20, hello={"op": "x"},
                     timeout=60)[0].close()
    except (OSError, wire.WireError, wire.RemoteError):
        pass  # refused in the handshake or at once after it: the log says which
    _survived(live, "island", since["island"], ["peer connection for 'x' from 'fz1'"])


def test_the_run_went_on_with_bounded_memory_and_threads(live):
    """Runs last (file order): after every fuzz test above, the targets' RSS and threads are bounded and the run
    completed outer steps during and after the fuzzing with identical, replay-exact hashes on all islands."""
    steps_before = len(live.events("a", "step"))
    live.wait_for(lambda: len(live.events("a", "step")) >= steps_before + 3, 60, "three more outer steps")
    time.sleep(3.0)  # handshake deadlines / idle connections of the fuzzing expire
    for k, pid in live.pids.items():
        now, before = _settled(pid), live.before[k]
        print(f"{k}: RSS {before['VmRSS'] / 1024:.1f} -> {now['VmRSS'] / 1024:.1f} MB, threads {before['Threads']} -> "
              f"{now['Threads']}")
        assert now["VmRSS"] - before["VmRSS"] < 64 * 1024, (k, before, now)  # kB
        assert now["Threads"] <= before["Threads"] + 8, (k, before, now)
    for p in live.procs.values():
        assert p.poll() is None, live.dump_logs()
    for n in "abc":
        live.procs[n].terminate()
    for n in "abc":
        live.procs[n].wait(30)
    done = max(e["step"] for n in "abc" for e in live.events(n, "step"))
    check_run(live, "abc", done + 1)
    logs = live.dump_logs()
    assert "Traceback" not in logs and "handler for" not in logs, logs
    clog = live.coord_log()
    assert "refused connection from" in clog and "bad magic" in clog and "bad authentication tag" in clog
    for key in live.key_files.values():  # no private key (nor a piece of one) ever reaches a log
        body = "".join(line for line in key.read_text().splitlines() if not line.startswith("-----"))
        assert all(body[i:i + 24] not in logs for i in range(0, len(body) - 24, 24))
    assert "refused 'register' request from island fz" in clog
