#!/usr/bin/env python3
"""Per-host launcher: run this once on every host of a job (one JAX process per host).

    python launch/host.py --coordinator HOST0:12355 --num-processes 2 --process-id 0 train --config configs/1b.toml
    srun python launch/host.py train --config configs/intellect1-10b.toml      # SLURM: layout from SLURM_* variables

The process layout comes from the arguments, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
else SLURM's variables; everything after the launcher's own options is an `intellect-jax` command line.
"""

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (jax.distributed coordinator)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args, rest = parser.parse_known_args()
    if args.coordinator:
        os.environ["JAX_COORDINATOR_ADDRESS"] = args.coordinator
    if args.num_processes is not None:
        os.environ["JAX_NUM_PROCESSES"] = str(args.num_processes)
    if args.process_id is not None:
        os.environ["JAX_PROCESS_ID"] = str(args.process_id)
    from intellect_jax.cli import main as cli_main

    return cli_main(rest or ["train"])


if __name__ == "__main__":
    sys.exit(main())
