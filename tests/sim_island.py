"""A numpy stand-in for a trainer island: drives IslandClient exactly as the JAX trainer will.

State: global params ``p`` and Nesterov momentum ``m`` (float32 vectors). Each outer step the "inner steps" are a
sleep plus a deterministic pseudo-gradient ``g = f(island seed, outer step, p)``; the outer update is SGD with
Nesterov momentum (lr 0.7, momentum 0.9, as in DiLoCo) applied to the all-reduced mean. One JSON line per event
goes to ``--out``; with ``--dump-dir`` each step's pseudo-gradient and reduced mean are saved for checking.

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
from intellect_jax.elastic.client import IslandClient, StaleStep  # noqa: E402
from intellect_jax.elastic.recovery import params_hash  # noqa: E402

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

    lock = threading.Lock()
    st = {"p": init_params(a.dim), "m": np.zeros(a.dim, np.float32), "step": 0}

    def snapshot():
        with lock:
            arrays = {"params": st["p"], "momentum": st["m"]}
            return arrays, {"outer_step": st["step"], "params_hash": params_hash(arrays)}

    def install(state):
        with lock:
            st["p"], st["m"] = state.arrays["params"].copy(), state.arrays["momentum"].copy()
            st["step"] = int(state.meta["outer_step"])
        emit(event="fetched", step=st["step"], hash=state.meta["params_hash"], report=client.last_stats.get("fetch"))

    client = IslandClient(cfg, a.run_id, snapshot, compression=a.compression, block_size=BLOCK_SIZE)
    if a.die_in_ring:
        die_step, die_frames = (int(v) for v in a.die_in_ring.split(":"))

        def maybe_die(frames: int) -> None:
            if client.pending and client.pending["step"] == die_step and frames >= die_frames:
                emit(event="suicide", step=die_step, frames=frames)
                os.kill(os.getpid(), signal.SIGKILL)

        client.on_ring_frame = maybe_die
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    arrays, meta = snapshot()
    info = client.join(meta["outer_step"], meta["params_hash"])
    emit(event="joined", run_step=info.run_step, needs_state=info.needs_state, port=client.port)
    if info.needs_state:
        install(client.fetch_state())
    voted = None  # --vote-later: (the vote's thread, its step event)

    def settle_vote() -> bool:
        """The verdict of the vote running in the background; False: ours differed and we re-synced."""
        nonlocal voted
        if voted is None:
            return True
        (t, ev), voted = voted, None
        t.join()
        emit(**ev)
        if not ev["ok"]:
            install(client.fetch_state())
        return ev["ok"]

    try:
        while st["step"] < a.steps:
            s = st["step"]
            time.sleep(a.inner_s)
            if not settle_vote():
                continue
            g = pseudo_grad(a.seed, s, st["p"])
            if a.poison and s == int(a.poison.split(":")[0]):
                kind = a.poison.split(":")[1]
                g = g.copy()
                if kind == "nan":
                    g[g.size // 2] = np.nan
                else:
                    g *= np.float32(float(kind.lstrip("x")))
                emit(event="poisoned", step=s, kind=kind)
            try:
                delta = client.all_reduce_mean(s, g)
            except StaleStep as e:
                emit(event="stale", step=s, why=str(e))
                install(client.fetch_state())
                continue
            if a.dump_dir:
                np.save(Path(a.dump_dir) / f"{a.name}_g{s}.npy", g)
                np.save(Path(a.dump_dir) / f"{a.name}_d{s}.npy", delta)
            p, m = outer_update(st["p"], st["m"], delta)
            if s == a.corrupt_at:
                p = p.copy()
                p[0] += np.float32(1e-3)
            with lock:
                st["p"], st["m"], st["step"] = p, m, s + 1
            h = snapshot()[1]["params_hash"]
            stats = client.last_stats
            ev = dict(event="step", step=s, hash=h, ok=None, epoch=stats.get("epoch"), members=stats.get("members"),
                      order=stats.get("order"), aborts=stats.get("aborts"), seconds=stats.get("seconds"),
                      delta_hash=params_hash({"d": delta}))
            if a.vote_later:
                t = threading.Thread(target=lambda ev=ev, s=s, h=h: ev.update(ok=client.commit(s, h)))
                t.start()
                emit(event="vote_started", step=s)
                voted = (t, ev)
                continue
            ev["ok"] = client.commit(s, h)
            emit(**ev)
            if not ev["ok"]:
                install(client.fetch_state())
        settle_vote()
    finally:
        client.close()
    emit(event="finished", step=st["step"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
