"""Loader throughput on the demo corpus next to what the demo trainer consumes; packers compared.

    python benchmarks/data_throughput.py [--data DIR] [--seconds 3] [--trainer-tokens-per-s N]

Prepares the python-stdlib demo corpus (BPE 4096) if it is missing, then for seq_len 128/512 x batch 16/64 times
the loader (prefetch on, so this is the rate a training loop sees when it is the bottleneck, and prefetch off, the
raw packing rate of one thread). The trainer side is ``--trainer-tokens-per-s`` if given, else a measured
jitted forward+backward of the debug preset's model (configs/debug.toml) on one device of this machine, if
intellect_jax.model is importable. Prints a markdown table.

A second table compares packers on one slot's document stream: the loader's ``_PackRows``, Grain's
``ConcatThenSplitIterDataset`` (checked to give the same rows) and Grain's ``FirstFitPackIterDataset`` (documents
are not split, rows are padded): padding share and tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from grain.experimental import FlatMapTransform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from intellect_jax import data  # noqa: E402
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


class _Chunks(FlatMapTransform):
    def __init__(self, seq_len: int):
        self.seq_len, self.max_fan_out = seq_len, 1 << 16

    def flat_map(self, x):
        return [{k: v[i:i + self.seq_len] for k, v in x.items()} for i in range(0, len(x["inputs"]), self.seq_len)]


def _rows(packer: str, cfg: DataConfig):
    """An endless iterator of one slot's rows ``{inputs, targets, segment_ids, positions}`` packed by ``packer``."""
    from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset, FlatMapIterDataset

    srcs, weights = data.open_sources(cfg)
    docs = [data._slot_documents(src, i, 0, 1, cfg.seed) for i, src in enumerate(srcs)]
    pairs = data._TokenMix(docs, weights, srcs[0].manifest.eos_id)
    lengths = {"inputs": cfg.seq_len, "targets": cfg.seq_len}
    if packer == "ours":
        return iter(data._PackRows(pairs, cfg.seq_len))
    if packer == "concat-then-split":
        ds = ConcatThenSplitIterDataset(pairs, length_struct=lengths)
    else:  # first-fit needs pieces of at most seq_len: cut longer documents (nothing is dropped)
        pieces = FlatMapIterDataset(pairs, _Chunks(cfg.seq_len))
        ds = FirstFitPackIterDataset(pieces, length_struct=lengths, num_packing_bins=16, shuffle_bins=False)
    return iter(ds.map(lambda x: {"inputs": x["inputs"], "targets": x["targets"],
                                  "segment_ids": x["inputs_segment_ids"], "positions": x["inputs_positions"]}))


def packing_rate(packer: str, cfg: DataConfig, seconds: float) -> tuple[float, float]:
    """(padding share, non-padding tokens/s) of one slot's rows."""
    it = _rows(packer, cfg)
    for _ in range(20):
        next(it)
    real = total = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        seg = next(it)["segment_ids"]
        real += int(np.count_nonzero(seg))
        total += seg.size
    return 1 - real / total, real / (time.perf_counter() - t0)


def same_rows(cfg: DataConfig, n: int = 500) -> bool:
    a, b = _rows("ours", cfg), _rows("concat-then-split", cfg)
    return all(np.array_equal(x[k], y[k]) for x, y in ((next(a), next(b)) for _ in range(n)) for k in x)


def trainer_rate(seq_len: int, batch: int, seconds: float) -> float | None:
    """Tokens/s of a jitted forward+backward of the debug model (no optimizer update), or None."""
    try:
        import jax
        import jax.numpy as jnp

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
    packing = ["| seq_len | packer | padding share | tokens/s (one slot, one thread) |", "|---:|---|---:|---:|"]
    print("\n" + "\n".join(packing))
    for seq_len in (128, 512, 2048):
        cfg = dataclasses.replace(base, seq_len=seq_len)
        if not same_rows(cfg):
            raise SystemExit(f"_PackRows and ConcatThenSplitIterDataset disagree at seq_len {seq_len}")
        for packer in ("ours", "concat-then-split", "first-fit"):
            pad, rate = packing_rate(packer, cfg, args.seconds)
            packing.append(f"| {seq_len} | {packer} | {pad:.1%} | {rate:,.0f} |")
            print(packing[-1], flush=True)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks import common

        note = ("Loader: the demo corpus (Python stdlib, BPE 4096), 4 islands, tokens/s of finished batches. "
                "Trainer: forward + backward of the debug model on one CPU device at the same batch shape, the "
                "demo trainer's consumption rate; headroom = loader / trainer.")
        pack_note = ("Packers on one slot's stream: ours (`data._PackRows`) and Grain's ConcatThenSplit give the "
                     "same rows (checked on 500 rows per seq_len); first-fit keeps documents whole and pads. "
                     "Tokens/s counts non-padding tokens.")
        common.write_section("Data loader throughput", common.provenance(time.perf_counter() - t0) + "\n\n"
                             + "\n".join(lines) + "\n\n" + note + "\n\n" + "\n".join(packing) + "\n\n"
                             + pack_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
