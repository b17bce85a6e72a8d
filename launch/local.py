#!/usr/bin/env python3
"""Runs one multi-host JAX program as N local processes on this machine (CPU devices, gloo collectives).

    python launch/local.py --nproc 2 --devices-per-process 4 -- train --config configs/debug.toml

Each process gets `--run.host_devices=<devices-per-process>` and the launcher's coordinator address; the global mesh
spans all processes, exactly as on a multi-host GPU job. Exits with the first non-zero exit code (and stops the rest).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = Path(__file__).with_name("host.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="intellect-jax command line (after --)")
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"] or ["train"]
    if command[0] in ("train",):
        command.append(f"--run.host_devices={args.devices_per_process}")
    coordinator = f"127.0.0.1:{args.port or free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(HOST), "--coordinator", coordinator, "--num-processes",
                               str(args.nproc), "--process-id", str(i), *command], env=env)
             for i in range(args.nproc)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = 0
    while any(p.poll() is None for p in procs):
        for p in procs:
            code = p.poll()
            if code not in (None, 0) and rc == 0:
                rc = code
                print(f"launch/local.py: a process exited with {code}; stopping the others", file=sys.stderr)
                for q in procs:
                    if q.poll() is None:
                        q.terminate()
        time.sleep(0.2)
    return rc or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
