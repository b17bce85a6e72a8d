#!/usr/bin/env python3
"""Demo of the elastic mode on one machine: a coordinator and N islands, each its own `intellect-jax train` program.

    python launch/local_islands.py --islands 3 -- --config configs/debug.toml --run.steps=100

Every island gets `mesh.islands=1` (one island per program), its own run directory (<out>/island<i>), its own data
shard, and CPU devices of its own (`--devices-per-island`). Each island's key and the islands file are generated into <out>/. Logs go to
<out>/coordinator.log and <out>/island<i>.log; each island's metrics.jsonl has a params_hash per outer step, the same
on every island. Ctrl-C stops everything (the islands checkpoint first). At the end one line sums up: each island's
final loss and whether the islands' global-state hashes agreed at every outer step.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--islands", type=int, default=3)
    parser.add_argument("--devices-per-island", type=int, default=2)
    parser.add_argument("--out", default="runs/elastic-demo")
    parser.add_argument("--run-id", default="elastic-demo")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="intellect-jax train arguments (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port_file = out / "coordinator.port"
    port_file.unlink(missing_ok=True)
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("XLA_FLAGS", None)
    cli = [sys.executable, "-m", "intellect_jax"]
    islands_file = admit(out, ["coordinator", *(f"island{i}" for i in range(args.islands))], cli, env)
    coord = subprocess.Popen([*cli, "coordinator", "--bind", "127.0.0.1:0", "--key-file", str(out / "coordinator.key"),
                              "--islands-file", str(islands_file),
                              "--run-id", args.run_id, "--min-islands", str(args.islands),
                              "--port-file", str(port_file)], env=env,
                             stderr=open(out / "coordinator.log", "a"), stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if coord.poll() is not None or time.time() > deadline:
            coord.kill()
            tail = (out / "coordinator.log").read_text(errors="replace").splitlines()[-20:]
            print("\n".join([f"the coordinator did not start; the end of {out / 'coordinator.log'}:", *tail]),
                  file=sys.stderr)
            return 1
        time.sleep(0.1)
    addr = f"127.0.0.1:{port_file.read_text().strip()}"
    train_args = [a for a in args.train_args if a != "--"] or ["--config", "configs/debug.toml"]
    islands = [subprocess.Popen(
        [*cli, "train", *train_args, "--mesh.islands=1", "--mesh.fsdp=-1",
         f"--run.host_devices={args.devices_per_island}", f"--run.dir={out / f'island{i}'}",
         f"--elastic.coordinator={addr}", f"--elastic.key_file={out / f'island{i}.key'}",
         f"--elastic.islands_file={islands_file}", f"--elastic.run_id={args.run_id}",
         f"--elastic.island_name=island{i}", f"--elastic.data_shard={i}", f"--elastic.data_shards={args.islands}"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(out / f"island{i}.log", "a")) for i in range(args.islands)]
    print(f"coordinator {addr}; {args.islands} islands; logs in {out}/")

    def forward(signum, _frame):
        for p in islands:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [p.wait() for p in islands]
    coord.terminate()
    coord.wait()
    print(f"islands exited with {codes}; {summary([out / f'island{i}' for i in range(args.islands)])}")
    return next((c for c in codes if c), 0)


def admit(out: Path, names: list[str], cli: list[str], env: dict) -> Path:
    """As a run's operator would: a key per island (and the coordinator), made with `intellect-jax keygen` where it
    does not exist yet, and the islands file listing their public keys."""
    lines = []
    for n in names:
        key = out / f"{n}.key"
        if key.exists():
            lines.append(subprocess.run([*cli, "keygen", "--show", str(key), "--name", n], check=True, env=env,
                                        capture_output=True, text=True).stdout.strip())
        else:
            lines.append(subprocess.run([*cli, "keygen", "--out", str(key), "--name", n], check=True, env=env,
                                        capture_output=True, text=True).stdout.strip())
    path = out / "islands"
    path.write_text("# the islands admitted to this demo run: NAME ssh-ed25519 PUBLIC_KEY\n" + "\n".join(lines) + "\n")
    return path


def summary(run_dirs: list[Path]) -> str:
    """Each island's final loss, and whether every outer step's global-state hash (params_hash in the islands'
    metrics.jsonl) was the same on every island that logged it."""
    losses, hashes = [], {}
    for d in run_dirs:
        path = d / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        inner = [r for r in rows if r.get("kind") == "inner"]
        losses.append(f"{d.name} {inner[-1]['loss']:.4f}" if inner else f"{d.name} -")
        for r in rows:
            if r.get("kind") == "outer" and r.get("params_hash"):
                hashes.setdefault(r["outer_step"], {})[d.name] = r["params_hash"]  # a rerun's row replaces
    differ = sorted(step for step, by_island in hashes.items() if len(set(by_island.values())) > 1)
    agreed = (f"global-state hashes DIFFERED at outer steps {differ}" if differ else
              f"global-state hashes agreed at all {len(hashes)} outer steps" if hashes else "no outer steps logged")
    return f"final loss {', '.join(losses)}; {agreed}"


if __name__ == "__main__":
    sys.exit(main())
