"""Coordinator state machine over real sockets, driven by scripted islands: epochs, deaths, joiners at a boundary,
commit votes, and the decisions a restarted coordinator rebuilds from the islands' re-registrations."""

import time

import pytest

from intellect_jax import cli
from intellect_jax.config import ConfigError, DilocoConfig, ElasticConfig, RunConfig
from intellect_jax.elastic import identity, ordering, wire
from intellect_jax.elastic.coordinator import Coordinator

SECRET = b"c" * 32
AUTH = identity.secret_auth(SECRET, identity.COORDINATOR)
RUN = "coord-test"


class Isl:
    def __init__(self, coord, name, step, h="h0", pending=None, last_epoch=None, kind="rpc"):
        self.name, self.inc = name, f"inc-{name}"
        self.conn, _ = wire.connect(("127.0.0.1", coord.port), identity.secret_auth(SECRET, name),
                                    identity.COORDINATOR, RUN, 1 << 20, hello={"kind": kind}, timeout=5)
        self.status = {"incarnation": self.inc, "step": step, "hash": h, "last_epoch": last_epoch,
                       "pending": pending, "advertise_host": "", "port": 1000 + ord(name[0])}

    def rpc(self, op, **kw):
        if op in ("register", "heartbeat"):
            kw["status"] = self.status
        return self.conn.request({"op": op, "incarnation": self.inc, **kw})[0]

    def wait(self, op, timeout=10, **kw):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rep = self.rpc(op, **kw)
            if not rep.get("wait"):
                return rep
        raise AssertionError(f"{self.name}: {op} {kw} still waiting")

    def close(self):
        self.conn.close()


@pytest.fixture
def coord():
    cfg = ElasticConfig(heartbeat_s=0.5, dead_after_s=2.0, min_islands=2, recovery_grace_s=0.5)
    cfg.validate()
    c = Coordinator(cfg, RUN, "127.0.0.1:0", AUTH).start()
    yield c
    c.close()


def _bg(fn):
    import threading
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    return t, out


def test_epoch_waits_for_all_islands_at_the_step_then_commits_and_votes(coord):
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0)
    assert a.rpc("register")["recovering"] is True  # a fresh run starts once min_islands (2) registered
    assert b.rpc("register")["needs_state"] is False and a.rpc("register")["needs_state"] is False
    assert a.rpc("sync", step=0) == {"wait": True}  # b is expected at step 0
    tb, rb = _bg(lambda: b.wait("sync", step=0))
    ra = a.wait("sync", step=0)
    tb.join()
    ep = ra["epoch"]
    assert ep == rb["r"]["epoch"] and ep["members"] == ["a", "b"] and ep["step"] == 0
    assert ep["addrs"]["a"] == "127.0.0.1:1097"
    assert a.rpc("done", epoch=ep["id"], step=0, ok=True) == {"wait": True}
    assert b.wait("done", epoch=ep["id"], step=0, ok=True)["decision"] == "commit"
    assert a.wait("done", epoch=ep["id"], step=0, ok=True)["decision"] == "commit"
    assert coord.state.run_step == 1
    tb, rb = _bg(lambda: b.wait("commit", step=0, hash="h1"))
    assert a.wait("commit", step=0, hash="h1") == {"ok": True, "hash": "h1"}
    tb.join()
    assert rb["r"] == {"ok": True, "hash": "h1"}
    assert coord.state.canonical == {-1: "h0", 0: "h1"}  # -1: the initial params both registered with


def test_an_even_split_has_no_canonical_hash_and_nobody_is_told_to_resync(coord, caplog):
    """Two members, two hashes: nobody can tell which is right (the old rule took the smallest, so a liar could
    always win a 1:1 split by voting "0000..."); both keep their states, the split is an error in the log."""
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0)
    a.rpc("register"), b.rpc("register")
    ep = _epoch_for([a, b], 0)["a"]["epoch"]
    tb, _ = _bg(lambda: b.wait("done", epoch=ep["id"], step=0, ok=True))
    a.wait("done", epoch=ep["id"], step=0, ok=True)
    tb.join()
    tb, rb = _bg(lambda: b.wait("commit", step=0, hash="0000"))
    assert a.wait("commit", step=0, hash="h1") == {"ok": True, "hash": None, "contested": True}
    tb.join()
    assert rb["r"]["contested"] and 0 not in coord.state.canonical
    assert "the members' hashes split with no majority" in caplog.text


def test_votes_count_only_from_the_members_that_reduced_the_step(coord):
    """A registration (or vote) claiming a hash for a step it did not reduce counts for nothing: the canonical hash
    is the majority of the epoch's members."""
    isl = [Isl(coord, n, 0) for n in "abc"]
    for i in isl:
        i.rpc("register")
    ep = _epoch_for(isl, 0)["a"]["epoch"]
    threads = [_bg(lambda i=i: i.wait("done", epoch=ep["id"], step=0, ok=True)) for i in isl]
    [t.join(10) for t, _ in threads]
    for n in ("x", "y", "z"):  # three outsiders to epoch 0, claiming its step with a poisoned hash
        o = Isl(coord, n, 1, h="poison")
        o.rpc("register")
        with pytest.raises(wire.RemoteError, match="not one of the members that reduced it"):
            o.rpc("commit", step=0, hash="poison")
    votes = [_bg(lambda i=i, h=h: i.wait("commit", step=0, hash=h)) for i, h in zip(isl, ["h1", "h1", "bad"])]
    [t.join(10) for t, _ in votes]
    assert [out["r"]["ok"] for _, out in votes] == [True, True, False]
    assert coord.state.canonical[0] == "h1"
    assert [s["name"] for s in isl[0].rpc("members")["islands"] if s["source"]] == ["a", "b"]
    assert isl[2].rpc("register")["needs_state"] is True


def test_the_last_sync_and_the_last_done_are_answered_at_once_and_wake_the_others(monkeypatch):
    """The last island at the sync barrier gets the new epoch in its own answer, and the last member's `done` the
    decision, each waking the islands waiting on it. Both used to be answered only at the coordinator's next
    unrelated wake-up (the 0.2 s monitor tick: ~100 ms added to each barrier of every outer step); with the monitor
    silenced here, that wait would run out the 1 s long-poll."""
    monkeypatch.setattr(Coordinator, "_monitor_loop", lambda self: None)
    cfg = ElasticConfig(heartbeat_s=0.5, dead_after_s=2.0, min_islands=2, recovery_grace_s=0.5)
    c = Coordinator(cfg, RUN, "127.0.0.1:0", AUTH).start()
    try:
        a, b = Isl(c, "a", 0), Isl(c, "b", 0)
        a.rpc("register")
        b.rpc("register")
        tb, rb = _bg(lambda: b.rpc("sync", step=0))  # waits in the long-poll
        deadline = time.monotonic() + 5
        while c.state.ready.get("b") != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        ep = a.rpc("sync", step=0)["epoch"]
        tb.join()
        assert rb["r"]["epoch"] == ep and time.monotonic() - t0 < 0.5, "the epoch waited for the long-poll"
        ta, ra = _bg(lambda: a.rpc("done", epoch=ep["id"], step=0, ok=True))  # waits in the long-poll
        deadline = time.monotonic() + 5
        while "a" not in _epoch_done(c) and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        assert b.rpc("done", epoch=ep["id"], step=0, ok=True) == {"decision": "commit", "run_step": 1}
        ta.join()
        assert time.monotonic() - t0 < 0.5, "the decision waited for the long-poll to run out (POLL_S = 1 s)"
        assert ra["r"] == {"decision": "commit", "run_step": 1}
    finally:
        c.close()


def _epoch_done(c) -> dict:
    with c.cv:
        return dict(c.state.epoch.done) if c.state.epoch is not None else {}


def test_a_fresh_run_waits_for_min_islands_past_the_recovery_grace(coord):
    """An island registering after recovery_grace_s (a loaded machine, a slow start) still opens the fresh run with
    the first: fewer than min_islands cannot form an epoch, so the wait has no deadline (found by a CI flake where
    the run opened with one island and voted the initial hash on it alone)."""
    a = Isl(coord, "a", 0)
    assert a.rpc("register")["recovering"] is True
    time.sleep(1.0)  # twice the grace (0.5 s)
    assert a.rpc("register")["recovering"] is True and coord.state.run_step is None
    b = Isl(coord, "b", 0)
    b.rpc("register")
    assert a.rpc("register")["recovering"] is False
    ep = _one_epoch(a, b, 0)
    assert ep["members"] == ["a", "b"] and coord.state.canonical[-1] == "h0"


def _one_epoch(a, b, step):
    tb, rb = _bg(lambda: b.wait("sync", step=step))
    ep = a.wait("sync", step=step)["epoch"]
    tb.join()
    assert rb["r"]["epoch"] == ep
    tb, _ = _bg(lambda: b.wait("done", epoch=ep["id"], step=step, ok=True))
    a.wait("done", epoch=ep["id"], step=step, ok=True)
    tb.join()
    tb, _ = _bg(lambda: b.wait("commit", step=step, hash=f"h{step + 1}"))
    a.wait("commit", step=step, hash=f"h{step + 1}")
    tb.join()
    return ep


def test_streams_per_link_follow_the_measured_round_trips(coord):
    """elastic.streams = 0: the first epoch (nothing measured) uses 4 streams; once the islands report their probed
    round trips, each epoch carries ceil(link rate x slowest RTT / 4 MiB) within [4, 16], the same for every member."""
    assert coord.state.cfg.streams == 0 and coord.state.cfg.link_bytes_per_s == 125e6
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0)
    a.rpc("register"), b.rpc("register")
    assert _one_epoch(a, b, 0)["streams"] == 4
    a.rpc("rates", rates={"b": 1e8}, rtts={"b": 0.3})  # 125 MB/s x 0.3 s / 4 MiB = 8.9 -> 9
    b.rpc("rates", rates={"a": 1e8}, rtts={"a": 0.02})
    assert _one_epoch(a, b, 1)["streams"] == 9
    a.rpc("rates", rates={"b": 1e8}, rtts={"b": 2.0})  # capped
    assert _one_epoch(a, b, 2)["streams"] == 16
    a.close(), b.close()


@pytest.mark.parametrize("rtt,streams", [(0.0, 4), (0.1, 4), (0.15, 5), (0.3, 9), (0.5, 15), (5.0, 16)])
def test_auto_streams_rule(rtt, streams):
    rtts = {"a": {"b": rtt}, "b": {"c": 0.01}, "c": {"a": 0.0}}
    assert ordering.auto_streams(["a", "b", "c"], rtts, 125e6) == streams
    assert ordering.auto_streams(["a", "c", "b"], rtts, 125e6) == 4  # a -> b is not a link of this ring


def test_member_death_aborts_and_joiner_is_admitted_only_at_a_boundary(coord):
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0, kind="hb")
    a.rpc("register"), b.rpc("register")
    tb, _ = _bg(lambda: b.wait("sync", step=0))
    ep = a.wait("sync", step=0)["epoch"]
    tb.join()
    # A joiner registering now (holding state for step 0) is not put into the running epoch.
    c = Isl(coord, "c", 0)
    c.rpc("register")
    assert c.rpc("sync", step=0) == {"wait": True}
    b.close()  # b's heartbeat connection drops: dead
    deadline = time.monotonic() + 5
    while coord.state.islands["b"].alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not coord.state.islands["b"].alive
    rep = a.wait("done", epoch=ep["id"], step=0, ok=False)
    assert rep["decision"] == "abort"
    # Redo of step 0 in a new epoch with the survivor and the joiner (admitted at this boundary).
    tc, rc = _bg(lambda: c.wait("sync", step=0))
    ep2 = a.wait("sync", step=0)["epoch"]
    tc.join()
    assert ep2["id"] > ep["id"] and ep2["members"] == ["a", "c"] and rc["r"]["epoch"] == ep2


def test_stale_island_must_fetch_state(coord):
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0)
    a.rpc("register"), b.rpc("register")
    tb, _ = _bg(lambda: b.wait("sync", step=0))
    ep = a.wait("sync", step=0)["epoch"]
    tb.join()
    tb, _ = _bg(lambda: b.wait("done", epoch=ep["id"], step=0, ok=True))
    a.wait("done", epoch=ep["id"], step=0, ok=True)
    tb.join()
    late = Isl(coord, "late", 0)
    assert late.rpc("register")["needs_state"] is True
    assert late.wait("sync", step=0)["stale"] is True
    fresh = Isl(coord, "fresh", -1)
    assert fresh.rpc("register")["needs_state"] is True


def _pending(eid, step, status, members=("a", "b", "c")):
    return {"id": eid, "step": step, "members": list(members), "order": list(members), "status": status}


def test_restart_all_reported_ok_commits(coord):
    isl = [Isl(coord, n, 4, pending=_pending(9, 4, "ok"), last_epoch={"id": 8, "step": 3, "members": ["a", "b", "c"]},
               h=None) for n in "abc"]
    for i in isl:
        i.rpc("heartbeat")
    reps = [i.wait("done", epoch=9, step=4, ok=True) for i in isl]
    assert all(r["decision"] == "commit" for r in reps) and coord.state.run_step == 5
    assert coord.state.next_epoch_id == 10


def test_restart_one_advanced_means_commit_and_failed_one_resyncs(coord):
    a = Isl(coord, "a", 5, h="h5", last_epoch={"id": 9, "step": 4, "members": ["a", "b", "c"]})
    b = Isl(coord, "b", 4, pending=_pending(9, 4, "ok"))
    c = Isl(coord, "c", 4, pending=_pending(9, 4, "fail"))
    for i in (a, b, c):
        i.rpc("heartbeat")
    assert b.wait("done", epoch=9, step=4, ok=True)["decision"] == "commit"
    assert c.wait("done", epoch=9, step=4, ok=False)["decision"] == "stale"
    assert coord.state.run_step == 5


def test_restart_with_a_failure_aborts_and_redoes(coord):
    a = Isl(coord, "a", 4, pending=_pending(9, 4, "ok"))
    b = Isl(coord, "b", 4, pending=_pending(9, 4, "fail"))
    c = Isl(coord, "c", 4, pending=_pending(9, 4, "running"))
    for i in (a, b, c):
        i.rpc("heartbeat")
    assert a.wait("done", epoch=9, step=4, ok=True)["decision"] == "abort"
    assert coord.state.run_step == 4


def test_restart_running_member_is_waited_for(coord):
    a = Isl(coord, "a", 4, pending=_pending(9, 4, "ok"))
    b = Isl(coord, "b", 4, pending=_pending(9, 4, "ok"))
    c = Isl(coord, "c", 4, pending=_pending(9, 4, "running"))
    for i in (a, b, c):
        i.rpc("heartbeat")
    assert a.rpc("done", epoch=9, step=4, ok=True) == {"wait": True}
    c.status["pending"]["status"] = "ok"
    assert c.wait("done", epoch=9, step=4, ok=True)["decision"] == "commit"
    assert a.wait("done", epoch=9, step=4, ok=True)["decision"] == "commit"


def test_restart_missing_member_after_grace(coord):
    a = Isl(coord, "a", 4, pending=_pending(9, 4, "ok"))
    b = Isl(coord, "b", 4, pending=_pending(9, 4, "ok"))
    a.rpc("heartbeat"), b.rpc("heartbeat")
    t0 = time.monotonic()
    assert a.wait("done", epoch=9, step=4, ok=True)["decision"] == "commit"
    assert time.monotonic() - t0 >= 0.3  # waited (grace) for c, which never came back
    assert b.wait("done", epoch=9, step=4, ok=True)["decision"] == "commit"


def test_duplicate_live_name_is_refused(coord, caplog):
    a = Isl(coord, "a", 0)
    a.rpc("register")
    dup = Isl(coord, "a", 0)
    dup.inc = dup.status["incarnation"] = "other-incarnation"
    with pytest.raises(wire.RemoteError, match="in use by a live island"):
        dup.rpc("register")
    assert "refused registration of a incarnation other-incarnation" in caplog.text
    assert coord.state.islands["a"].incarnation == "inc-a"


# -- the `intellect-jax coordinator` command's settings ----------------------------------------------------------------


def _args(*argv):
    return cli.build_parser().parse_args(["coordinator", "--bind", "127.0.0.1:0", *argv])


def test_cli_defaults_are_elastic_config_defaults():
    assert cli.coordinator_config(_args("--secret-file", "s"), []) == (ElasticConfig(secret_file="s"), RunConfig().name,
                                                              DilocoConfig().max_norm_ratio)


def test_cli_takes_the_islands_config_then_flags_and_overrides(tmp_path):
    preset = tmp_path / "islands.toml"
    preset.write_text('[run]\nname = "r1"\n[elastic]\nsecret_file = "k"\nheartbeat_s = 0.5\nmin_islands = 3\n')
    cfg, run_id, ratio = cli.coordinator_config(_args("--config", str(preset), "--dead-after-s", "1.5"),
                                        ["--elastic.recovery_grace_s=2", "--diloco.max_norm_ratio=3"])
    assert (cfg.secret_file, cfg.heartbeat_s, cfg.min_islands, cfg.dead_after_s, cfg.recovery_grace_s) == \
        ("k", 0.5, 3, 1.5, 2.0)
    assert run_id == "r1" and ratio == 3.0
    assert cli.coordinator_config(_args("--config", str(preset), "--max-norm-ratio", "0"), [])[2] == 0.0
    assert cli.coordinator_config(_args("--config", str(preset), "--run-id", "r2"), [])[1] == "r2"


@pytest.mark.parametrize("argv, words", [
    (["--secret-file", "s", "--min-islands", "0"], ["elastic.min_islands=0", "> 0"]),
    (["--secret-file", "s", "--dead-after-s", "1"], ["elastic.dead_after_s=1.0", "elastic.heartbeat_s"]),
    (["--secret-file", "s", "--recovery-grace-s", "-1"], ["elastic.recovery_grace_s=-1.0", ">= 0"]),
    ([], ["--key-file", "--islands-file", "--secret-file"]),
    (["--secret-file", "s", "--max-norm-ratio", "0.5"], ["diloco.max_norm_ratio=0.5", "0 (off) or >= 1"]),
])
def test_cli_bad_values_name_the_key(argv, words, capsys):
    with pytest.raises(ConfigError) as e:
        cli.coordinator_config(_args(*argv), [])
    for w in words:
        assert w in str(e.value)
    assert cli.main(["coordinator", "--bind", "127.0.0.1:0", *argv]) == 2  # a clean message, no traceback
    assert words[0] in capsys.readouterr().err


@pytest.mark.parametrize("field,value,needle", [
    ("last_epoch", "x", "last_epoch must be an object or null"),
    ("last_epoch", {"id": "x", "step": 0, "members": []}, "last_epoch.id must be an integer"),
    ("pending", {"id": 1, "step": 0, "members": ["a"], "order": ["a"], "status": 7}, "pending.status must be"),
    ("step", "3", "step must be an integer"),
    ("step", True, "step must be an integer"),
    ("port", 70000, "port must be an integer in [1, 65535]"),
    ("advertise_host", "evil host; rm", "advertise_host must be a host name"),
    ("rates", {"b": float("nan")}, "must be a finite number"),
    ("rtts", {"b": -1.0}, "rtts['b'] must be a finite number"),
    ("incarnation", "", "incarnation must be a printable string"),
    ("last_epoch", {"id": 1, "step": 0, "members": [f"n{i}" for i in range(4096)]}, "at most 256 island names"),
    ("pending", {"id": 2 ** 62, "step": 0, "members": ["a"], "order": ["a"], "status": "ok"}, "pending.id must be"),
    ("pending", {"id": 1, "step": 0, "members": ["a"], "order": ["a"], "topology": "mesh", "status": "ok"},
     "pending.topology must be one of ['ring']"),
])
def test_bad_status_fields_are_refused_and_nothing_breaks(coord, caplog, field, value, needle):
    """An authenticated island sending a badly typed field gets an ERROR naming it, the coordinator logs it, and the
    coordinator (its monitor thread included) goes on serving the other islands."""
    bad = Isl(coord, "x", 0)
    bad.status[field] = value
    with pytest.raises(wire.RemoteError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        bad.rpc("register")
    assert "refused 'register' request from island x" in caplog.text
    assert "x" not in coord.state.islands  # nothing of a refused status was applied
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0)
    a.rpc("register"), b.rpc("register")
    time.sleep(0.5)  # a few monitor rounds
    assert coord._monitor.is_alive()
    t, out = _bg(lambda: a.wait("sync", step=0))
    rep_b = b.wait("sync", step=0)
    t.join(10)
    assert rep_b.get("epoch") and out["r"].get("epoch")  # an epoch still forms
    for i in (bad, a, b):
        i.close()


def test_extreme_link_measurements_are_clamped_not_a_crash(coord, caplog):
    """rtts = {peer: 1e308} raised an OverflowError in the stream count on every request (a traceback flood); now
    rates and round trips are clamped and unknown peers dropped."""
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0)
    a.rpc("register"), b.rpc("register")
    a.rpc("rates", rates={"b": 1e308, "ghost": 1.0}, rtts={"b": 1e308})
    assert coord.state.islands["a"].rtts == {"b": 600.0} and set(coord.state.islands["a"].rates) == {"b"}
    assert _one_epoch(a, b, 0)["streams"] == ordering.MAX_STREAMS
    assert "Traceback" not in caplog.text and "OverflowError" not in caplog.text


def test_registrations_beyond_max_islands_are_refused():
    cfg = ElasticConfig(heartbeat_s=0.5, dead_after_s=2.0, min_islands=1, recovery_grace_s=0.5, max_islands=2)
    c = Coordinator(cfg, RUN, "127.0.0.1:0", AUTH).start()
    try:
        isl = [Isl(c, n, 0) for n in "abc"]
        isl[0].rpc("register"), isl[1].rpc("register")
        with pytest.raises(wire.RemoteError, match=r"already has 2 live islands, its limit \(elastic.max_islands=2\)"):
            isl[2].rpc("register")
        for i in isl:
            i.close()
    finally:
        c.close()


def _epoch_for(isls, step, **per_name):
    """Every island syncs `step` concurrently (with per-name extra fields); returns name -> reply."""
    threads = {i.name: _bg(lambda i=i: i.wait("sync", step=step, **per_name.get(i.name, {}))) for i in isls}
    for t, _ in threads.values():
        t.join(15)
    return {n: out["r"] for n, (_, out) in threads.items()}


def test_silent_death_of_an_unreported_member_aborts_at_once_and_the_redo_excludes_it(coord):
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0)
    c = Isl(coord, "c", 0, kind="hb")
    for i in (a, b, c):
        i.rpc("register")
    reps = _epoch_for([a, b, c], 0)
    ep = reps["a"]["epoch"]
    assert ep["members"] == ["a", "b", "c"] and a.rpc("epoch", epoch=ep["id"]) == {"decision": None}
    c.close()  # dies before anyone reported: the others may be waiting on it in the ring
    deadline = time.monotonic() + 5
    while a.rpc("epoch", epoch=ep["id"])["decision"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.rpc("epoch", epoch=ep["id"]) == {"decision": "abort"}  # what a member's watchdog polls
    assert a.wait("done", epoch=ep["id"], step=0, ok=False)["decision"] == "abort"
    # The abort cleared readiness: a alone re-syncing does not form an epoch with the stale b.
    assert a.rpc("sync", step=0) == {"wait": True}
    ep2 = _epoch_for([a, b], 0)["a"]["epoch"]
    assert ep2["members"] == ["a", "b"] and ep2["id"] > ep["id"]


def test_a_member_dying_after_the_others_reported_ok_still_commits(coord):
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0)
    c = Isl(coord, "c", 0, kind="hb")
    for i in (a, b, c):
        i.rpc("register")
    ep = _epoch_for([a, b, c], 0)["a"]["epoch"]
    c.rpc("heartbeat")  # fresh, so that only its connection closing (below) declares it dead
    waits = [_bg(lambda i=i: i.wait("done", epoch=ep["id"], step=0, ok=True)) for i in (a, b)]
    deadline = time.monotonic() + 5
    while len(coord.state.epoch.done) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert coord.state.epoch.done == {"a": "ok", "b": "ok"}
    c.close()  # the ring had completed (a and b hold the result): no need to redo
    for t, out in waits:
        t.join(10)
        assert out["r"]["decision"] == "commit"


@pytest.mark.parametrize("norms, ratio, left_out", [
    ({"a": 1.0, "b": 1.1, "c": None}, 5.0, {"c": "not finite"}),
    ({"a": 1.0, "b": 1.1, "c": 0.9, "d": 100.0}, 5.0, {"d": "exceeds 5 x the median 1.05"}),
    ({"a": 1.0, "b": 1.1, "c": 0.9, "d": 100.0}, 0.0, {}),  # ratio off: only non-finite ones
    ({"a": 1.0, "b": 100.0}, 5.0, {}),  # 2 islands: no median to speak of (the in-program rule too)
    ({"a": 1.0, "b": 1.0, "c": 4.99}, 5.0, {}),
])
def test_outlier_rule(norms, ratio, left_out):
    from intellect_jax.elastic.coordinator import outliers
    got = outliers(norms, ratio)
    assert sorted(got) == sorted(left_out)
    for n, words in left_out.items():
        assert words in got[n]


def test_guard_leaves_out_a_nan_and_an_outlier_island_from_the_epoch(coord, caplog):
    isl = [Isl(coord, n, 0) for n in "abcd"]
    for i in isl:
        i.rpc("register")
    reps = _epoch_for(isl, 0, a={"norm": 1.0}, b={"norm": 1.2}, c={"norm": None}, d={"norm": 50.0})
    assert reps["a"]["epoch"]["members"] == ["a", "b"] == reps["b"]["epoch"]["members"]
    assert "not finite" in reps["c"]["excluded"] and "exceeds 5 x the median" in reps["d"]["excluded"]
    assert "island c left out of the reduce: its pseudo-gradient is not finite" in caplog.text
    ep = reps["a"]["epoch"]
    tb, _ = _bg(lambda: isl[1].wait("done", epoch=ep["id"], step=0, ok=True))
    assert isl[0].wait("done", epoch=ep["id"], step=0, ok=True)["decision"] == "commit"
    tb.join()
    assert isl[2].wait("sync", step=0, norm=None)["stale"] is True  # after the commit: re-sync from a peer
    assert isl[2].rpc("register")["needs_state"] is True


def test_guard_with_every_island_left_out_stops_the_run_with_the_fix(coord):
    isl = [Isl(coord, n, 0) for n in "ab"]
    for i in isl:
        i.rpc("register")
    reps = _epoch_for(isl, 0, a={"norm": None}, b={"norm": None})
    assert all("restore the last good checkpoint" in r["error"] for r in reps.values())


def test_bad_norm_field_is_refused(coord):
    a = Isl(coord, "a", 0)
    a.rpc("register")
    with pytest.raises(wire.RemoteError, match="norm must be a finite number >= 0 or null"):
        a.rpc("sync", step=0, norm="x")


@pytest.fixture
def slow_grace():
    cfg = ElasticConfig(heartbeat_s=0.5, dead_after_s=2.0, min_islands=2, recovery_grace_s=2.5)
    c = Coordinator(cfg, RUN, "127.0.0.1:0", AUTH).start()
    yield c
    c.close()


@pytest.mark.parametrize("fetched_epoch", [True, False])
def test_restart_does_not_take_the_run_step_from_islands_that_only_fetched(slow_grace, fetched_epoch):
    """After a coordinator restart, islands that fetched step 54 register first; c and d, which committed step 54
    (epoch 56) and hold step 55, come a moment later. Recovery must wait for them (the fetchers name the epoch
    that committed their state, or name none while holding a run in progress): ending it with run step 54 would
    let a and b redo step 54 and fork the run (found by benchmarks/chaos.py)."""
    coord = slow_grace
    le53 = {"id": 55, "step": 53, "members": ["c", "d"]} if fetched_epoch else None
    a, b = (Isl(coord, n, 54, h="h54", last_epoch=le53) for n in "ab")
    a.rpc("register"), b.rpc("register")
    time.sleep(0.5)
    assert coord.state.recovering and a.rpc("sync", step=54) == {"wait": True}
    le54 = {"id": 56, "step": 54, "members": ["c", "d"]}
    c, d = (Isl(coord, n, 55, h="h55", last_epoch=le54) for n in "cd")
    c.rpc("register"), d.rpc("register")
    if not fetched_epoch:  # nothing named c and d: the grace runs out first
        time.sleep(2.5)
    rep = a.rpc("register")
    assert not coord.state.recovering and coord.state.run_step == 55 and rep["needs_state"] is True
    assert a.wait("sync", step=54)["stale"] is True
    assert {k: coord.state.committed[54][k] for k in le54} == le54 and a.rpc("members")["epochs"]["54"] == le54


def test_a_claimed_later_step_or_epoch_moves_nothing_once_the_run_is_going(coord, caplog):
    """The last_epoch attack: an island claiming it holds outer step 1, committed by an epoch of its own invention,
    used to make the coordinator abort the honest epoch and advance the run. Now a claim is not a fact: the running
    epoch commits, the claimant must fetch the state, and no step without a committed epoch is ever believed."""
    a, b = Isl(coord, "a", 0), Isl(coord, "b", 0)
    a.rpc("register"), b.rpc("register")
    ep = _epoch_for([a, b], 0)["a"]["epoch"]  # running: outer step 0
    late = Isl(coord, "c", 1, h="h1", last_epoch={"id": 1, "step": 0, "members": ["c", "x"]})
    assert late.rpc("register")["needs_state"] is True
    assert late.wait("sync", step=1)["stale"] is True
    tb, rb = _bg(lambda: b.wait("done", epoch=ep["id"], step=0, ok=True))
    assert a.wait("done", epoch=ep["id"], step=0, ok=True)["decision"] == "commit"
    tb.join()
    assert rb["r"]["decision"] == "commit" and coord.state.run_step == 1
    far = Isl(coord, "d", 1_000_000, h="x", pending={"id": 2 ** 52, "step": 10 ** 6, "members": ["d"],
                                                      "order": ["d"], "status": "ok"})
    assert far.rpc("register")["needs_state"] is True
    assert far.wait("sync", step=1_000_000)["stale"] is True
    assert coord.state.next_epoch_id == ep["id"] + 1 and coord.state.run_step == 1
    assert not [s for s in far.rpc("members")["islands"] if s["source"]]  # nobody holds step 1's hash yet


def test_restart_with_a_fresh_island_first_does_not_restart_the_run_from_zero(slow_grace):
    """A restarted island with no state yet (step 0, it will fetch) registers before the islands holding the run:
    alone it is fewer than min_islands, so the coordinator keeps waiting instead of declaring a fresh run at 0."""
    fresh = Isl(slow_grace, "a", 0)
    assert fresh.rpc("register")["recovering"] is True
    time.sleep(0.3)
    assert slow_grace.state.recovering
    le = {"id": 12, "step": 9, "members": ["b", "c"]}
    for n in "bc":
        Isl(slow_grace, n, 10, h="h10", last_epoch=le).rpc("register")
    rep = fresh.rpc("register")
    assert slow_grace.state.run_step == 10 and rep["needs_state"] is True


def test_a_late_joiner_is_told_the_run_finished_instead_of_waiting(coord, tmp_path):
    """Every island that held the state finished its run and left (its goodbye says finished): an island that still
    needs the state fails at once with what to do, not after elastic.barrier_timeout_s (1 h by default)."""
    import os

    from intellect_jax.elastic import ElasticError, IslandClient

    a = Isl(coord, "a", 3, h="h3")
    a.rpc("register")
    deadline = time.monotonic() + 30
    while (rep := a.rpc("register"))["recovering"] and time.monotonic() < deadline:  # past the recovery grace (0.5 s)
        time.sleep(0.01)
    assert rep["recovering"] is False and rep["run_step"] == 3  # the run is at outer step 3
    assert a.rpc("members")["finished_step"] is None
    assert a.rpc("bye", finished=True) == {"ok": True}
    assert coord.state.finished_step == 3
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    cfg = ElasticConfig(coordinator=f"127.0.0.1:{coord.port}", secret_file=str(secret), island_name="late",
                        listen="127.0.0.1:0", heartbeat_s=0.5, dead_after_s=2.0, barrier_timeout_s=10.0)
    late = IslandClient(cfg, RUN, lambda: ({}, {}), compression="int8", block_size=256)
    try:
        info = late.join(-1, None)
        assert info.needs_state and info.run_step == 3
        t0 = time.monotonic()
        with pytest.raises(ElasticError, match="the run finished at outer step 3 .* resume an island from its final"):
            late.fetch_state()
        assert time.monotonic() - t0 < 5
    finally:
        late.close()
        a.close()


def test_a_link_probe_lasts_a_fraction_of_a_second_at_the_rate_the_ring_reached():
    """The probe after a membership change runs on the links the next reduces use: sized to ~0.5 s of what the
    island's last ring moved per second (5 Mbit/s: 312 KB, not the 1 MiB default's 1.7 s), never below 256 KiB, never
    above elastic.probe_bytes, and elastic.probe_bytes when nothing was measured."""
    from intellect_jax.elastic.client import probe_size

    assert probe_size(1 << 20, 5e6 / 8) == 312_500
    assert probe_size(1 << 20, 1e9 / 8) == 1 << 20
    assert probe_size(1 << 20, 1e5) == 256 << 10
    assert probe_size(1 << 20, None) == probe_size(1 << 20, 0.0) == 1 << 20
    assert probe_size(100_000, 1e5) == 100_000


def test_an_island_whose_key_is_not_admitted_stops_at_join_with_the_fix(tmp_path):
    """An island with a key the islands file does not list: its join fails at once with a message naming its key
    and where to add it (a user error: one line from the CLI), and the coordinator logs the refusal."""
    from intellect_jax.elastic import IslandClient
    from intellect_jax.elastic.client import NotAdmitted
    from intellect_jax.elastic.coordinator import coordinator_auth
    from tests.elastic_keys import write_roster

    islands, keys = write_roster(tmp_path, ["a"])
    cfg = ElasticConfig(heartbeat_s=0.5, dead_after_s=2.0, key_file=str(keys["coordinator"]),
                        islands_file=str(islands))
    c = Coordinator(cfg, RUN, "127.0.0.1:0", coordinator_auth(cfg)).start()
    try:
        identity.write_key(tmp_path / "stranger.key")
        icfg = ElasticConfig(coordinator=f"127.0.0.1:{c.port}", key_file=str(tmp_path / "stranger.key"),
                             islands_file=str(islands), island_name="z", listen="127.0.0.1:0", heartbeat_s=0.5,
                             dead_after_s=2.0)
        client = IslandClient(icfg, RUN, lambda: ({}, {}), compression="int8", block_size=256)
        try:
            t0 = time.monotonic()
            with pytest.raises(NotAdmitted, match=r"refused island z: not admitted: key SHA256:.*\(claiming to be "
                                                  r"'z'\) is not admitted to this run; add its line"):
                client.join(0, "h0")
            assert time.monotonic() - t0 < 5
        finally:
            client.close()
    finally:
        c.close()

