"""Multi-host start-up: `jax.distributed.initialize` from arguments, the usual environment variables or SLURM's.

One JAX process per host (or per local process in tests). Sources, in order of precedence:
  explicit arguments  >  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID  >  SLURM_* (srun)
Nothing is initialised for a single process.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_PORT = 12355


@dataclass(frozen=True)
class ProcessInfo:
    coordinator: str
    num_processes: int
    process_id: int


def _slurm_first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[003-005,007],cpu1' -> 'gpu003'."""
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    head, ranges, tail = m.groups()
    return head + ranges.split(",")[0].split("-")[0] + tail


def discover(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, env: dict[str, str] | None = None) -> ProcessInfo | None:
    """The process layout, or None for a single-process run."""
    env = dict(os.environ if env is None else env)
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        num_processes = num_processes if num_processes is not None else int(env["SLURM_NTASKS"])
        process_id = process_id if process_id is not None else int(env["SLURM_PROCID"])
        if coordinator is None:
            host = _slurm_first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
            coordinator = f"{host}:{DEFAULT_PORT}"
    if num_processes is None or num_processes <= 1:
        return None
    if coordinator is None or process_id is None:
        raise ValueError(
            f"a {num_processes}-process run needs the coordinator address and this process's id: pass "
            "--coordinator HOST:PORT --process-id I (or set JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
    return ProcessInfo(coordinator, num_processes, process_id)


def initialize(info: ProcessInfo | None) -> None:
    """Starts the JAX distributed runtime (CPU runs use gloo collectives across processes)."""
    if info is None:
        return
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(info.coordinator, num_processes=info.num_processes, process_id=info.process_id)
    log.info("process %d of %d joined %s", info.process_id, info.num_processes, info.coordinator)
