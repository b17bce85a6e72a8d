"""Helpers shared by the benchmarks: simulated CPU devices, markdown tables, and RESULTS.md sections.

Every benchmark owns one ``## <title>`` section of ``benchmarks/RESULTS.md`` and rewrites only that section
(:func:`write_section`), so benchmarks written by different people can share the file.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PLOTS = ROOT / "benchmarks" / "plots"


def force_cpu_devices(n: int) -> None:
    """Simulate ``n`` XLA CPU devices; must run before jax is imported (a no-op on an accelerator backend)."""
    if "jax" in sys.modules:
        raise RuntimeError("force_cpu_devices must run before jax is imported")
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    # Simulated devices are threads; on a busy 2-core host one can be starved past XLA's default 40 s collective
    # rendezvous limit, which aborts the process. Wait longer (a real deadlock still aborts, after 5 min).
    for flag in ("xla_cpu_collective_call_terminate_timeout_seconds", "xla_cpu_collective_timeout_seconds"):
        if flag not in flags:
            flags += f" --{flag}=300"
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def command_line() -> str:
    """The exact command that produced a result, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def machine() -> str:
    import jax

    d = jax.devices()[0]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except OSError:
        rev = ""
    return (f"{len(jax.devices())} x {d.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores, "
            f"python {platform.python_version()}, jax {jax.__version__}" + (f", commit {rev} (+ working tree)"
                                                                              if rev else ""))


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one char per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replaces the ``## {title}`` section of RESULTS.md (up to the next ``## `` heading) or appends it.

    Other sections are left byte for byte as they are.
    """
    heading = f"## {title}"
    text = path.read_text() if path.is_file() else "# Benchmark results\n\nWritten by the scripts in benchmarks/.\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == heading), None)
    block = f"{heading}\n\n{body.strip()}\n\n"
    if start is None:
        if not text.endswith("\n\n"):
            text = text.rstrip("\n") + "\n\n"
        text += block
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + block + "".join(lines[end:])
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text.rstrip("\n") + "\n")
    os.replace(tmp, path)


def provenance(seconds: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Command: `{command_line()}`  \nMachine: {machine()}  \nMeasured {now}; the benchmark took "
            f"{seconds:.0f} s.")


def save_plot(fig, name: str) -> str:
    """Saves a matplotlib figure under benchmarks/plots/; returns the path relative to benchmarks/ for markdown."""
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOTS / name, dpi=110, bbox_inches="tight")
    return f"plots/{name}"


def random_batch(islands: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """A host batch [islands, batch, seq_len] of random tokens, one document per row (for timing only)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (islands, batch, seq_len + 1), dtype=np.int32)
    shape = (islands, batch, seq_len)
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
            "loss_mask": np.ones(shape, np.float32)}
