"""int8 / int4 pack and unpack throughput on this host, next to its memcpy bandwidth.

    python benchmarks/packing_throughput.py [--mib 256] [--repeats 5]

GB/s are float32 bytes per second (the vector packed, or produced by unpacking), so 1.0x memcpy means the codec
runs as fast as copying its float32 input once. memcpy is np.copyto of an array of the same size (bytes copied / s).
Rows: numpy twin (host path of the elastic ring) on one thread and on its codec pool (quant.np_codec_threads()),
the ring's hop (decode a partial sum, add this member's values, re-pack) unfused and fused, and jitted jnp on jax's
default backend. Ring hop GB/s count the float32 vector once (like pack).
"""

from __future__ import annotations

import argparse
import os
import time

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402
from intellect_jax import quant  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compile, page in
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="float32 vector size in MiB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    t_start = time.perf_counter()
    bs = args.block_size
    n = quant.padded_size(args.mib * 2**20 // 4, bs)
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    gb = x.nbytes / 1e9

    dst = np.empty_like(x)
    memcpy = gb / best_seconds(lambda: np.copyto(dst, x), args.repeats)
    rows = [("memcpy (np.copyto)", "numpy", memcpy)]

    xd = jax.device_put(x)
    y = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    pool = quant.np_codec_threads()
    for bits in (8, 4):
        codes, scales = quant.pack_np(x, bits=bits, block_size=bs)
        for threads in sorted({1, pool}):
            os.environ["INTELLECT_JAX_CODEC_THREADS"] = str(threads)
            impl = f"numpy, {threads} thread{'s' if threads > 1 else ''}"
            rows.append((f"pack int{bits}", impl,
                         gb / best_seconds(lambda: quant.pack_np(x, bits=bits, block_size=bs), args.repeats)))
            rows.append((f"unpack int{bits}", impl, gb / best_seconds(
                lambda: quant.unpack_np(codes, scales, bits=bits, block_size=bs), args.repeats)))
            rows.append((f"ring hop int{bits}: unpack, + x, pack (unfused)", impl, gb / best_seconds(
                lambda: quant.pack_np(quant.unpack_np(codes, scales, bits=bits, block_size=bs) + y, bits=bits,
                                      block_size=bs), args.repeats)))
            rows.append((f"ring hop int{bits}: accumulate_pack_np (fused)", impl, gb / best_seconds(
                lambda: quant.accumulate_pack_np(codes, scales, y, bits=bits, block_size=bs), args.repeats)))
        del os.environ["INTELLECT_JAX_CODEC_THREADS"]
        pack = jax.jit(lambda v, bits=bits: quant.pack(v, bits=bits, block_size=bs))
        unpack = jax.jit(lambda c, s, bits=bits: quant.unpack(c, s, bits=bits, block_size=bs))
        cd, sd = jax.device_put(codes), jax.device_put(scales)
        rows.append((f"pack int{bits}", f"jnp jit ({jax.default_backend()})",
                     gb / best_seconds(lambda: jax.block_until_ready(pack(xd)), args.repeats)))
        rows.append((f"unpack int{bits}", f"jnp jit ({jax.default_backend()})",
                     gb / best_seconds(lambda: jax.block_until_ready(unpack(cd, sd)), args.repeats)))

    dev = jax.devices()[0]
    lines = [f"{args.mib} MiB float32 vector, block_size {bs}, best of {args.repeats}; jax {jax.__version__} on "
             f"{dev.platform} ({getattr(dev, 'device_kind', '')}), {len(jax.devices())} device(s)", "",
             "| operation | implementation | GB/s (float32 side) | x memcpy |", "|---|---|---:|---:|"]
    lines += [f"| {name} | {impl} | {gbs:.2f} | {gbs / memcpy:.2f} |" for name, impl, gbs in rows]
    print("\n".join(lines))
    if not args.no_write:
        common.write_section("Packing throughput", common.provenance(time.perf_counter() - t_start) + "\n\n"
                             + "\n".join(lines))


if __name__ == "__main__":
    main()
