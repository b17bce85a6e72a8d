"""Loader throughput on the demo corpus next to what the demo trainer consumes.

    python benchmarks/data_throughput.py [--data DIR] [--seconds 3] [--trainer-tokens-per-s N]

Prepares the python-stdlib demo corpus (BPE 4096) if it is missing, then for seq_len 128/512 x batch 16/64 times
the loader (prefetch on, so this is the rate a training loop sees when it is the bottleneck, and prefetch off, the
raw packing rate of one thread). The trainer side is ``--trainer-tokens-per-s`` if given, else a measured
jitted forward+backward of the debug preset's model (configs/debug.toml) on one device of this machine, if
intellect_jax.model is importable. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from intellect_jax.config import DataConfig, SourceConfig, load_config  # noqa: E402
from intellect_jax.data import ensure_prepared, make_iterator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def loader_rate(cfg: DataConfig, vocab: int, seconds: float) -> float:
    with make_iterator(cfg, vocab_size=vocab) as it:
        for _ in range(3):
            next(it)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += next(it)["inputs"].size
        return n / (time.perf_counter() - t0)


def trainer_rate(seq_len: int, batch: int, seconds: float) -> float | None:
    """Tokens/s of a jitted forward+backward of the debug model (no optimizer update), or None."""
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np

        from intellect_jax import model
    except ImportError:
        return None
    mcfg = load_config(ROOT / "configs" / "debug.toml").model
    mcfg = dataclasses.replace(mcfg, max_position_embeddings=max(seq_len, mcfg.max_position_embeddings))
    graphdef, params = model.create(mcfg, 0)

    def loss(p, x, y):
        logits = model.apply(graphdef, p, x)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(lp, y[..., None], -1).mean()

    step = jax.jit(jax.grad(loss))
    x = jnp.asarray(np.random.default_rng(0).integers(0, mcfg.vocab_size, (batch, seq_len)), jnp.int32)
    jax.block_until_ready(step(params, x, x))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jax.block_until_ready(step(params, x, x))
        n += x.size
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="~/.cache/intellect-jax/python-stdlib-bpe4096")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    ap.add_argument("--trainer-tokens-per-s", type=float, default=None,
                    help="the trainer's consumption to compare with (default: measure the debug model)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    args = ap.parse_args()
    src = SourceConfig(name="python-stdlib", path=args.data, auto_prepare="python-stdlib")
    base = DataConfig(kind="prepared", sources=(src,))
    t0 = time.perf_counter()
    ensure_prepared(base)
    print(f"corpus ready in {time.perf_counter() - t0:.1f} s: {os.path.expanduser(args.data)}\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}\n")
    lines = ["| seq_len | batch | loader tok/s (prefetch 2) | loader tok/s (no prefetch) | trainer tok/s | headroom |",
             "|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines))
    for seq_len in (128, 512):
        for batch in (16, 64):
            cfg = dataclasses.replace(base, seq_len=seq_len, batch_size=batch, prefetch=2)
            pre = loader_rate(cfg, 4096, args.seconds)
            raw = loader_rate(dataclasses.replace(cfg, prefetch=0), 4096, args.seconds)
            if args.trainer_tokens_per_s is not None:
                train = args.trainer_tokens_per_s
            else:
                train = trainer_rate(seq_len, batch, args.seconds)
            tr = f"{train:,.0f}" if train else "n/a"
            head = f"{pre / train:,.0f}x" if train else "n/a"
            lines.append(f"| {seq_len} | {batch} | {pre:,.0f} | {raw:,.0f} | {tr} | {head} |")
            print(lines[-1], flush=True)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks import common

        note = ("Loader: the demo corpus (Python stdlib, BPE 4096), 4 islands, tokens/s of finished batches. "
                "Trainer: forward + backward of the debug model on one CPU device at the same batch shape, the "
                "demo trainer's consumption rate; headroom = loader / trainer.")
        common.write_section("Data loader throughput", common.provenance(time.perf_counter() - t0) + "\n\n"
                             + "\n".join(lines) + "\n\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
