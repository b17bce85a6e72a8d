"""Attacks on the elastic layer, as issue 34 lists them, each against a live run: a coordinator and three honest numpy
stand-in islands (tests/sim_island.py, separate processes on 127.0.0.1), plus an attacker. An insider holds one
admitted identity ("x", with its own key in the islands file; with an older shared-secret build, the secret); an
outsider holds nothing.

Each scenario reports what happened to the honest islands: whether they all finished, whether every outer step's
hash on them equals an in-process replay of the members that reduced it (tests/test_elastic_e2e.check_run: nothing
lost, doubled, half-applied or poisoned), whether the attacker is named in a log, and the coordinator's or island's
memory and threads where the attack targets them.

    python benchmarks/attacks.py                       # every scenario against this build; writes RESULTS.md
    python benchmarks/attacks.py --tree /tmp/before --label before --json before.json --no-write
    python benchmarks/attacks.py --json after.json --compare before.json    # the Security section: before / after

``--tree`` runs the scenarios against another checkout (e.g. ``git worktree add /tmp/before 12e4daf``): its
coordinator, islands and wire module, through a thin compatibility layer (Api) for the handshake it speaks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
HONEST = ("a", "b", "c")
RUN_ID = "run"


def _proc(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "Threads"):
                out[k] = int(v.split()[0])
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        out["cpu_ticks"] = int(fields[11]) + int(fields[12])
    except OSError:
        pass
    return out


class Api:
    """What differs between the build under attack and this one: the handshake (protocol 4: keys; 3: a shared
    secret and a claimed name) and the harness's knobs."""

    def __init__(self, tree: Path):
        sys.path.insert(0, str(tree))
        os.environ["PYTHONPATH"] = str(tree)
        from intellect_jax.elastic import recovery, wire
        from tests import sim_island, test_elastic_e2e

        self.wire, self.recovery, self.sim, self.e2e = wire, recovery, sim_island, test_elastic_e2e
        self.keys = wire.PROTOCOL_VERSION >= 4
        if self.keys:
            from intellect_jax.elastic import identity
            self.identity = identity

    def run(self, tmp: Path, fast: bool = True, **kw):
        """A Run of the build: honest islands a-c and the attacker's identity x."""
        if self.keys:
            args = ["--sync-timeout-s", "4", "--vote-timeout-s", "4", "--quarantine-s", "30"] if fast else []
            return self.e2e.Run(tmp, names=(*HONEST, "x"), coordinator_args=args, **kw)
        return self.e2e.Run(tmp, **kw)

    def auth(self, run, name: str):
        """`name`'s identity: admitted (x) or invented (anything else: a fresh key nobody listed)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        ident = self.identity
        if name in getattr(run, "key_files", {}):
            return run.auth(name)
        return ident.Auth(ident.Identity(name, Ed25519PrivateKey.generate()),
                          ident.RosterKeys(ident.load_roster(run.islands_file)))

    def coord(self, run, name: str, kind: str = "rpc", source: str | None = None):
        """A connection to the coordinator as `name` (from the local address `source`, where the build allows)."""
        w = self.wire
        if self.keys:
            return w.connect(("127.0.0.1", run.port), self.auth(run, name), "coordinator", RUN_ID, 1 << 20,
                             hello={"kind": kind}, timeout=5, source=(source, 0) if source else None)[0]
        return w.connect(("127.0.0.1", run.port), run.secret.read_bytes(), RUN_ID, 1 << 20,
                         hello={"name": name, "kind": kind}, timeout=5)[0]

    def peer(self, run, port: int, island: str, name: str, hello: dict, max_frame: int = 256 << 20):
        w = self.wire
        if self.keys:
            return w.connect(("127.0.0.1", port), self.auth(run, name), island, RUN_ID, max_frame, hello=hello,
                             timeout=5)[0]
        return w.connect(("127.0.0.1", port), run.secret.read_bytes(), RUN_ID, max_frame,
                         hello=dict(hello, **{"from": name}), timeout=5)[0]

    def server(self, run, name: str, handler):
        w = self.wire
        cred = self.auth(run, name) if self.keys else run.secret.read_bytes()
        return w.Server("127.0.0.1:0", cred, RUN_ID, 256 << 20, handler, f"attacker-{name}").start()

    def refused(self) -> tuple:
        return (OSError, self.wire.WireError, self.wire.RemoteError)


def status(step: int, h, port: int = 9, **kw) -> dict:
    return {"incarnation": kw.pop("incarnation", "inc-evil"), "step": step, "hash": h,
            "advertise_host": "127.0.0.1", "port": port, "last_epoch": None, "pending": None, **kw}


class Insider:
    """Connections to the coordinator under one name, kept registered by a heartbeat thread."""

    def __init__(self, api: Api, run, name: str, st: dict):
        self.api, self.name, self.st = api, name, st
        self.conn = api.coord(run, name)
        self.rep = self.conn.request({"op": "register", "incarnation": st["incarnation"], "status": st})[0]
        self._stop = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self):
        while not self._stop.wait(0.5):
            try:
                self.conn.request({"op": "heartbeat", "incarnation": self.st["incarnation"], "status": self.st})
            except Exception:  # noqa: BLE001 - the attacker does not care
                return

    def close(self):
        self._stop.set()
        self.conn.close()


class Scenario:
    def __init__(self, api: Api, tmp: Path, steps: int = 8, inner_s: float = 0.3, attacker=None, **run_kw):
        self.api, self.steps = api, steps
        self.run = api.run(tmp, **run_kw)
        self.run.start_coordinator(min_islands=3 + (attacker is not None))
        for i, n in enumerate(HONEST):
            self.run.start_island(n, 10 + i, steps, inner_s=inner_s)
        if attacker is not None:
            self.start_attacker(attacker, steps, inner_s)
        self.notes: list[str] = []

    def start_attacker(self, attack: str, steps: int, inner_s: float) -> None:
        run = self.run
        run.seeds["x"] = 99
        log = open(run.tmp / "x.log", "w")
        import subprocess
        ident = run.identity_args("x") if self.api.keys else ["--secret-file", str(run.secret)]
        run.procs["x"] = subprocess.Popen(
            [PY, str(ROOT / "benchmarks" / "attack_island.py"), "--attack", attack, "--", "--coordinator",
             f"127.0.0.1:{run.port}", "--listen", "127.0.0.1:0", *ident, "--name", "x", "--seed", "99",
             "--steps", str(steps), "--dim", str(run.dim), "--inner-s", str(inner_s), "--streams", "2",
             "--chunk-bytes", str(256 << 10), "--heartbeat-s", "0.5", "--dead-after-s", str(run.dead_after_s),
             "--out", str(run.tmp / "x.jsonl")], stdout=log, stderr=subprocess.STDOUT)

    def more_steps(self, k: int, timeout: float = 90.0) -> None:
        """Waits until island a has committed `k` more outer steps (AssertionError if it does not)."""
        base = len(self.run.events("a", "step"))
        self.run.wait_for(lambda: len(self.run.events("a", "step")) >= base + k, timeout, f"{k} more outer steps")

    def wait_first_step(self):
        self.run.wait_for(lambda: all(self.run.events(n, "step") for n in HONEST), 90, "a first outer step")

    def finish(self, timeout: float = 180.0) -> dict:
        """Waits for the honest islands; returns the outcome."""
        deadline = time.monotonic() + timeout
        codes = {}
        for n in HONEST:
            try:
                codes[n] = self.run.procs[n].wait(max(1.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - still running at the deadline
                codes[n] = None
        out = {"finished": all(c == 0 for c in codes.values()), "codes": codes}
        try:
            self.api.e2e.check_run(self.run, "".join(HONEST), self.steps)
            out["replay"] = "equal"
        except AssertionError as e:
            out["replay"] = f"DIFFERS ({str(e).splitlines()[0][:120]})"
        except Exception as e:  # noqa: BLE001
            out["replay"] = f"unchecked ({type(e).__name__})"
        logs = self.run.dump_logs() + self.run.coord_log()
        out["tracebacks"] = logs.count("Traceback")
        out["fetched_from"] = sorted({(e.get("report") or {}).get("source") for n in HONEST
                                      for e in self.run.events(n, "fetched")} - {None})
        return out

    def stop(self):
        self.run.stop()


# -- the scenarios ---------------------------------------------------------------------------------------------------
# Each returns (outcome dict, the honest outcome it must show to pass).


def invented_names_outvote(api: Api, tmp: Path) -> dict:
    """Four invented names register as holding outer step K+1 with the hash of a poisoned state (served by the
    attacker), to out-vote the three honest islands on step K; after the honest islands fetch, the names leave."""
    sc = Scenario(api, tmp, steps=8, inner_s=0.4)
    K = 3
    dim = sc.run.dim
    arrays = {"params": api.sim.init_params(dim) * 0 + 0.5, "momentum": (api.sim.init_params(dim) * 0)}
    meta = {"outer_step": K + 1, "params_hash": api.recovery.params_hash(arrays)}
    served = []

    def handler(conn, hello):
        served.append(1)
        api.recovery.serve_state(conn, lambda: (arrays, meta))

    srv = api.server(sc.run, "x", handler)
    names = ["x", "evil1", "evil2", "evil3", "evil4"] if api.keys else ["evil1", "evil2", "evil3", "evil4"]
    insiders, refused = [], []
    try:
        for n in names:
            try:
                insiders.append(Insider(api, sc.run, n, status(K + 1, meta["params_hash"], srv.port,
                                                              incarnation=f"inc-{n}")))
            except api.refused() as e:
                refused.append(f"{n}: {str(e)[:80]}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and all(p.poll() is None for n, p in sc.run.procs.items() if n in HONEST):
            if len(served) >= 3:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        for i in insiders:  # gone, so that the honest islands go on from what they fetched
            try:
                i.conn.request({"op": "bye", "incarnation": i.st["incarnation"]})
            except Exception:  # noqa: BLE001
                pass
            i.close()
        out = sc.finish()
    finally:
        srv.close()
        sc.stop()
    out["refused"] = refused
    out["served_poisoned"] = len(served)
    out["pass"] = out["finished"] and out["replay"] == "equal" and not served
    out["summary"] = (f"{len(served)} poisoned state transfers served; honest replay {out['replay']}; "
                      f"{len(refused)} of {len(names)} names refused")
    return out


def invented_last_epoch(api: Api, tmp: Path) -> dict:
    """One island claims it holds outer step 2 committed by an epoch of its own (members: itself) while the honest
    epoch for step 1 runs, and syncs step 2."""
    sc = Scenario(api, tmp, steps=6, inner_s=0.6)
    try:
        sc.wait_first_step()
        ins = Insider(api, sc.run, "x", status(2, "f" * 64, last_epoch={"id": 10_000, "step": 1, "members": ["x"]},
                                               incarnation="inc-x"))
        replies = []
        for _ in range(40):
            try:
                replies.append(ins.conn.request({"op": "sync", "incarnation": "inc-x", "step": 2})[0])
            except Exception as e:  # noqa: BLE001
                replies.append({"refused": str(e)[:80]})
            if any("epoch" in r for r in replies):
                break
            time.sleep(0.1)
        out = sc.finish()
        ins.close()
    finally:
        sc.stop()
    formed = [r["epoch"] for r in replies if "epoch" in r]
    out["pass"] = out["finished"] and out["replay"] == "equal" and not formed
    clog = sc.run.coord_log()
    out["summary"] = (("the coordinator formed epoch " + str(formed[0]["id"]) + " with the liar alone" if formed
                       else "claim not believed (stale: fetch the state)") +
                      ("; it advanced the run on the claim" if "advancing" in clog else "") +
                      f"; honest replay {out['replay']}")
    return out


def far_step_joiner(api: Api, tmp: Path) -> dict:
    """The attacker registers as holding outer step 1,000,000 and serves a self-consistent state of it; an honest
    island is killed and restarted, so it must fetch a state."""
    sc = Scenario(api, tmp, steps=30, inner_s=0.4)  # long enough for the restarted island to catch up
    dim = sc.run.dim
    arrays = {"params": api.sim.init_params(dim) * 0 + 0.25, "momentum": api.sim.init_params(dim) * 0}
    meta = {"outer_step": 1_000_000, "params_hash": api.recovery.params_hash(arrays)}
    served = []

    def handler(conn, hello):
        served.append(1)
        api.recovery.serve_state(conn, lambda: (arrays, meta))

    srv = api.server(sc.run, "x", handler)
    try:
        sc.wait_first_step()
        ins = Insider(api, sc.run, "x", status(1_000_000, meta["params_hash"], srv.port, incarnation="inc-x"))
        sc.run.procs["c"].kill()
        sc.run.procs["c"].wait(10)
        time.sleep(sc.run.dead_after_s + 0.5)
        sc.run.start_island("c", 12, sc.steps, inner_s=0.4, tag="-2")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not sc.run.events("c", "fetched") and \
                sc.run.procs["c-2"].poll() is None:
            time.sleep(0.2)
        fetched = [e["step"] for e in sc.run.events("c", "fetched")]
        out = {"finished": True}
        for n in ("a", "b", "c-2"):
            try:
                rc = sc.run.procs[n].wait(120)
            except Exception:  # noqa: BLE001
                rc = None
            out["finished"] &= rc == 0
        ins.close()
        try:
            api.e2e.check_run(sc.run, "abc", sc.steps)
            out["replay"] = "equal"
        except AssertionError as e:
            out["replay"] = f"DIFFERS ({str(e).splitlines()[0][:120]})"
    finally:
        srv.close()
        sc.stop()
    out["pass"] = out["finished"] and out["replay"] == "equal" and 1_000_000 not in fetched
    out["summary"] = (f"the restarted island fetched step(s) {fetched}; {len(served)} transfers served by the "
                      f"attacker; honest islands {'finished' if out['finished'] else 'did NOT finish'}; replay "
                      f"{out['replay']}")
    return out


def registration_field(api: Api, tmp: Path, field: str) -> dict:
    """One registration with an extreme field: pending.id = 2**62."""
    sc = Scenario(api, tmp, steps=8, inner_s=0.3)
    try:
        sc.wait_first_step()
        err = ""
        try:
            st = status(0, None, incarnation="inc-x", pending={"id": 2 ** 62, "step": 0, "members": ["x"],
                                                                "order": ["x"], "status": "ok"})
            Insider(api, sc.run, "x", st)
        except api.refused() as e:
            err = str(e)[:100]
        out = sc.finish(timeout=90)
    finally:
        sc.stop()
    out["pass"] = out["finished"] and out["replay"] == "equal" and out["tracebacks"] == 0
    out["summary"] = (f"honest islands {'finished' if out['finished'] else 'exited: ' + str(out['codes'])}; "
                      f"{out['tracebacks']} tracebacks in the logs; " + (f"refused: {err}" if err else "accepted"))
    return out


def member_attack(api: Api, tmp: Path, attack: str) -> dict:
    """The attacker is a real island that takes part in the epochs, then: reports every reduce failed, never
    votes, never syncs, sends each ring frame just inside the per-frame timeout, or reports 1e308 s round trips."""
    sc = Scenario(api, tmp, steps=8, inner_s=0.3, attacker=attack)
    t0 = time.monotonic()
    try:
        out = sc.finish(timeout=240)
    finally:
        sc.stop()
    out["seconds"] = round(time.monotonic() - t0, 1)
    clog = sc.run.coord_log()
    out["named"] = "island x quarantined" in clog
    out["pass"] = out["finished"] and out["replay"] == "equal" and out["tracebacks"] == 0
    aborts = clog.count("aborted (outer step")
    done = f"finished {sc.steps} steps" if out["finished"] else f"did NOT finish: {out['codes']}"
    out["summary"] = (f"honest islands {done} "
                      f"in {out['seconds']} s; {aborts} aborted reduces; replay {out['replay']}; "
                      f"{out['tracebacks']} tracebacks"
                      + ("; x quarantined (named in the log)" if out["named"] else ""))
    return out


def exhaust_coordinator(api: Api, tmp: Path, how: str) -> dict:
    """Memory and threads of the coordinator under one insider: re-registering with huge member lists for 7 s, or
    1,000 logged-in connections each sending a 1 MiB frame header and stalling."""
    sc = Scenario(api, tmp, steps=10_000, inner_s=0.3)
    pid = sc.run.procs["coordinator"].pid
    conns, errs = [], 0
    try:
        sc.wait_first_step()
        before = _proc(pid)
        t_end = time.monotonic() + 7.0
        if how == "members":
            names = [f"n{i}" for i in range(4096)]
            try:
                ins = Insider(api, sc.run, "x", status(1, "h", incarnation="inc-x"))
            except api.refused():
                ins = None
            k = 0
            while time.monotonic() < t_end and ins is not None:
                k += 1
                st = status(k + 1, "h", incarnation="inc-x", last_epoch={"id": k, "step": k, "members": names})
                try:
                    ins.conn.request({"op": "register", "incarnation": "inc-x", "status": st})
                except api.refused():
                    errs += 1
                    if errs > 2000:
                        break
        else:
            head = struct.pack(">4sHHQ16sIQ4s", api.wire.MAGIC, api.wire.PROTOCOL_VERSION, 3, 1,
                               api.wire.run_tag(RUN_ID), 1 << 20, 0, b"\0" * 4)
            for _ in range(1000):
                try:
                    c = api.coord(sc.run, "x")
                    c.sock.sendall(head + b"[" * (1 << 20))  # all but the MAC / tag: it waits for the rest
                    conns.append(c)
                except api.refused():
                    errs += 1
                if time.monotonic() > t_end + 30:
                    break
        time.sleep(1.0)
        during = _proc(pid)
        sc.more_steps(3)
        # and a restarted island can still fetch the state (the coordinator's reply naming the sources fits a frame)
        sc.run.procs["c"].kill()
        sc.run.procs["c"].wait(10)
        time.sleep(sc.run.dead_after_s + 0.5)
        sc.run.start_island("c", 12, sc.steps, inner_s=0.3, tag="-2")
        fetched = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not fetched and sc.run.procs["c-2"].poll() is None:
            fetched = bool(sc.run.events("c", "fetched"))
            time.sleep(0.2)
        out = {"finished": fetched, "replay": "-",
               "rss_mb": round((during.get("VmRSS", 0) - before["VmRSS"]) / 1024, 1),
               "threads": during.get("Threads", 0) - before["Threads"], "refusals": errs}
    except AssertionError as e:
        out = {"finished": False, "replay": "-", "rss_mb": None, "threads": None, "refusals": errs,
               "error": str(e)[:200]}
    finally:
        for c in conns:
            c.close()
        sc.stop()
    out["pass"] = out["finished"] and (out["rss_mb"] or 0) < 64 and (out["threads"] or 0) < 32
    out["summary"] = ((f"coordinator RSS {out['rss_mb']:+} MB, threads {out['threads']:+}" if out["rss_mb"] is not None
                       else "the run stalled") + "; a restarted island " +
                      ("fetched the state" if out["finished"] else "could NOT fetch the state"))
    return out


def idle_connections(api: Api, tmp: Path, n: int = 3000) -> dict:
    """An outsider opens 3,000 connections to the coordinator and sends nothing (what held before, and must hold)."""
    sc = Scenario(api, tmp, steps=10_000, inner_s=0.3)
    socks = []
    try:
        sc.wait_first_step()
        pid = sc.run.procs["coordinator"].pid
        before = _proc(pid)
        for _ in range(n):
            try:
                socks.append(socket.create_connection(("127.0.0.1", sc.run.port), timeout=2,
                                                      source_address=("127.0.0.2", 0)))
            except OSError:
                break
        time.sleep(1.0)
        during = _proc(pid)
        sc.more_steps(3)
        ok = True
    except AssertionError:
        ok = False
    finally:
        for x in socks:
            x.close()
        sc.stop()
    rss, threads = (during.get("VmRSS", 0) - before["VmRSS"]) / 1024, during.get("Threads", 0) - before["Threads"]
    out = {"finished": ok, "replay": "-", "rss_mb": round(rss, 1), "threads": threads, "opened": len(socks)}
    out["pass"] = ok and rss < 64 and threads < 100
    out["summary"] = (f"{len(socks)} idle connections: coordinator RSS {rss:+.0f} MB, threads {threads:+}; the run "
                      f"{'went on' if ok else 'STALLED'}")
    return out


def low_fd_limit(api: Api, tmp: Path) -> dict:
    """The coordinator runs with 48 file descriptors; an insider keeps opening logged-in connections (and an outsider
    silent ones). Its accept loop must not spin, it must say what happens in its log, the running islands go on, and
    a restarted island gets in."""
    sc = Scenario(api, tmp, steps=10_000, inner_s=0.3,
                  prefix=lambda i: ["prlimit", "--nofile=48:48"] if i is None else [])
    stop = threading.Event()
    login_s = None
    try:
        sc.wait_first_step()
        pid = sc.run.procs["coordinator"].pid
        before = _proc(pid)

        def insider():
            held = []
            while not stop.is_set():
                try:
                    held.append(api.coord(sc.run, "x", source="127.0.0.3"))  # another host than the islands'
                except Exception:  # noqa: BLE001 - refused, or out of descriptors over there
                    time.sleep(0.01)
            for c in held:
                c.close()

        def outsider():
            held = []
            while not stop.is_set():
                try:
                    held.append(socket.create_connection(("127.0.0.1", sc.run.port), timeout=2,
                                                         source_address=("127.0.0.2", 0)))
                except OSError:
                    time.sleep(0.01)
                if len(held) > 200:
                    held.pop(0).close()
            for x in held:
                x.close()

        threads = [threading.Thread(target=f, daemon=True) for f in (insider, outsider)]
        [t.start() for t in threads]
        time.sleep(5.0)
        during = _proc(pid)
        sc.run.procs["c"].kill()  # a restart while the flood goes on
        sc.run.procs["c"].wait(10)
        time.sleep(sc.run.dead_after_s + 0.5)
        t_start = time.time()
        sc.run.start_island("c", 12, sc.steps, inner_s=0.3, tag="-2")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and login_s is None:
            joined = [e for e in sc.run.events("c", "joined") if e["t"] > t_start]
            login_s = round(joined[0]["t"] - t_start, 1) if joined else None
            time.sleep(0.2)
        stop.set()
        [t.join(10) for t in threads]
        sc.more_steps(3)
        ok = True
    except AssertionError:
        ok = False
    finally:
        stop.set()
        sc.stop()
    cpu = (during.get("cpu_ticks", 0) - before.get("cpu_ticks", 0)) / os.sysconf("SC_CLK_TCK") / 5.0
    clog = sc.run.coord_log()
    logged = "accept failed" in clog or "already in progress" in clog
    out = {"finished": ok, "replay": "-", "cpu": round(cpu, 2), "logged": logged, "login_s": login_s}
    out["pass"] = ok and cpu < 0.5 and logged and login_s is not None and login_s < 10
    out["summary"] = (f"coordinator CPU {100 * cpu:.0f}% of a core during the flood; "
                      f"{'the refusals logged' if logged else 'NOTHING logged'}; a restarted island "
                      + (f"logged in after {login_s} s" if login_s is not None else "could NOT log in") +
                      f"; the run {'went on' if ok else 'STALLED'}")
    return out


def exhaust_island(api: Api, tmp: Path) -> dict:
    """Four probe connections to an island, each announcing a frame just under 256 MiB (the peer frame limit) and
    sending 64 MiB of it."""
    sc = Scenario(api, tmp, steps=10_000, inner_s=0.3)
    try:
        sc.wait_first_step()
        port = sc.run.events("b", "joined")[0]["port"]
        pid = sc.run.procs["b"].pid
        before = _proc(pid)
        conns, errs = [], []

        def feed(c):
            try:
                c.sock.sendall(struct.pack(">4sHHQ16sIQ4s", api.wire.MAGIC, api.wire.PROTOCOL_VERSION, 6,
                                           c._send_seq, api.wire.run_tag(RUN_ID), 2, (256 << 20) - 4096,
                                           b"\0" * 4) + b"{}")  # just inside elastic.peer_max_frame_bytes
                for _ in range(64):
                    c.sock.sendall(bytes(1 << 20))
            except Exception as e:  # noqa: BLE001 - refused mid-way: the point
                errs.append(str(e)[:80])

        for _ in range(4):
            try:
                conns.append(api.peer(sc.run, port, "b", "x", {"op": "probe"}))
            except api.refused() as e:
                errs.append(str(e)[:80])
        threads = [threading.Thread(target=feed, args=(c,)) for c in conns]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        time.sleep(0.5)
        during = _proc(pid)
        for c in conns:
            c.close()
        sc.more_steps(2)
        alive = sc.run.procs["b"].poll() is None
    finally:
        sc.stop()
    rss = (during.get("VmRSS", 0) - before["VmRSS"]) / 1024
    out = {"finished": alive, "replay": "-", "rss_mb": round(rss, 1), "errors": errs[:2]}
    out["pass"] = alive and rss < 128
    out["summary"] = f"island RSS {rss:+.0f} MB while the frames arrived; the island {'lives' if alive else 'DIED'}"
    return out


def junk_names(api: Api, tmp: Path) -> dict:
    """254 invented names registered in 0.4 s (the island table's limit is 256), then a real island (re)joins."""
    sc = Scenario(api, tmp, steps=30, inner_s=0.4)
    registered, refused = 0, 0
    try:
        sc.wait_first_step()
        for k in range(254):
            try:
                c = api.coord(sc.run, f"junk{k}")
                c.request({"op": "register", "incarnation": f"j{k}", "status": status(-1, None,
                                                                                       incarnation=f"j{k}")})
                c.close()
                registered += 1
            except api.refused():
                refused += 1
        sc.run.procs["c"].kill()
        sc.run.procs["c"].wait(10)
        time.sleep(sc.run.dead_after_s + 0.5)
        sc.run.start_island("c", 12, sc.steps, inner_s=0.4, tag="-2")
        ok = True
        for n in ("a", "b", "c-2"):
            try:
                ok &= sc.run.procs[n].wait(120) == 0
            except Exception:  # noqa: BLE001
                ok = False
        rejoined = bool(sc.run.events("c", "fetched"))
    finally:
        sc.stop()
    out = {"finished": ok, "replay": "-", "registered": registered, "refused": refused, "rejoined": rejoined}
    out["pass"] = ok and rejoined and registered == 0
    out["summary"] = (f"{registered} junk names registered, {refused} refused; the restarted island "
                      f"{'rejoined' if rejoined else 'could NOT rejoin'}")
    return out


def outsider_trickle(api: Api, tmp: Path, target: str) -> dict:
    """An outsider (no key, from another address) holds 24 connections that trickle a byte of a handshake every
    0.5 s to one island's peer port (or to the coordinator), reopening them as they are cut."""
    sc = Scenario(api, tmp, steps=30, inner_s=0.4)
    stop = threading.Event()
    try:
        sc.wait_first_step()
        port = sc.run.port if target == "coordinator" else sc.run.events("b", "joined")[0]["port"]

        def trickle():
            while not stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                                  source_address=("127.0.0.2", 0)) as s:
                        for byte in api.wire.MAGIC + bytes(44):
                            if stop.is_set():
                                return
                            s.sendall(bytes([byte]))
                            time.sleep(0.5)
                except OSError:
                    time.sleep(0.05)

        threads = [threading.Thread(target=trickle, daemon=True) for _ in range(24)]
        [t.start() for t in threads]
        if target == "coordinator":  # while it lasts, a restarted island must still get in
            time.sleep(2.0)
            sc.run.procs["c"].kill()
            sc.run.procs["c"].wait(10)
            time.sleep(sc.run.dead_after_s + 0.5)
            t_start = time.time()
            sc.run.start_island("c", 12, sc.steps, inner_s=0.4, tag="-2")
            keys = ("a", "b", "c-2")
        else:
            keys = HONEST
        ok = True
        for n in keys:
            try:
                ok &= sc.run.procs[n].wait(120) == 0
            except Exception:  # noqa: BLE001
                ok = False
        stop.set()
        login_s = None
        if target == "coordinator":  # how long the restarted island (a fresh process) took to log in
            joined = [e for e in sc.run.events("c", "joined") if e["t"] > t_start]
            login_s = round(joined[0]["t"] - t_start, 1) if joined else None
        try:
            sc.api.e2e.check_run(sc.run, "abc", sc.steps)
            replay = "equal"
        except AssertionError as e:
            replay = f"DIFFERS ({str(e).splitlines()[0][:100]})"
    finally:
        stop.set()
        sc.stop()
    out = {"finished": ok, "replay": replay, "login_s": login_s}
    out["pass"] = ok and replay == "equal" and (target != "coordinator" or (login_s is not None and login_s < 2))
    out["summary"] = (f"honest islands {'finished' if ok else 'did NOT finish'}" +
                      (f"; the restarted island logged in after {login_s} s" if target == "coordinator" else "") +
                      f"; replay {replay}")
    return out


def nested_json(api: Api, tmp: Path) -> dict:
    """An insider sends a request whose JSON header is nested 100,000 deep."""
    sc = Scenario(api, tmp, steps=6, inner_s=0.3)
    try:
        sc.wait_first_step()
        c = api.coord(sc.run, "x")
        nested = b"[" * 100_000 + b"]" * 100_000
        w = api.wire
        head = w._HEADER.pack(w.MAGIC, w.PROTOCOL_VERSION, int(w.MsgType.REQUEST), c._send_seq, w.run_tag(RUN_ID),
                              len(nested), 0, b"\0" * 4)
        if getattr(c, "_send_aead", None) is not None:
            body = bytes(w._seal(c._send_aead, w._nonce(c._send_seq), nested, head))
        else:
            import hashlib
            import hmac
            body = nested + hmac.new(c._send_key, head + nested, hashlib.sha256).digest()
        c.sock.sendall(head + body)
        time.sleep(1.0)
        out = sc.finish(timeout=90)
    finally:
        sc.stop()
    clog = sc.run.coord_log()
    out["pass"] = out["finished"] and "RecursionError" not in clog.replace("malformed frame: RecursionError", "") \
        and out["tracebacks"] == 0
    out["summary"] = (f"{out['tracebacks']} tracebacks; " +
                      ("refused as a malformed frame" if "malformed frame: RecursionError" in clog else
                       "RecursionError raised in the handler" if "RecursionError" in clog else "no trace"))
    return out


def hello_in_clear(api: Api, tmp: Path) -> dict:
    """What an eavesdropper on an island's link to the coordinator sees of its handshake: is its name there?"""
    sc = Scenario(api, tmp, steps=4, inner_s=0.3)
    captured = []
    real = socket.create_connection

    class Tap:
        def __init__(self, s):
            self.s = s

        def sendall(self, b):
            captured.append(bytes(b))
            return self.s.sendall(b)

        def __getattr__(self, k):
            return getattr(self.s, k)

    try:
        socket.create_connection = lambda *a, **k: Tap(real(*a, **k))
        try:
            c = api.coord(sc.run, "x", kind="hb")
        finally:
            socket.create_connection = real
        c.close()
        out = sc.finish(timeout=60)
    finally:
        sc.stop()
    seen = b'"x"' in b"".join(captured) or b'"name":"x"' in b"".join(captured)
    out["pass"] = not seen
    out["summary"] = "the island's name and purpose cross " + ("IN CLEAR" if seen else "sealed (AES-GCM)")
    return out


ATTACKER = re.compile(r"island x\b|\bx \(|'x'|\bx:|evil\d|junk\d|claiming to be|127\.0\.0\.2|blamed by x|"
                      r"blaming x|127\.0\.0\.3")


def named_in_log(d: Path) -> bool:
    """Whether a warning in the run's logs names the attacker (its identity, invented names or address)."""
    for p in d.glob("*.log"):
        for line in p.read_text(errors="replace").splitlines():
            if ("WARNING" in line or "ERROR" in line) and ATTACKER.search(line):
                return True
    return False


SCENARIOS = {
    "invented-names-outvote": ("takeover", invented_names_outvote),
    "invented-last-epoch": ("takeover", invented_last_epoch),
    "far-step-joiner": ("takeover", far_step_joiner),
    "pending-id-2**62": ("stop", lambda api, tmp: registration_field(api, tmp, "pending")),
    "rtts-1e308": ("stop", lambda api, tmp: member_attack(api, tmp, "huge-rtts")),
    "fail-every-ring": ("stop", lambda api, tmp: member_attack(api, tmp, "fail-rings")),
    "never-vote": ("stop", lambda api, tmp: member_attack(api, tmp, "no-vote")),
    "never-sync": ("stop", lambda api, tmp: member_attack(api, tmp, "no-sync")),
    "trickle-ring-frames": ("stop", lambda api, tmp: member_attack(api, tmp, "trickle")),
    "4096-name-lists": ("exhaust", lambda api, tmp: exhaust_coordinator(api, tmp, "members")),
    "1000-connections-1MiB": ("exhaust", lambda api, tmp: exhaust_coordinator(api, tmp, "conns")),
    "probe-256MiB-frames": ("exhaust", exhaust_island),
    "low-fd-limit": ("exhaust", low_fd_limit),
    "3000-idle-connections": ("held", idle_connections),
    "254-junk-names": ("exhaust", junk_names),
    "outsider-trickle-island": ("outsider", lambda api, tmp: outsider_trickle(api, tmp, "island")),
    "outsider-trickle-coordinator": ("outsider", lambda api, tmp: outsider_trickle(api, tmp, "coordinator")),
    "nested-json": ("outsider", nested_json),
    "hello-in-clear": ("outsider", hello_in_clear),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=str(ROOT), help="the checkout to attack (default: this one)")
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--json", default="", help="write the outcomes here")
    ap.add_argument("--compare", default="", help="a --json file of the same scenarios on another build (before)")
    ap.add_argument("--keep", default="", help="keep the logs under this directory")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    a = ap.parse_args()
    t0 = time.perf_counter()
    api = Api(Path(a.tree).resolve())
    names = [n for n in (a.only.split(",") if a.only else SCENARIOS)]
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="attacks-"))
    results = {}
    for n in names:
        kind, fn = SCENARIOS[n]
        d = root / n
        shutil.rmtree(d, ignore_errors=True)  # islands append to their event logs: never mix two runs
        d.mkdir(parents=True)
        t = time.perf_counter()
        try:
            res = fn(api, d)
        except Exception as e:  # noqa: BLE001 - a scenario that breaks is reported, the others still run
            res = {"pass": False, "summary": f"scenario error: {type(e).__name__}: {str(e)[:200]}",
                   "trace": traceback.format_exc()[-2000:]}
        res["kind"], res["seconds"] = kind, round(time.perf_counter() - t, 1)
        res["named"] = named_in_log(d)
        results[n] = res
        print(f"{n:30s} {'PASS' if res['pass'] else 'FAIL'}  {res['summary']}"
              f"{'' if res['named'] else ' (the attacker is not named in any warning)'}", flush=True)
    if a.json:
        import datetime
        measured = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        Path(a.json).write_text(json.dumps({"label": a.label, "tree": a.tree, "protocol": api.wire.PROTOCOL_VERSION,
                                            "measured": measured, "command": " ".join(sys.argv),
                                            "results": results}, indent=1, default=str))
    if not a.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks.common import provenance, table, write_section

        prior = json.loads(Path(a.compare).read_text()) if a.compare else {}
        before = prior.get("results", {})
        rows = [[n, SCENARIOS[n][0], before.get(n, {}).get("summary", "-"), r["summary"],
                 "yes" if r.get("named") else "no", "held" if r["pass"] else "**FAILED**"]
                for n, r in results.items()]
        body = "\n\n".join([
            "Each attack of issue 34 against a live run: a coordinator and three honest sim islands (separate "
            "processes on 127.0.0.1), plus the attacker; an insider holds one admitted identity, an outsider nothing. "
            "\"held\": the honest islands finished, their hashes equal the replay of the members that reduced each "
            "step (nothing lost, doubled or poisoned), and what the attack aimed at (memory, threads, the table, the "
            "handshake) stayed bounded."
            + (f" Before: the same scenarios against {prior.get('label')} (protocol {prior.get('protocol')}), through "
               f"its own handshake (shared secret; the insider names itself), measured {prior.get('measured', '?')} "
               f"with `{prior.get('command', '?')}` on a `git worktree add /tmp/before {prior.get('label')}`."
               if before else ""),
            table(["attack", "kind", f"before ({prior.get('label')})" if before else "before", "after",
                   "attacker named (after)", "verdict"], rows, align="llllll"),
            provenance(time.perf_counter() - t0)])
        print(body)
        write_section("Security: attacks on the elastic layer", body)
    return 0 if all(r["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
