"""End to end: a coordinator and numpy "fake trainer" islands as separate processes over 127.0.0.1.

Every test replays the run in one process (same pseudo-gradients, the sequential reference ring with the logged
members and ring order, the same Nesterov update) and requires every island's logged params hash to equal the
replay's after every outer step: no outer step lost, doubled or half-applied, and bit-identical global params.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from intellect_jax.elastic import identity, ring, wire
from intellect_jax.elastic.recovery import params_hash
from tests import sim_island
from tests.elastic_keys import write_roster

PY = sys.executable
DIM = 100_000
CHUNK = 256 << 10
STREAMS = 2


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


NAMES = ("a", "b", "c", "d")


class Run:
    """Coordinator + sim islands as subprocesses. `prefix(i)` wraps island i's command (i=None: the coordinator),
    e.g. with `ip netns exec`; `hosts` are the addresses they listen on (coordinator first). Every island (of
    `names`) and the coordinator has its own key, listed in one islands file; `secret=True`: shared-secret mode."""

    def __init__(self, tmp: Path, dead_after_s: float = 3.0, hosts=None, prefix=None, dim=None, dump=True,
                 names=NAMES, secret=False, coordinator_args=()):
        self.hosts = hosts or (lambda i: "127.0.0.1")
        self.prefix = prefix or (lambda i: [])
        self.dim = dim or DIM
        self.tmp = tmp
        self.secret = tmp / "secret" if secret else None
        if secret:
            identity.write_secret(self.secret)
        else:
            self.islands_file, self.key_files = write_roster(tmp, list(names))
        self.coordinator_args = list(coordinator_args)
        self.port: int | None = None  # the first coordinator binds port 0 and writes the port it got (--port-file)
        self.dead_after_s = dead_after_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.seeds: dict[str, int] = {}
        self.coord_starts = 0
        self.dump = dump  # islands save every step's pseudo-gradient and mean under tmp/dump
        (tmp / "dump").mkdir(exist_ok=True)

    def start_coordinator(self, min_islands=3):
        self.coord_starts += 1
        log = open(self.tmp / f"coordinator{self.coord_starts}.log", "w")
        # A restarted coordinator binds the port the islands know; the first one takes a free port from the kernel
        # (no _free_port race: another process could take a port between its probe and the bind).
        port_file = self.tmp / f"coordinator{self.coord_starts}.port"
        self.procs["coordinator"] = subprocess.Popen(
            [*self.prefix(None), PY, "-m", "intellect_jax", "coordinator", "--bind",
             f"{self.hosts(None)}:{self.port or 0}", "--port-file", str(port_file),
             *self.identity_args(identity.COORDINATOR),
             "--min-islands", str(min_islands), "--dead-after-s", str(self.dead_after_s), *self.coordinator_args],
            stdout=log, stderr=subprocess.STDOUT)
        this = self.tmp / f"coordinator{self.coord_starts}.log"
        self.wait_for(lambda: port_file.exists() and "listening" in this.read_text(), 20, "coordinator start")
        port = int(port_file.read_text())
        assert self.port in (None, port), (self.port, port)
        self.port = port

    def identity_args(self, name: str) -> list[str]:
        if self.secret is not None:
            return ["--secret-file", str(self.secret)]
        return ["--key-file", str(self.key_files[name]), "--islands-file", str(self.islands_file)]

    def auth(self, name: str) -> identity.Auth:
        """`name`'s identity, as its island process has it (for in-process test peers)."""
        if self.secret is not None:
            return identity.secret_auth(self.secret.read_bytes(), name)
        return identity.key_auth(str(self.key_files[name]), str(self.islands_file), name)

    def coord_log(self) -> str:
        return "".join((self.tmp / f"coordinator{i}.log").read_text() for i in range(1, self.coord_starts + 1))

    def start_island(self, name, seed, steps, *extra, inner_s=0.3, tag="", index=0):
        self.seeds[name] = seed
        log = open(self.tmp / f"{name}{tag}.log", "w")
        self.procs[name + tag] = subprocess.Popen(
            [*self.prefix(index), PY, sim_island.__file__, "--coordinator",
             f"{self.hosts(None)}:{self.port}", "--listen", f"{self.hosts(index)}:0",
             *self.identity_args(name), "--name", name, "--seed", str(seed), "--steps", str(steps),
             "--dim", str(self.dim), "--inner-s", str(inner_s), "--streams", str(STREAMS), "--chunk-bytes", str(CHUNK),
             "--heartbeat-s", "0.5", "--dead-after-s", str(self.dead_after_s), "--out",
             str(self.tmp / f"{name}.jsonl"), *(["--dump-dir", str(self.tmp / "dump")] if self.dump else []),
             *extra],
            stdout=log, stderr=subprocess.STDOUT)

    def events(self, name, event=None):
        p = self.tmp / f"{name}.jsonl"
        if not p.exists():
            return []
        evs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return [e for e in evs if event is None or e["event"] == event]

    def wait_for(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.dump_logs()}")

    def wait_exit(self, key, timeout=60):
        try:
            rc = self.procs[key].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{key} did not finish\n{self.dump_logs()}") from None
        assert rc == 0, f"{key} exited with {rc}\n{self.dump_logs()}"

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def run(tmp_path):
    r = Run(tmp_path)
    yield r
    r.stop()


def replay(run: Run, steps_by: dict[int, list[str]]) -> list[str]:
    """The run recomputed in-process: hash after each outer step, given each step's ring order."""
    p, m = sim_island.init_params(run.dim), np.zeros(run.dim, np.float32)
    codec = ring.make_codec("int8", sim_island.BLOCK_SIZE)
    hashes = []
    for s in range(len(steps_by)):
        order = steps_by[s]
        vecs = [sim_island.pseudo_grad(run.seeds[n], s, p) for n in order]
        delta = ring.reference_ring_mean(vecs, codec, CHUNK, sim_island.BLOCK_SIZE, STREAMS)
        p, m = sim_island.outer_update(p, m, delta)
        hashes.append(params_hash({"params": p, "momentum": m}))
    return hashes


def check_run(run: Run, names, steps, diverged=()):
    """Every island's events, per incarnation: outer steps consecutive (a gap only across a state fetch), none
    repeated, every committed hash equal to the replay's. `diverged`: (island, step) allowed to lose the vote."""
    by_step: dict[int, dict] = {}
    for n in names:
        evs = run.events(n)
        for pid in dict.fromkeys(e["pid"] for e in evs):
            expected = 0 if pid == evs[0]["pid"] else None  # a restarted incarnation must fetch first
            for e in (e for e in evs if e["pid"] == pid):
                if e["event"] == "fetched":
                    expected = e["step"]
                elif e["event"] == "step":
                    assert e["step"] == expected, (n, e, expected)
                    expected = e["step"] + 1
                    if not e["ok"]:
                        assert (n, e["step"]) in diverged, e
                        expected = None  # must fetch before its next step
                        continue
                    prev = by_step.setdefault(e["step"], e)
                    assert prev["order"] == e["order"] and prev["epoch"] == e["epoch"], (prev, e)
                    assert prev["hash"] == e["hash"] and prev["delta_hash"] == e["delta_hash"], (prev, e)
    assert sorted(by_step) == list(range(steps)), sorted(by_step)
    want = replay(run, {s: by_step[s]["order"] for s in by_step})
    assert [by_step[s]["hash"] for s in range(steps)] == want
    return by_step


def _bad_peer(port, expect, version=wire.PROTOCOL_VERSION, garbage=False):
    """An outsider: random bytes, another protocol version, or a full handshake with a key nobody admitted."""
    if garbage or version != wire.PROTOCOL_VERSION:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if garbage:
            s.sendall(np.random.default_rng(1).bytes(1000))
        else:
            js = json.dumps({"eph": os.urandom(32).hex(), "encrypt": True}).encode()
            head = struct.pack(">4sHHQ16sIQ4s", wire.MAGIC, version, 1, 0, wire.run_tag("run"), len(js), 0,
                               b"\0" * 4)
            s.sendall(head + js + bytes(wire.MAC_BYTES))
        s.settimeout(5)
        while s.recv(4096):  # refused (an old build is told our version first)
            pass
        s.close()
        return
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stranger = identity.Auth(identity.Identity("intruder", Ed25519PrivateKey.generate()), identity.RosterKeys(
        identity.load_roster(expect[1])))
    with pytest.raises(wire.RemoteError, match="not admitted"):
        conn = wire.connect(("127.0.0.1", port), stranger, expect[0], "run", 1 << 20, hello={"op": "state"},
                            timeout=5)[0]
        conn.request({"op": "manifest"})


def test_three_islands_identical_hashes_and_bad_peers_refused(run):
    run.start_coordinator(min_islands=3)
    steps = 5
    for i, n in enumerate("abc"):
        run.start_island(n, 10 + i, steps)
    run.wait_for(lambda: len(run.events("a", "step")) >= 1, 60, "first outer step")
    island_port = run.events("b", "joined")[0]["port"]
    for port, name in ((run.port, identity.COORDINATOR), (island_port, "b")):  # coordinator, an island's listener
        _bad_peer(port, (name, run.islands_file))
        _bad_peer(port, None, version=99)
        _bad_peer(port, None, garbage=True)
    for n in "abc":
        run.wait_exit(n)
    by_step = check_run(run, "abc", steps)
    assert all(sorted(e["members"]) == ["a", "b", "c"] for e in by_step.values())
    clog, blog = run.coord_log(), (run.tmp / "b.log").read_text()
    for text in (clog, blog):
        assert "refused connection from 127.0.0.1:" in text
        assert "(claiming to be 'intruder') is not admitted to this run" in text
        assert f"protocol version 99, this build speaks {wire.PROTOCOL_VERSION}" in text
        assert "bad magic" in text
    # The mean really is the mean of the three pseudo-grads (int8 error bound), on every island the same bytes.
    d = run.tmp / "dump"
    for s in range(steps):
        deltas = [np.load(d / f"{n}_d{s}.npy") for n in "abc"]
        gs = [np.load(d / f"{n}_g{s}.npy") for n in "abc"]
        assert deltas[0].tobytes() == deltas[1].tobytes() == deltas[2].tobytes()
        bound = sum(np.abs(g).max() for g in gs) / 127
        assert np.abs(deltas[0] - np.mean(gs, axis=0)).max() < bound


def test_kill_island_during_reduce_then_live_recovery(run):
    run.start_coordinator(min_islands=3)
    steps = 14  # leaves the restarted island (~2 s to start) several outer steps to catch up and take part
    run.start_island("a", 1, steps, inner_s=0.4)
    run.start_island("b", 2, steps, inner_s=0.4)
    run.start_island("c", 3, steps, "--die-in-ring", "2:2", inner_s=0.4)  # SIGKILL itself mid-ring, outer step 2
    run.procs["c"].wait(60)
    assert run.procs["c"].returncode == -signal.SIGKILL
    assert run.events("c", "suicide")
    run.wait_for(lambda: len(run.events("a", "step")) >= 3, 60, "survivors finish outer step 2")
    # Restart c: it must fetch the state live from a peer and match the others' hash after its first sync.
    run.start_island("c", 3, steps, inner_s=0.4, tag="-2")
    for n in ("a", "b", "c-2"):
        run.wait_exit(n)
    by_step = check_run(run, "abc", steps)
    s2 = by_step[2]
    assert sorted(s2["members"]) == ["a", "b"] and s2["aborts"] >= 1, s2
    assert "aborted" in run.coord_log() and "island c dead" in run.coord_log()
    d = run.tmp / "dump"
    da, db = np.load(d / "a_d2.npy"), np.load(d / "b_d2.npy")
    assert da.tobytes() == db.tobytes()
    gs = [np.load(d / f"{n}_g2.npy") for n in "ab"]
    assert np.abs(da - np.mean(gs, axis=0)).max() < sum(np.abs(g).max() for g in gs) / 127
    fetched = [e for e in run.events("c", "fetched")]
    assert fetched, "restarted island never fetched state"
    first = [e for e in run.events("c", "step") if e["pid"] == run.procs["c-2"].pid][0]
    assert first["step"] >= fetched[0]["step"] and sorted(first["members"]) == ["a", "b", "c"]
    assert first["hash"] == by_step[first["step"]]["hash"]


def test_coordinator_killed_and_restarted_mid_run(run):
    run.start_coordinator(min_islands=3)
    steps = 8
    for i, n in enumerate("abc"):
        run.start_island(n, 20 + i, steps, inner_s=0.25)
    run.wait_for(lambda: len(run.events("a", "step")) >= 2, 60, "two outer steps")
    run.procs["coordinator"].send_signal(signal.SIGKILL)
    run.procs["coordinator"].wait(10)
    time.sleep(1.0)
    run.start_coordinator(min_islands=3)
    for n in "abc":
        run.wait_exit(n, timeout=90)
    check_run(run, "abc", steps)
    assert "rebuilt view from" in run.coord_log()


def test_kill_island_during_inner_steps(run):
    run.start_coordinator(min_islands=3)
    steps = 5
    for i, n in enumerate("abc"):
        run.start_island(n, 30 + i, steps, inner_s=0.6)
    run.wait_for(lambda: len(run.events("c", "step")) >= 1, 60, "c completes outer step 0")
    run.procs["c"].send_signal(signal.SIGKILL)  # c is now in its 0.6 s of "inner steps" for outer step 1
    for n in "ab":
        run.wait_exit(n)
    by_step = check_run(run, "abc", steps)
    assert sorted(by_step[0]["members"]) == ["a", "b", "c"]
    assert all(sorted(by_step[s]["members"]) == ["a", "b"] for s in range(1, steps))
    assert all(by_step[s]["aborts"] == 0 for s in range(steps))  # found dead before the boundary: no abort
    assert "island c dead: heartbeat connection closed" in run.coord_log()


@pytest.mark.parametrize("later", [False, True], ids=["blocking-vote", "vote-later"])
def test_diverged_island_loses_the_commit_vote_and_resyncs(run, later):
    """vote-later (streaming islands): each vote runs in a background thread and is judged before the next
    pseudo-gradient leaves, so the diverged island re-syncs before it feeds another reduce, as with the blocking
    vote."""
    run.start_coordinator(min_islands=3)
    steps = 5
    for i, n in enumerate("abc"):
        run.start_island(n, 50 + i, steps, *(["--corrupt-at", "1"] if n == "c" else []),
                         *(["--vote-later"] if later else []))
    for n in "abc":
        run.wait_exit(n)
    if later:
        assert len([e for n in "abc" for e in run.events(n, "vote_started")]) >= 3 * steps - 1
    bad = [e for e in run.events("c", "step") if not e["ok"]]
    assert [e["step"] for e in bad] == [1]
    fetched = run.events("c", "fetched")
    assert fetched and fetched[0]["step"] == 2  # re-synced to the state after outer step 1
    by_step = check_run(run, "abc", steps, diverged={("c", 1)})
    # c is back for outer step 2 if its re-sync beats a and b to that step's barrier; else the epoch forms at once
    # without it (an island that must fetch the state is not waited for) and c re-syncs again, back for step 3
    ok_steps = [e["step"] for e in run.events("c", "step") if e["ok"]]
    assert ok_steps in ([0, 2, 3, 4], [0, 3, 4]), ok_steps
    assert all(sorted(e["members"]) == (["a", "b", "c"] if s in ok_steps + [1] else ["a", "b"])
               for s, e in by_step.items())
    assert "['c'] differ and must re-sync" in run.coord_log()


def test_nan_and_100x_pseudo_gradients_are_left_out_and_their_islands_resync(run):
    """d sends a NaN at outer step 1 and c 100x its pseudo-gradient at step 3: each is left out of that step by
    every island alike (the reduce is the replay's mean of the others' pseudo-gradients), then re-syncs and takes
    part again."""
    run.start_coordinator(min_islands=4)
    steps = 7
    for i, n in enumerate("abcd"):
        poison = {"c": ["--poison", "3:x100"], "d": ["--poison", "1:nan"]}.get(n, [])
        run.start_island(n, 70 + i, steps, *poison)
    for n in "abcd":
        run.wait_exit(n)
    by_step = check_run(run, "abcd", steps)
    members = {s: sorted(e["members"]) for s, e in by_step.items()}
    assert members[0] == list("abcd") and members[1] == list("abc"), members
    assert "c" not in members[3] and {"a", "b"} <= set(members[3]), members  # d may still be catching up
    assert "c" in members[steps - 1] and "d" in members[steps - 1], members  # both back in the run
    assert all(by_step[s]["aborts"] == 0 for s in range(steps))  # left out at the boundary, not by a failed ring
    assert run.events("d", "fetched")[0]["step"] >= 2 and run.events("c", "fetched")[0]["step"] >= 4
    clog = run.coord_log()
    assert "outer step 1: island d left out of the reduce: its pseudo-gradient is not finite" in clog
    assert "outer step 3: island c left out of the reduce: its pseudo-gradient norm" in clog
    assert "exceeds 5 x the median" in clog


def test_member_dead_before_the_ring_aborts_at_once_not_after_timeouts(tmp_path):
    """c dies after its epoch formed but before connecting; its successor would wait dead_after_s (20 s) for the
    connection, but the coordinator saw the heartbeat close, aborted the epoch, and the successor's poll finds it."""
    run = Run(tmp_path, dead_after_s=20.0)
    try:
        run.start_coordinator(min_islands=3)
        steps = 3
        run.start_island("a", 80, steps)
        run.start_island("b", 81, steps)
        run.start_island("c", 82, steps, "--die-in-ring", "1:0")
        run.procs["c"].wait(60)
        t_dead = run.events("c", "suicide")[0]["t"]
        for n in "ab":
            run.wait_exit(n, timeout=90)
        by_step = check_run(run, "abc", steps)
        assert sorted(by_step[1]["members"]) == ["a", "b"] and by_step[1]["aborts"] == 1
        took = min(e["t"] for e in run.events("a", "step") if e["step"] == 1) - t_dead
        assert took < 5.0, f"outer step 1 completed {took:.1f} s after the death (dead_after_s 20 s)"
    finally:
        run.stop()


@pytest.mark.slow
def test_coordinator_killed_repeatedly_in_every_phase(run):
    """Kills land at random points of the protocol (sync, ring, done, vote) because inner phases are short."""
    run.start_coordinator(min_islands=3)
    steps = 14
    for i, n in enumerate("abc"):
        run.start_island(n, 60 + i, steps, inner_s=0.1)
    run.wait_for(lambda: len(run.events("a", "step")) >= 1, 60, "first outer step")
    rng = np.random.default_rng(0)
    for _ in range(5):
        if all(run.procs[n].poll() is not None for n in "abc"):
            break
        time.sleep(float(rng.uniform(0.3, 1.2)))
        run.procs["coordinator"].send_signal(signal.SIGKILL)
        run.procs["coordinator"].wait(10)
        time.sleep(float(rng.uniform(0.0, 0.5)))
        run.start_coordinator(min_islands=3)
    for n in "abc":
        run.wait_exit(n, timeout=120)
    check_run(run, "abc", steps)
