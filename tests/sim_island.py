"""A numpy stand-in for a trainer island, driven by the island protocol that ships (island.ElasticIsland, the same
join, reduce, hash vote and re-sync code as the JAX trainer's ElasticSync): only the state is a stand-in.

State (an island.LocalState): global params ``p`` and Nesterov momentum ``m`` (float32 vectors). Each outer step the
"inner steps" are a sleep plus a deterministic pseudo-gradient ``g = f(island seed, outer step, p)``; the outer update
is SGD with Nesterov momentum (lr 0.7, momentum 0.9, as in DiLoCo) applied to the all-reduced mean. One JSON line per
event goes to ``--out``; with ``--dump-dir`` each step's pseudo-gradient and reduced mean are saved for checking.
``--vote-later`` takes the streaming path of the trainer (ElasticSync._launch / _land): the reduce in a background
thread that first takes the previous vote's verdict, the vote in the background.

A test helper, run as a script by tests/test_elastic_e2e.py and the WAN demo (launch/wan_emulation.py)::

    python tests/sim_island.py --coordinator 127.0.0.1:PORT --key-file a.key --islands-file islands --name a ...

(or ``--secret-file F`` instead of the key and islands files, in shared-secret mode).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from intellect_jax.config import ElasticConfig  # noqa: E402
from intellect_jax.elastic.client import StaleStep  # noqa: E402
from intellect_jax.elastic.recovery import params_hash  # noqa: E402
from intellect_jax.island import ElasticIsland  # noqa: E402

LR, MU = 0.7, 0.9
BLOCK_SIZE = 256  # int8 quantisation block of the ring payload (the e2e replay uses the same)


def init_params(dim: int) -> np.ndarray:
    return np.random.default_rng(1234).standard_normal(dim).astype(np.float32)


def pseudo_grad(seed: int, step: int, p: np.ndarray) -> np.ndarray:
    noise = np.random.default_rng([seed, step]).standard_normal(p.size).astype(np.float32)
    return (np.float32(0.05) * p + np.float32(0.01) * noise).astype(np.float32)


def outer_update(p: np.ndarray, m: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = (np.float32(MU) * m + delta).astype(np.float32)
    p = (p - np.float32(LR) * (delta + np.float32(MU) * m)).astype(np.float32)
    return p, m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--key-file", default="", help="this island's key (with --islands-file)")
    ap.add_argument("--islands-file", default="")
    ap.add_argument("--secret-file", default="", help="shared-secret mode instead of keys")
    ap.add_argument("--run-id", default="run")
    ap.add_argument("--name", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=5, help="run until this many outer steps are completed")
    ap.add_argument("--inner-s", type=float, default=0.2, help="seconds of simulated inner steps per outer step")
    ap.add_argument("--compression", default="int8", choices=("int8", "none"))
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--chunk-bytes", type=int, default=256 << 10)
    ap.add_argument("--heartbeat-s", type=float, default=0.5)
    ap.add_argument("--dead-after-s", type=float, default=3.0)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--serve-bytes-per-s", type=float, default=0.0)
    ap.add_argument("--out", required=True, help="JSON lines log")
    ap.add_argument("--dump-dir", default="")
    ap.add_argument("--die-in-ring", default="", help="STEP:FRAMES: SIGKILL ourselves after sending FRAMES ring "
                    "frames of outer step STEP (fault injection for tests)")
    ap.add_argument("--corrupt-at", type=int, default=-1, help="perturb our params after this outer step's "
                    "update (fault injection: the commit vote must catch it and we must re-sync)")
    ap.add_argument("--vote-later", action="store_true", help="vote in a background thread and take the verdict "
                    "before the next pseudo-gradient leaves (what streaming islands do)")
    ap.add_argument("--poison", default="", help="STEP:KIND: send a poisoned pseudo-gradient at outer step STEP, "
                    "KIND nan (one NaN) or xF (F times the real one); fault injection for the guard")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s [{a.name}] %(name)s %(levelname)s %(message)s")
    cfg = ElasticConfig(coordinator=a.coordinator, secret_file=a.secret_file, key_file=a.key_file,
                        islands_file=a.islands_file, island_name=a.name, listen=a.listen,
                        heartbeat_s=a.heartbeat_s, dead_after_s=a.dead_after_s, streams=a.streams,
                        chunk_bytes=a.chunk_bytes, coordinator_timeout_s=60.0, barrier_timeout_s=120.0,
                        serve_bytes_per_s=a.serve_bytes_per_s)
    cfg.validate()
    out = open(a.out, "a", buffering=1)

    def emit(**kw):
        out.write(json.dumps(dict(kw, name=a.name, pid=os.getpid(), t=time.time())) + "\n")

    local = NumpyState(a, emit)
    island = ElasticIsland(local, cfg, a.run_id, a.compression, BLOCK_SIZE)
    local.client = client = island.client
    if a.die_in_ring:
        die_step, die_frames = (int(v) for v in a.die_in_ring.split(":"))

        def maybe_die(frames: int) -> None:
            if client.pending and client.pending["step"] == die_step and frames >= die_frames:
                emit(event="suicide", step=die_step, frames=frames)
                os.kill(os.getpid(), signal.SIGKILL)

        client.on_ring_frame = maybe_die
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        info = island.join()
        emit(event="joined", run_step=info.run_step, needs_state=info.needs_state, port=client.port)
        local.flush()
        (vote_later if a.vote_later else blocking)(island, local, a.steps, a.inner_s, emit)
    finally:
        island.close()
    emit(event="finished", step=local.step)
    return 0


class NumpyState:
    """The island.LocalState of the stand-in: p, m and the outer step, replaced (never mutated) under a lock; fault
    injection and the dumps happen here. Events of an install wait in `queued` so that a step's own event is
    written before the fetch that replaced its state."""

    device_codes, resumed_epoch = False, None

    def __init__(self, a: argparse.Namespace, emit):
        self.a, self.emit, self.client = a, emit, None
        self.lock = threading.Lock()
        self.p, self.m, self.step = init_params(a.dim), np.zeros(a.dim, np.float32), 0
        self.queued: list[dict] = []
        self.last: dict = {}  # the last applied step's facts, for its event

    def position(self) -> tuple[int, int]:
        return self.step, 0

    def arrays(self) -> dict[str, np.ndarray]:
        with self.lock:
            return {"params": self.p, "momentum": self.m}

    def snapshot_later(self, fragment=None):
        arrays = self.arrays()
        return lambda: dict(arrays)

    def install_snapshot(self, arrays, outer_step, step) -> None:
        with self.lock:
            self.p, self.m = arrays["params"].copy(), arrays["momentum"].copy()
            self.step = int(outer_step)
        self.queued.append(dict(event="fetched", step=self.step, hash=params_hash(self.arrays()),
                                report=self.client.last_stats.get("fetch") if self.client else None))

    def flush(self) -> None:
        for ev in self.queued:
            self.emit(**ev)
        self.queued = []

    def pseudo_gradient_payload(self):
        a, s = self.a, self.step
        g = pseudo_grad(a.seed, s, self.p)
        if a.poison and s == int(a.poison.split(":")[0]):
            kind = a.poison.split(":")[1]
            g = g.copy()
            if kind == "nan":
                g[g.size // 2] = np.nan
            else:
                g *= np.float32(float(kind.lstrip("x")))
            self.emit(event="poisoned", step=s, kind=kind)
        if a.dump_dir:
            np.save(Path(a.dump_dir) / f"{a.name}_g{s}.npy", g)
        return g, None, None

    def apply_mean(self, delta, residual) -> dict:
        s = self.step
        if self.a.dump_dir:
            np.save(Path(self.a.dump_dir) / f"{self.a.name}_d{s}.npy", delta)
        p, m = outer_update(self.p, self.m, delta)
        if s == self.a.corrupt_at:
            p = p.copy()
            p[0] += np.float32(1e-3)
        with self.lock:
            self.p, self.m, self.step = p, m, s + 1
        stats = self.client.last_stats
        self.last = dict(event="step", step=s, epoch=stats.get("epoch"), members=stats.get("members"),
                         order=stats.get("order"), aborts=stats.get("aborts"), seconds=stats.get("seconds"),
                         delta_hash=params_hash({"d": delta}))
        return {}


def blocking(island: ElasticIsland, local: NumpyState, steps: int, inner_s: float, emit) -> None:
    """The plain outer step: reduce, apply, vote, all in the training thread (ElasticIsland.sync)."""
    while local.step < steps:
        s = local.step
        time.sleep(inner_s)
        local.last = {}
        metrics, h = island.sync()
        if metrics.get("resynced"):
            emit(event="stale", step=s, why="outer step completed without this island")
        else:
            voted = params_hash(local.arrays()) if not local.queued else None  # before a re-sync replaced it
            emit(**local.last, hash=voted or h, ok=not local.queued)
        local.flush()


def vote_later(island: ElasticIsland, local: NumpyState, steps: int, inner_s: float, emit) -> None:
    """The streaming path (ElasticSync._launch / _land with one fragment, no overlap): the reduce runs in a thread
    that first takes the previous vote's verdict; the vote runs in the background while the next inner steps go on."""
    held = None  # the last step's event, until its vote's verdict

    def judged(verdict) -> bool:
        nonlocal held
        lost, h = island.settle_pending(verdict)
        if held is not None:
            emit(**held, hash=h, ok=not lost)
            held = None
        local.flush()
        return not lost

    while local.step < steps:
        s = local.step
        time.sleep(inner_s)
        reduce = island.start_reduce(s, lambda: local.pseudo_gradient_payload()[:2])
        if not judged(reduce.verdict()):
            continue  # this island lost the last vote: its reduce sent nothing; it now holds a peer's state
        try:
            delta = reduce.result()
        except StaleStep as e:
            emit(event="stale", step=s, why=str(e))
            island.resync(str(e))
            local.flush()
            continue
        island.settle(s, local.apply_mean(delta, None), wait=False)
        held = local.last
        emit(event="vote_started", step=s)
    judged(None)


if __name__ == "__main__":
    raise SystemExit(main())
