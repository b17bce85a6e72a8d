"""Chaos soak of the elastic layer: a coordinator and 3-4 island programs on this machine, at least 50 faults injected
at random, then an audit of every outer step.

Islands are tests/sim_island.py (the numpy stand-in for a trainer that drives IslandClient exactly as the JAX
trainer does; deterministic pseudo-gradients, so the whole run can be replayed in one process). Faults, drawn at
random until ``--faults`` were injected:

* ``kill-inner``: SIGKILL an island right after it committed a step (it is in its inner steps);
* ``kill-ring``: an island is (re)started with ``--die-in-ring S:F``: it SIGKILLs itself after F ring frames of
  outer step S (counted when it happens);
* ``kill-transfer``: SIGKILL an island that is fetching the state from a peer, or the peers it may be fetching from;
* ``coordinator``: SIGKILL the coordinator, restart it 0.2-2 s later (it rebuilds its view from the islands);
* ``garbage``: a connection of random bytes, or a HELLO with the wrong key, to the coordinator or an island;
* ``slow``: a connection trickling one byte every 0.5 s for 15 s (slowloris) to the coordinator or an island;
* ``nan``: an island is restarted with ``--poison S:nan`` (a NaN in its pseudo-gradient of step S: the guard must
  leave it out, then it re-syncs);
* ``diverge``: an island is restarted with ``--corrupt-at S`` (its params differ after step S: it loses the hash
  vote and re-syncs).

Every killed island is restarted (same name and seed) 0.5-3 s later and must fetch the state live from a peer.
At the end the islands are stopped and every event is audited against an in-process replay of the run (the ring's
reference arithmetic with each step's logged members and order): divergent hashes (two islands committing different
params for one step, or any differing from the replay), lost steps (a step in 0..last that no island committed, or
an incarnation skipping a step without fetching the state) and doubled steps (an incarnation committing one step
twice) are counted; each island's worst stall (longest gap between two committed steps of one incarnation) is
printed.

    python benchmarks/chaos.py --islands 4 --faults 50       # ~5-8 min on 2 cores; writes RESULTS.md "Chaos soak"
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import provenance, table, write_section  # noqa: E402
from intellect_jax.elastic import wire  # noqa: E402
from tests.test_elastic_e2e import Run, replay  # noqa: E402

KINDS = {"kill-inner": 4, "kill-ring": 2, "kill-transfer": 2, "coordinator": 2, "garbage": 3, "slow": 1, "nan": 1,
         "diverge": 1}


class Chaos:
    def __init__(self, a: argparse.Namespace, tmp: Path):
        self.a = a
        self.rng = random.Random(a.seed)
        self.run = Run(tmp, dead_after_s=a.dead_after_s, dim=a.dim, dump=False)
        self.names = [chr(ord("a") + i) for i in range(a.islands)]
        self.incarnations = collections.Counter()
        self.down: dict[str, float] = {}  # killed island -> when to restart it
        self.faults: list[tuple[float, str, str]] = []  # (t, kind, detail)
        self.t0 = time.monotonic()
        self.armed: list[tuple[str, int, str, str]] = []  # (island, pid, kind, argument) set to fire by itself
        self.crashes: list[str] = []  # islands that exited without being killed: must stay empty

    # -- islands ---------------------------------------------------------------------------------------------------

    def key(self, n: str) -> str:
        return n + (f"-{self.incarnations[n]}" if self.incarnations[n] else "")

    def start(self, n: str, *extra: str) -> None:
        self.run.start_island(n, 100 + ord(n), 10**6, "--serve-bytes-per-s", str(self.a.serve_bytes_per_s), *extra,
                              inner_s=self.a.inner_s, tag=f"-{self.incarnations[n]}" if self.incarnations[n] else "")

    def alive(self, n: str) -> bool:
        p = self.run.procs.get(self.key(n))
        return p is not None and p.poll() is None

    def kill(self, n: str) -> None:
        p = self.run.procs[self.key(n)]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        self.down[n] = time.monotonic() + self.rng.uniform(0.5, 3.0)

    def run_step(self) -> int:
        steps = [e["step"] for n in self.names for e in self.run.events(n, "step") if e["ok"]]
        return max(steps) + 1 if steps else 0

    def fault(self, kind: str, detail: str) -> None:
        self.faults.append((time.monotonic() - self.t0, kind, detail))
        print(f"[{time.monotonic() - self.t0:7.1f} s] fault {len(self.faults):3d}: {kind:13s} {detail}", flush=True)

    def restart_due(self) -> None:
        armed = {pid for _, pid, k, _ in self.armed if k == "kill-ring"}
        for n in self.names:  # an exit nobody caused (an error in the island) is a failure of the soak
            p = self.run.procs.get(self.key(n))
            if p is not None and p.poll() is not None and n not in self.down and p.pid not in armed:
                self.crashes.append(f"{self.key(n)} exited with {p.returncode}")
                print(f"CRASH: {self.crashes[-1]}", flush=True)
                self.down[n] = time.monotonic()
        for n, when in list(self.down.items()):
            if time.monotonic() < when:
                continue
            del self.down[n]
            self.incarnations[n] += 1
            extra: list[str] = []
            s = self.run_step() + self.rng.randint(2, 4)
            pending = self.rng.random()
            if pending < 0.25 and len(self.holders()) >= 3:  # it dies in a ring later: 2 holders must stay
                extra = ["--die-in-ring", f"{s}:{self.rng.randint(1, 6)}"]
            elif pending < 0.45 and len(self.alive_names()) == len(self.names) - 1:
                extra = ["--poison", f"{s}:nan"]
            elif pending < 0.60:
                extra = ["--corrupt-at", str(s)]
            self.start(n, *extra)
            for kind, flag in (("kill-ring", "--die-in-ring"), ("nan", "--poison"), ("diverge", "--corrupt-at")):
                if flag in extra:
                    self.armed.append((n, self.run.procs[self.key(n)].pid, kind, extra[1]))

    def alive_names(self) -> list[str]:
        return [n for n in self.names if self.alive(n)]

    def holders(self) -> list[str]:
        """Live islands that hold the run's state (committed a step or fetched it in this incarnation) and are
        not armed to kill themselves. Sim islands keep no checkpoint: the soak never kills below 2 holders, since
        losing every holder is losing the run (a real island would restart from its checkpoint)."""
        armed = {pid for _, pid, k, _ in self.armed if k == "kill-ring"}
        out = []
        for n in self.alive_names():
            pid = self.run.procs[self.key(n)].pid
            if pid not in armed and any(e["pid"] == pid and e["event"] in ("step", "fetched")
                                        for e in self.run.events(n)):
                out.append(n)
        return out

    def may_kill(self, *names: str) -> bool:
        return len([n for n in self.holders() if n not in names]) >= 2

    def harvest_armed(self) -> None:
        """Counts the armed faults that fired (a suicide, a poisoned or a corrupted step)."""
        for item in list(self.armed):
            n, pid, kind, arg = item
            ev = {"kill-ring": "suicide", "nan": "poisoned", "diverge": "step"}[kind]
            hits = [e for e in self.run.events(n, ev) if e["pid"] == pid]
            if kind == "diverge":
                hits = [e for e in hits if e["step"] == int(arg) and not e["ok"]]
            if hits:
                self.armed.remove(item)
                self.fault(kind, f"island {n} ({arg})")
                if kind == "kill-ring":
                    self.down[n] = time.monotonic() + self.rng.uniform(0.5, 3.0)
            elif self.run.procs[self.key(n)].poll() is not None or self.run_step() > int(arg.split(":")[0]) + 3:
                self.armed.remove(item)  # died otherwise, or missed its step (was not a member): not counted

    # -- connections -----------------------------------------------------------------------------------------------

    def target(self) -> int:
        ports = [self.run.port] + [self.run.events(n, "joined")[-1]["port"] for n in self.alive_names()
                                   if self.run.events(n, "joined")]
        return self.rng.choice(ports)

    def garbage(self) -> None:
        port = self.target()
        if self.rng.random() < 0.5:
            data = os.urandom(self.rng.randint(1, 5000))
        else:  # a HELLO under a wrong key
            data = wire.MAGIC + bytes([0, wire.PROTOCOL_VERSION]) + os.urandom(self.rng.randint(40, 300))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(data)
        except OSError:
            pass
        self.fault("garbage", f"{len(data)} bytes to port {port}")

    def slow(self) -> None:
        port = self.target()

        def trickle():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    for b in wire.MAGIC + bytes(44):
                        s.sendall(bytes([b]))
                        time.sleep(0.5)
                        if time.monotonic() - start > 15:
                            return
            except OSError:
                pass

        start = time.monotonic()
        threading.Thread(target=trickle, daemon=True).start()
        self.fault("slow", f"a byte every 0.5 s to port {port}")

    # -- the soak --------------------------------------------------------------------------------------------------

    def inject(self) -> None:
        kinds = [k for k in KINDS if k not in ("kill-ring", "nan", "diverge")]  # those are armed at restarts
        kind = self.rng.choices(kinds, [KINDS[k] for k in kinds])[0]
        live = self.alive_names()
        if kind == "kill-inner" and len(live) >= 3:
            n = self.rng.choice(live)
            if not self.may_kill(n):
                return
            last = self.run.events(n, "step")
            if last and last[-1]["pid"] == self.run.procs[self.key(n)].pid:
                base = len(last)
                deadline = time.monotonic() + 10
                while len(self.run.events(n, "step")) == base and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(self.rng.uniform(0.0, 0.6 * self.a.inner_s))
                if self.alive(n):
                    self.kill(n)
                    self.fault("kill-inner", f"island {n} after step {self.run.events(n, 'step')[-1]['step']}")
        elif kind == "kill-transfer" and len(live) >= 3 and not self.down:
            # Restart an island at once, and kill it or a peer (it fetches from one) while the state flows.
            n = self.rng.choice(live)
            if not self.may_kill(n):
                return
            self.kill(n)
            self.fault("kill-inner", f"island {n} (to watch its state transfer)")
            self.down[n] = 0.0
            self.restart_due()
            pid = self.run.procs[self.key(n)].pid
            mine = lambda ev: [e for e in self.run.events(n, ev) if e["pid"] == pid]  # noqa: E731
            deadline = time.monotonic() + 20
            while not mine("joined") and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(self.rng.uniform(0.05, 0.3))
            if mine("joined") and mine("joined")[0]["needs_state"] and not mine("fetched") and self.alive(n):
                others = [m for m in self.alive_names() if m != n and self.may_kill(m)]
                victim = n if self.rng.random() < 0.5 or not others else self.rng.choice(others)
                self.kill(victim)
                self.fault("kill-transfer", f"{'the joiner' if victim == n else 'peer'} {victim} while {n} "
                                            "fetched the state")
        elif kind == "coordinator":
            p = self.run.procs["coordinator"]
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.run.start_coordinator(min_islands=len(self.names))  # restarted as it was started
            self.fault("coordinator", "SIGKILL, restarted")
        elif kind == "garbage":
            self.garbage()
        elif kind == "slow":
            self.slow()

    def soak(self) -> dict:
        a = self.a
        self.run.start_coordinator(min_islands=len(self.names))
        for n in self.names:
            self.start(n)
        self.run.wait_for(lambda: self.run_step() >= 2, 120, "the first outer steps")
        deadline = self.t0 + a.minutes * 60
        while len(self.faults) < a.faults and time.monotonic() < deadline:
            self.restart_due()
            self.harvest_armed()
            # A fetching island appears only after a restart: give kill-transfer a chance right then.
            self.inject()
            time.sleep(self.rng.uniform(0.5, a.gap_s))
        # Quiet tail: no new faults (armed ones may still fire); restart the dead until everyone is alive and a few
        # more steps were committed, then stop.
        tail, deadline = self.run_step() + 4, time.monotonic() + 180
        while not (all(self.alive(n) for n in self.names) and self.run_step() >= tail and not self.down):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the run did not settle in 180 s; logs in {self.run.tmp}")
            self.harvest_armed()
            for n in self.names:
                if not self.alive(n) and n not in self.down:
                    self.down[n] = time.monotonic()
            self.restart_due()
            time.sleep(0.2)
        for n in self.names:
            self.run.procs[self.key(n)].terminate()
        for n in self.names:
            self.run.procs[self.key(n)].wait(30)
        self.run.stop()
        return audit(self.run, self.names)


def audit(run: Run, names: list[str]) -> dict:
    """Counts divergent hashes, lost and doubled steps over every incarnation's events; worst stall per island."""
    by_step: dict[int, dict] = {}
    divergent = doubled = skipped = 0
    stalls = {}
    for n in names:
        evs = run.events(n)
        worst = (0.0, None)
        for pid in dict.fromkeys(e["pid"] for e in evs):
            mine = [e for e in evs if e["pid"] == pid]
            seen: set[int] = set()
            expected, last_t = None if pid != evs[0]["pid"] else 0, None
            for e in mine:
                if e["event"] == "fetched":
                    expected = e["step"]
                elif e["event"] == "step":
                    if e["step"] in seen:
                        doubled += 1
                        continue
                    seen.add(e["step"])
                    skipped += expected is not None and e["step"] != expected
                    expected = e["step"] + 1 if e["ok"] else None
                    if last_t is not None and e["t"] - last_t > worst[0]:
                        worst = (e["t"] - last_t, e["step"])
                    last_t = e["t"]
                    if e["ok"]:
                        prev = by_step.setdefault(e["step"], e)
                        divergent += prev["hash"] != e["hash"] or prev["order"] != e["order"]
        stalls[n] = worst
    last = max(by_step) if by_step else -1
    lost = sum(s not in by_step for s in range(last + 1)) + skipped
    want = replay(run, {s: by_step[s]["order"] for s in range(last + 1) if s in by_step}) if not lost else []
    divergent += sum(by_step[s]["hash"] != h for s, h in enumerate(want))
    return {"steps": last + 1, "divergent": divergent, "lost": lost, "doubled": doubled, "stalls": stalls,
            "aborts": sum(e.get("aborts") or 0 for e in by_step.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--islands", type=int, default=4)
    ap.add_argument("--faults", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=15.0, help="stop injecting after this long even if short")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=250_000, help="pseudo-gradient elements (state = 2 x 4 x dim bytes)")
    ap.add_argument("--inner-s", type=float, default=1.0, help="seconds of inner steps per outer step (longer than a "
                    "state transfer, as in real runs, or a restarted island never catches up)")
    ap.add_argument("--gap-s", type=float, default=4.0, help="longest pause between two injections")
    ap.add_argument("--dead-after-s", type=float, default=3.0)
    ap.add_argument("--serve-bytes-per-s", type=float, default=4e6, help="state transfers last ~0.5 s, so kills land "
                    "in them")
    ap.add_argument("--keep", default="", help="keep the logs in this directory (default: a temporary one)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    a = ap.parse_args()
    t0 = time.perf_counter()
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="chaos-"))
    tmp.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(a, tmp)
    try:
        res = chaos.soak()
    finally:
        chaos.run.stop()
    kinds = collections.Counter(k for _, k, _ in chaos.faults)
    rows = [[k, kinds.get(k, 0)] for k in KINDS] + [["**all**", len(chaos.faults)]]
    stall_rows = [[n, chaos.incarnations[n] + 1, f"{res['stalls'][n][0]:.1f}", res["stalls"][n][1]]
                  for n in chaos.names]
    body = "\n\n".join([
        f"{a.islands} sim islands (tests/sim_island.py, {a.dim} fp32 elements, int8 ring, {a.inner_s} s of inner "
        f"steps), dead_after_s {a.dead_after_s} s, state served at {a.serve_bytes_per_s / 1e6:g} MB/s; faults drawn "
        f"at random (seed {a.seed}).",
        table(["fault", "injected"], rows),
        f"Outcome over {res['steps']} outer steps: **{res['divergent']} divergent hashes, {res['lost']} lost and "
        f"{res['doubled']} doubled outer steps, {len(chaos.crashes)} island crashes** (audited against an "
        "in-process replay of every step's members and "
        f"ring order); {res['aborts']} aborted reduces were redone.",
        table(["island", "incarnations", "worst stall (s)", "at step"], stall_rows),
        "Worst stall: the longest gap between two outer steps committed by one incarnation (a coordinator restart "
        f"costs its recovery grace, dead_after_s; a death mid-ring costs one redo). Logs: {tmp}.",
        provenance(time.perf_counter() - t0)])
    print(body)
    if not a.no_write:
        write_section("Chaos soak (elastic layer)", body)
    ok = (res["divergent"] == 0 and res["lost"] == 0 and res["doubled"] == 0 and not chaos.crashes
          and len(chaos.faults) >= a.faults)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
