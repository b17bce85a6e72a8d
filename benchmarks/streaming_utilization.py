"""Compute utilization of elastic islands, blocking sync against streaming fragments with overlap, measured end to end.

    python benchmarks/streaming_utilization.py               # as root: 3 islands on tbf links (~15 min)
    python benchmarks/streaming_utilization.py --quick       # loopback, short: a smoke test (RESULTS.md untouched)
    python benchmarks/streaming_utilization.py --out DIR ... > LOG   # then, to summarise the same runs again:
    python benchmarks/streaming_utilization.py --out DIR --resummarise LOG ...

Three ``intellect-jax train`` islands, each a separate process in its own network namespace with a tbf-limited
access link (``--rate`` up and down, launch/wan_emulation.py), the coordinator on the bridge. Every arm trains the same
model for the same inner steps on the same synthetic data:

* ``compute only``: the same three processes with no sync at all (no coordinator), run at the same time on the same
  cores: the time the steps take by themselves (run first and last; their spread is the noise);
* ``blocking``: DiLoCo, the whole pseudo-gradient reduced every H steps while the islands wait;
* ``streaming P=4 tau=..``: the model in 4 fragments, one synced every H/4 steps, its reduce running in the
  background for tau inner steps before its mean is applied (merge alpha ``--alpha``).

Utilization (end to end) = seconds per inner step of the compute-only arm / seconds per inner step of the arm, each
the mean over the three islands of the time between two inner steps' rows, over the steps from the first applied
outer step to the last (compile, start-up and the first sync's wait for every island to arrive are outside the
window; the compute-only arm: from step H to the end). The inner rows, not the outer ones, time the window: a
streaming island writes an outer row once its hash vote's verdict is in, up to a fragment period later. "1 - wait /
wall" is what the islands' own rows say (wait_seconds summed over the window). Peak bytes in flight: the most one
sync put on the wire per island (the ring's measured bytes_sent), as only one fragment is in flight at a time.
Hashes: every outer step's params_hash must be the same on the three islands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from intellect_jax.metrics import read_metrics  # noqa: E402

N = 3
WAITS = ("verdict", "launch", "reduce", "apply", "vote")  # where a streaming island waited (wait_<k>_seconds)
PHASES = ("barrier", "connect", "ring", "done")  # a reduce's parts (outer rows' reduce_<phase>_seconds)


def model_args(a) -> list[str]:
    return ["--config", "configs/debug.toml", "--data.kind=synthetic", f"--data.seq_len={a.seq_len}",
            f"--data.batch_size={a.batch}", f"--model.hidden_size={a.hidden}",
            f"--model.intermediate_size={3 * a.hidden}", "--model.num_hidden_layers=4", "--mesh.islands=1",
            "--mesh.fsdp=1", "--run.host_devices=1", "--run.eval_every=0", f"--run.steps={a.steps}",
            "--run.log_every=1000", "--checkpoint.every_outer_steps=100000", f"--diloco.inner_steps={a.H}",
            f"--optim.total_steps={a.steps}", f"--optim.decay_start={a.steps}", "--optim.warmup_steps=10"]


def arms(a) -> list[tuple[str, list[str]]]:
    out = [("compute only", None), ("blocking", [])]
    for tau in a.taus:
        out.append((f"streaming P={a.fragments} tau={tau}", [f"--diloco.fragments={a.fragments}",
                                                             f"--diloco.overlap_steps={tau}",
                                                             f"--diloco.merge_alpha={a.alpha}"]))
    return out + [("compute only (again)", None)]


def arm_dir(name: str) -> str:
    return name.replace(" ", "_").replace("=", "")


def run_arm(a, name: str, extra: list[str] | None, topo, work: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    cli = [sys.executable, "-m", "intellect_jax"]
    d = work / arm_dir(name)
    d.mkdir(parents=True)
    wrap = (lambda i, argv: topo.exec_cmd(i, argv)) if topo else (lambda i, argv: argv)
    coord = relay = None
    elastic: list[str] = []
    if extra is not None:
        secret = d / "secret"
        subprocess.run([*cli, "secret", "--out", str(secret)], check=True, env=env, stdout=subprocess.DEVNULL)
        host = topo.switch_ip if topo else "127.0.0.1"
        port_file = d / "port"
        coord = subprocess.Popen(wrap(None, [*cli, "coordinator", "--bind", f"{host}:0", "--secret-file",
                                             str(secret), "--run-id", "u", "--min-islands", str(N),
                                             "--port-file", str(port_file)]),
                                 env=env, stdout=subprocess.DEVNULL, stderr=open(d / "coordinator.log", "w"),
                                 cwd=common.ROOT)
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or coord.poll() is not None:
                coord.kill()
                raise RuntimeError(f"the coordinator did not start: {(d / 'coordinator.log').read_text()[-2000:]}")
            time.sleep(0.1)
        coord_port = int(port_file.read_text().strip())
        if a.coord_delay_ms > 0:  # the coordinator a WAN away: every control round trip costs 2 x the delay
            relay = subprocess.Popen(wrap(None, [sys.executable, str(common.ROOT / "launch" / "delay_relay.py"),
                                                 "--listen", f"{host}:{coord_port + 1}", "--to", f"{host}:{coord_port}",
                                                 "--delay-ms", str(a.coord_delay_ms)]),
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            line = relay.stdout.readline()
            if not line.startswith("relay"):
                coord.kill()
                relay.kill()
                raise RuntimeError(f"the coordinator's delay relay did not start: {line}{relay.stdout.read()}")
            coord_port += 1
        elastic = [f"--elastic.coordinator={host}:{coord_port}",
                   f"--elastic.secret_file={secret}", "--elastic.run_id=u", f"--elastic.data_shards={N}",
                   f"--elastic.streams={a.streams}", *extra]
    t0 = time.perf_counter()
    procs = []
    for i in range(N):
        argv = [*cli, "train", *model_args(a), f"--run.dir={d / f'island{i}'}", f"--run.seed={i}"]
        if extra is not None:
            argv += [*elastic, f"--elastic.island_name=island{i}", f"--elastic.data_shard={i}"]
            if topo and a.coord_delay_ms > 0:  # the coordinator sees the relay's address, not the island's
                argv.append(f"--elastic.advertise_host={topo.ips[i]}")
        procs.append(subprocess.Popen(wrap(i, argv), env=env, cwd=common.ROOT, stdout=subprocess.DEVNULL,
                                      stderr=open(d / f"island{i}.log", "w")))
    try:
        for i, p in enumerate(procs):
            if p.wait(timeout=a.timeout) != 0:
                raise RuntimeError(f"{name}: island {i} failed: {(d / f'island{i}.log').read_text()[-3000:]}")
    finally:
        for p in procs + [q for q in (coord, relay) if q]:
            if p.poll() is None:
                p.kill()
                p.wait()
    return summarise(name, d, a, time.perf_counter() - t0)


def summarise(name: str, d: Path, a, seconds: float) -> dict:
    rows = [read_metrics(d / f"island{i}" / "metrics.jsonl") for i in range(N)]
    inner = [{r["step"]: r for r in rs if r["kind"] == "inner"} for rs in rows]
    outer = [[r for r in rs if r["kind"] == "outer"] for rs in rows]
    out = {"arm": name, "seconds": seconds}
    if not outer[0]:  # compute only: from step H to the last step
        lo, hi = a.H, a.steps
        per = [(inn[hi]["time"] - inn[lo]["time"]) / (hi - lo) for inn in inner]
        return out | {"s_per_step": sum(per) / N, "s_per_step_islands": per, "window": [lo, hi],
                      "cpu_per_step": cpu_per_step(inner, lo, hi)}
    # each island's window: its first to its last applied outer step, timed by the inner rows of those steps
    spans = [(inn[o[-1]["step"]]["time"] - inn[o[0]["step"]]["time"]) for inn, o in zip(inner, outer)]
    per = [t / (o[-1]["step"] - o[0]["step"]) for t, o in zip(spans, outer)]
    wait_frac = [sum(r["wait_seconds"] for r in o[1:]) / t for t, o in zip(spans, outer)]
    by_step = [{r["outer_step"]: r["params_hash"] for r in o} for o in outer]
    hashes_ok = all(b == by_step[0] for b in by_step)  # the same outer steps, each with the same hash
    split = {k: sum(r.get(f"wait_{k}_seconds", 0.0) for o in outer for r in o[1:]) / N
             for k in WAITS}
    phases = {k: sum(r.get(f"reduce_{k}_seconds", 0.0) for o in outer for r in o) / sum(len(o) for o in outer)
              for k in PHASES}
    lo, hi = outer[0][0]["step"], outer[0][-1]["step"]
    return out | {"s_per_step": sum(per) / N, "wait_fraction": sum(wait_frac) / N, "reduce_phases": phases,
                  "cpu_per_step": cpu_per_step(inner, lo, hi),
                  "peak_bytes": max(r["bytes_sent_per_island"] for o in outer for r in o),
                  "syncs": len(outer[0]), "hashes_agree": hashes_ok,
                  "window": [outer[0][0]["step"], outer[0][-1]["step"]],
                  "sync_s": sum(r["sync_seconds"] for o in outer for r in o) / N,
                  "hidden_s": sum(r.get("hidden_seconds", 0.0) for o in outer for r in o) / N, "wait_split": split}


def cpu_per_step(inner: list[dict], lo: int, hi: int) -> float:
    """CPU seconds the islands' processes used per inner step over steps lo..hi (all threads, summed over islands)."""
    return sum((inn[hi]["process_cpu_seconds"] - inn[lo]["process_cpu_seconds"]) / (hi - lo) for inn in inner)


def report(results: list[dict], a) -> str:
    base = [r["s_per_step"] for r in results if "wait_fraction" not in r]
    ref = sum(base) / len(base)
    noise = (max(base) - min(base)) / ref if len(base) > 1 else float("nan")
    block = next((r for r in results if r["arm"] == "blocking"), None)
    rows = []
    for r in results:
        if "wait_fraction" not in r:
            rows.append([r["arm"], f"{1e3 * r['s_per_step']:.1f}", f"{1e3 * r['cpu_per_step']:.0f}",
                         "100% (reference)", *["–"] * 8])
            continue
        rows.append([r["arm"], f"{1e3 * r['s_per_step']:.1f}", f"{1e3 * r['cpu_per_step']:.0f}",
                     f"{100 * ref / r['s_per_step']:.1f}%",
                     f"{100 * (1 - r['wait_fraction']):.1f}%", f"{r['sync_s']:.1f} / {r['hidden_s']:.1f}",
                     str(r["syncs"]), f"{r['peak_bytes'] / 1e6:.2f}",
                     f"{r['peak_bytes'] / block['peak_bytes']:.2f}" if block else "–",
                     " / ".join(f"{r['wait_split'].get(k, 0.0):.1f}" for k in WAITS)
                     if any(r.get("wait_split", {}).values()) else "–",
                     " / ".join(f"{1e3 * r['reduce_phases'][k]:.0f}" for k in PHASES),
                     "yes" if r["hashes_agree"] else "**NO**"])
    tab = common.table(["arm", "ms / inner step", "CPU ms / inner step", "utilization (end to end)",
                        "1 - wait / wall (rows)",
                        "sync s / hidden s (per island)", "outer steps", "peak MB in flight / island",
                        "peak vs blocking", "wait s: verdict / copy / reduce / apply / snapshot",
                        "ms per reduce: barrier / connect / ring / done", "hashes agree"], rows, "lrrrrrrrrrrl")
    link = f"tbf {a.rate} up and down per island (launch/wan_emulation.py)" if not a.no_netns else "loopback"
    away = (f" behind a relay adding {a.coord_delay_ms:g} ms each way (launch/delay_relay.py; islands advertise "
            "their own addresses)") if a.coord_delay_ms else ""
    notes = (f"Three `intellect-jax train` island processes on this machine's CPU cores, {link}, coordinator on the "
             f"bridge{away}; model: debug Llama with hidden {a.hidden}, 4 layers ({a.params / 1e6:.2f}M params), "
             f"{a.batch} x {a.seq_len} tokens per island step, int8 ring, {a.streams} streams, H = {a.H}, "
             f"{a.steps} inner steps; streaming: {a.fragments} fragments, merge alpha {a.alpha}. Utilization (end to "
             "end) = the compute-only seconds per inner step (the mean of its two runs) / the arm's, each the mean "
             "over the islands of the time between two inner steps' rows, from the first to the last applied outer "
             "step (the compute-only arm: steps H to the end); the two compute-only runs were "
             f"{100 * noise:.1f}% apart: read differences below that as noise. Sync / hidden: seconds "
             "the reduces took in all / of that, the part that ran while the islands computed (per island, summed "
             "over the run). CPU ms / inner step: the CPU time the three island processes used (all threads, from "
             "their rows' process_cpu_seconds) per inner step over the same window; what a synced arm uses beyond the "
             "compute-only arm is the host's sync work (packing, the ring, hashing), which on this machine competes "
             "with the compute for the same cores. Peak in flight: the most bytes one island sent in one sync "
             "(measured by the ring). Wait split "
             "(streaming rows, per island, summed): the verdict of the previous fragment's hash vote not in when the "
             "mean was due (the copy to the host, the hashing and the vote run in a background thread from the apply "
             "on; the next reduce's thread takes the verdict), the launch (dispatch and, with error feedback on the "
             "host codec, the pseudo-gradient's copy off the device), the reduce not finished when its mean was due, "
             "the apply, the state's copy dispatched for the hash. Ms per reduce (the mean over "
             "islands and syncs, all in the background for the streaming rows): the coordinator's sync barrier (every "
             "island at the step), the ring's connections, its bytes, the done barrier (every island's verdict).")
    return tab + "\n\n" + notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="loopback, short (a smoke test; writes nothing)")
    ap.add_argument("--no-netns", action="store_true", help="loopback instead of namespaces + tbf")
    ap.add_argument("--rate", default="20mbit", help="tbf rate of each island's link (default 20mbit)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--H", type=int, default=24)
    ap.add_argument("--steps", type=int, default=144)
    ap.add_argument("--fragments", type=int, default=4)
    ap.add_argument("--taus", type=int, nargs="+", default=[1, 2, 5])
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--coord-delay-ms", type=float, default=0.0, help="one-way delay between the islands and the "
                    "coordinator (a relay, launch/delay_relay.py; 0: none)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds an arm may take")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--only", nargs="+", default=None, help="run only the arms whose name contains one of these")
    ap.add_argument("--resummarise", metavar="LOG", help="run nothing: summarise again the arms kept in --out by the "
                    "run whose output (one JSON line per arm) is LOG, with the same other flags")
    a = ap.parse_args()
    if a.quick:
        a.no_netns, a.hidden, a.steps, a.H, a.taus = True, 64, 48, 8, [1]
    from intellect_jax.info import count_params
    from intellect_jax.config import load_config

    cfg = load_config(common.ROOT / "configs" / "debug.toml")
    import dataclasses

    a.params = count_params(dataclasses.replace(cfg.model, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                                                num_hidden_layers=4)).total_params
    if a.resummarise:
        return resummarise(a)
    t_all = time.perf_counter()
    topo = None
    if not a.no_netns:
        sys.path.insert(0, str(common.ROOT / "launch"))
        from wan_emulation import Topology, netns_available

        ok, why = netns_available()
        if not ok:
            print(f"network namespaces unavailable ({why}); use --no-netns", file=sys.stderr)
            return 2
        topo = Topology(N, a.rate).up()
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(a.out or tmp)
            for name, extra in arms(a):
                if a.only and not any(o in name for o in a.only):
                    continue
                r = run_arm(a, name, extra, topo, work)
                results.append(r)
                print(json.dumps(r), flush=True)
    finally:
        if topo:
            topo.down()
    write(a, results, time.perf_counter() - t_all)
    return 0


def resummarise(a) -> int:
    """The arms a previous run kept in --out, summarised again (its output LOG gives the arms and their seconds)."""
    if not a.out:
        print("--resummarise needs --out: the directory where that run kept its arms", file=sys.stderr)
        return 2
    log = Path(a.resummarise)
    ran = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"arm"')]
    if not ran:
        print(f"{log} holds no arm results (lines starting with {{\"arm\"): pass the output of the run that "
              f"filled {a.out}", file=sys.stderr)
        return 2
    results = [summarise(r["arm"], Path(a.out) / arm_dir(r["arm"]), a, r["seconds"]) for r in ran]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(log.stat().st_mtime))
    write(a, results, sum(r["seconds"] for r in ran), f"Runs: the arms of a run that ended {when} (kept in {a.out}), "
          "summarised again with the command below.")
    return 0


def write(a, results: list[dict], seconds: float, note: str = "") -> None:
    body = report(results, a)
    print("\n" + body + f"\n\ntotal {seconds:.0f} s")
    if not a.quick:
        away = f", coordinator {a.coord_delay_ms:g} ms away" if a.coord_delay_ms else ""
        head = ([note] if note else []) + [common.provenance(seconds)]
        common.write_section(f"Streaming utilization (elastic, {a.rate if not a.no_netns else 'loopback'}{away})",
                             "\n\n".join([*head, body, "Raw: `" + json.dumps(results) + "`"]))


if __name__ == "__main__":
    sys.exit(main())
