"""Block-wise symmetric int8 / int4 packing of flat float32 vectors: a jnp version and a numpy twin, same bytes.

Format (``bits`` = 8 or 4, ``Q`` = 2**(bits-1) - 1 = 127 or 7)::

    x      float32 [n]                    n % block_size == 0 (pad with `padded_size` first)
    scales float32 [n // block_size]      scale_b = absmax_b * float32(1/Q)    (one IEEE multiply)
    codes  bits=8: int8  [n]              code_k  = round_half_even(Q * x_k / absmax_b), exactly, in [-Q, Q]
           bits=4: uint8 [n // 2]         two 4-bit two's-complement codes per byte: element 2j in the low
                                          nibble, element 2j+1 in the high nibble
    decode x_k ~= float32(code_k) * scale_b                                  (one IEEE multiply)

Why not ``rint(x / scale)``: the twins must give identical bytes on every backend, and float32 division is not
portable: XLA:GPU emits the 1-2 ulp ``div.full.f32`` (openxla/xla#37181) and XLA:CPU flushes subnormal results to
zero (tests/test_quant.py records this), so a code could differ from numpy's at a rounding tie. Instead the code is
the exactly rounded value of the real number ``Q * x / absmax``: in jnp by uint32 integer division on the IEEE bit
patterns (no float op touches the inputs, so flush-to-zero cannot change a byte; on GPUs `pack_padded` takes an exact
float64 route instead, see `_block_codes`, faster there); in numpy by one float64 division,
which is provably exact for this (see the comment above `pack_np`): two independent routes, checked against each
other and against rational arithmetic. ``absmax`` is an integer max over the bit patterns (for non-negative floats
their order is the order of their bits). The only float32 ops are the two multiplies above, which are correctly
rounded everywhere; their results are kept normal (see flushing below), so FTZ cannot change them either.

Error bound per element (derived in `error_bound`): ``|x - decode(x)| <= scale * (1/2 + 2**-15)``; the extra term
covers the rounding of ``scale`` itself (two roundings of 2**-24 relative, times ``|code| <= Q``) and of the
decoding multiply.

Special blocks:

- all-zero block, or absmax < ``FLUSH_BELOW`` (2**-100): scale 0, codes 0, decodes to exact zeros. Never NaN.
  Keeps every scale normal; the absolute error of a flushed element is < 2**-100.
- a block holding a NaN or +-Inf: scale NaN, codes 0, so the whole block decodes to NaN. Other blocks are
  untouched. `pack` cannot raise under jit; callers detect a bad pseudo-gradient with ``~isfinite(scales)``
  (`has_nonfinite`) and the NaN propagates through any mean instead of being silently clipped to a finite value.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from intellect_jax import pools

if TYPE_CHECKING:
    import jax

# jax is imported inside the jnp functions only: the elastic ring uses the numpy twin in processes that never start
# jax, so importing this module must not import jax.

FLUSH_BELOW = 2.0**-100
_FLUSH_BITS = 0x0D800000  # float32 bit pattern of 2**-100: exponent field 127 - 100 = 27
assert np.array([FLUSH_BELOW], np.float32).view(np.uint32)[0] == _FLUSH_BITS
_EXP_MASK = 0x7F800000
_ABS_MASK = 0x7FFFFFFF
_MANT_MASK = 0x007FFFFF
_HIDDEN_BIT = 0x00800000
# Q * x / absmax < 2 * Q < 2**8 before the exponent shift d, so for d >= 9 the code rounds to 0: clamping d to 9
# keeps every shift and mask inside uint32 without changing a result.
_MAX_SHIFT = 9
SUPPORTED_BITS = (4, 8)


def qmax(bits: int) -> int:
    """Largest code magnitude: 127 for int8, 7 for int4 (symmetric, -Q-1 unused)."""
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _inv_q(bits: int) -> np.float32:
    return np.float32(1.0 / qmax(bits))


def padded_size(n: int, block_size: int, multiple: int = 1) -> int:
    """Smallest size >= n divisible by block_size * multiple (e.g. multiple = n_islands for equal chunks)."""
    if n < 0 or block_size < 1 or multiple < 1:
        raise ValueError(f"bad sizes: n={n}, block_size={block_size}, multiple={multiple}")
    unit = block_size * multiple
    return -(-n // unit) * unit


def payload_bytes(n: int, *, bits: int, block_size: int) -> int:
    """Bytes on the wire for n elements: codes plus one float32 scale per block (n padded to whole blocks).

    ``bits=32`` means uncompressed float32 (4 bytes per element, no scales), for baselines.
    """
    if bits == 32:
        return 4 * n
    _check_bits(bits)
    n_pad = padded_size(n, block_size)
    return n_pad * bits // 8 + 4 * (n_pad // block_size)


def error_bound(scales, *, block_size: int = 256, xp=np):
    """Per-element bound on |x - unpack(pack(x))| from the stored block scales: scale * (1/2 + 2**-15).

    Derivation (a = absmax, s* = a / Q exact, s = RN(a * RN(1/Q)) stored, code = rint(Q x / a) exactly):
    |x - code s*| <= s*/2; |s - s*| <= (2**-23 + 2**-48) s*, times |code| <= Q = 127 gives <= 2**-16 s*; the decoding
    multiply RN(code * s) adds <= Q 2**-24 s <= 2**-17 s; and s* <= s (1 + 2**-22). In total
    <= s (1/2 + 2**-23 + 2**-16 + 2**-17 + O(2**-38)) < s (1/2 + 2**-15). Flushed blocks (scale 0) are bounded by
    FLUSH_BELOW; NaN scales give NaN bounds.
    """
    scales = xp.asarray(scales, dtype=xp.float32)
    per_block = xp.where(scales == 0, xp.float32(FLUSH_BELOW), scales * xp.float32(0.5 + 2.0**-15))
    return xp.repeat(per_block, block_size)


def has_nonfinite(scales) -> jax.Array:
    """True if the packed vector held a NaN or Inf (that block's scale is NaN)."""
    import jax.numpy as jnp

    return jnp.any(~jnp.isfinite(scales))


# --------------------------------------------------------------------------------------------------------------------
# jnp


def _check_len(n: int, bits: int, block_size: int) -> None:
    if n % block_size:
        raise ValueError(f"length {n} is not a multiple of block_size {block_size}; pad with padded_size()")
    if bits == 4 and block_size % 2:
        raise ValueError("bits=4 needs an even block_size (two codes per byte)")


def _mant_exp_u32(bits_u32):
    """IEEE float32 magnitude as integer mantissa (hidden bit included) and biased exponent (subnormals: 1)."""
    import jax.numpy as jnp

    e = bits_u32 >> 23
    m = bits_u32 & _MANT_MASK
    normal = e > 0
    return jnp.where(normal, m | _HIDDEN_BIT, m), jnp.where(normal, e, 1)


def _round_ratio_u32(num, den, d):
    """round_half_even(num / (den * 2**d)) for uint32 num < 2**31, 2**23 <= den < 2**24, 0 <= d <= 9."""
    import jax.numpy as jnp

    q = num // den
    r = num - q * den
    hi = q >> d
    low = q & ((jnp.uint32(1) << d) - 1)
    half = jnp.where(d > 0, jnp.uint32(1) << jnp.maximum(d, 1) - 1, 0)
    # Compare the fraction (low + r/den) / 2**d with 1/2. d == 0: sign of 2r - den. d > 0: low vs half, r > 0.
    above = jnp.where(d == 0, 2 * r > den, (low > half) | ((low == half) & (r > 0)))
    tie = jnp.where(d == 0, 2 * r == den, (low == half) & (r == 0))
    return hi + (above | (tie & ((hi & 1) == 1))).astype(jnp.uint32)


def _block_codes(xb, bits: int, route: str = "u32"):
    """Codes (int32 [R, B]) and scales (float32 [R]) of R blocks given as uint32 bit patterns [R, B].

    Elementwise work plus one row max, so the same function traces both into XLA (`pack`) and into the Pallas
    kernel (`pack_pallas`), one tile of rows at a time. ``route`` "u32" rounds by uint32 integer division of the
    IEEE bit patterns; "fix" by a float64 estimate made exact by two exact float64 sign tests (no division per
    element: 1.5x faster on an H200; a float64 division per element, the numpy twin's route, was slower, and XLA
    turns a division by a broadcast into an inexact reciprocal multiply). Subnormal x, which a backend may read as
    0, have code 0 on every route since absmax >= 2**-100.
    """
    import jax
    import jax.numpy as jnp

    q_max = qmax(bits)
    neg = (xb >> 31) == 1
    ab = xb & _ABS_MASK
    amax_b = jnp.max(ab, axis=1)  # uint order == float order for non-negative floats
    nonfinite = amax_b >= _EXP_MASK  # Inf is 0x7F800000, NaNs lie above it
    flushed = amax_b < _FLUSH_BITS
    if route == "fix":
        with jax.enable_x64(True):
            to64 = lambda u: jax.lax.bitcast_convert_type(u, jnp.float32).astype(jnp.float64)  # noqa: E731
            xq = to64(ab) * q_max  # exact: 24 + 7 bits
            a = to64(jnp.where(flushed | nonfinite, jnp.uint32(0x3F800000), amax_b))[:, None]  # 1.0: code-0 blocks
            # k: r = Q x / a rounded half up from a float64 estimate (error < 2**-40, so k is off by at most one,
            # and only next to a boundary k +- 1/2), then fixed by the exact signs of xq - (k +- 1/2) a: each
            # product has <= 9 + 24 bits and each difference is exactly representable unless x < a 2**-69, where
            # k = 0 and both signs are right anyway (|xq| << a / 2). A zero sign is a tie: to the even code.
            k = jnp.floor(xq * (1.0 / a) + 0.5)
            odd = k - 2.0 * jnp.floor(k * 0.5) == 1.0
            above, below = xq - (k + 0.5) * a, xq - (k - 0.5) * a
            up = (above > 0) | ((above == 0) & odd)
            down = (below < 0) | ((below == 0) & odd)
            mag = k + up.astype(jnp.float64) - down.astype(jnp.float64)
            mag = jnp.where((flushed | nonfinite)[:, None], 0.0, jnp.minimum(mag, q_max)).astype(jnp.int32)
    elif route == "u32":
        ma, ea = _mant_exp_u32(amax_b)
        mx, ex = _mant_exp_u32(ab)
        ma = jnp.where(flushed | nonfinite, _HIDDEN_BIT, ma)[:, None]  # safe divisor for blocks that get code 0
        d = jnp.clip(ea[:, None].astype(jnp.int32) - ex.astype(jnp.int32), 0, _MAX_SHIFT).astype(jnp.uint32)
        mag = _round_ratio_u32(mx * q_max, ma, d)
        mag = jnp.where((flushed | nonfinite)[:, None], 0, jnp.minimum(mag, q_max)).astype(jnp.int32)
    else:
        raise ValueError(f"route must be 'u32' or 'fix', got {route!r}")
    codes = jnp.where(neg, -mag, mag)
    amax = jax.lax.bitcast_convert_type(amax_b, jnp.float32)
    scales = jnp.where(nonfinite, jnp.nan, jnp.where(flushed, 0.0, amax * _inv_q(bits))).astype(jnp.float32)
    return codes, scales


def _check_vector(x, bits: int, block_size: int):
    import jax.numpy as jnp

    _check_bits(bits)
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"pack takes a 1-D vector, got shape {x.shape}")
    _check_len(x.shape[0], bits, block_size)
    return x


def _nibbles(codes):
    """int4: two codes per byte, element 2j in the low nibble."""
    import jax.numpy as jnp

    nib = (codes.reshape(-1) & 0xF).astype(jnp.uint8).reshape(-1, 2)
    return nib[:, 0] | (nib[:, 1] << 4)


def pack(x, *, bits: int = 8, block_size: int = 256, route: str = "u32") -> tuple[jax.Array, jax.Array]:
    """Quantize a 1-D float32 vector (len % block_size == 0) to (codes, scales); see the module docstring.
    ``route``: how the exact rounding is computed ("u32" or "fix", the same bytes; see `_block_codes`)."""
    import jax
    import jax.numpy as jnp

    x = _check_vector(x, bits, block_size)
    xb = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1, block_size)
    codes, scales = _block_codes(xb, bits, route)
    if bits == 8:
        return codes.reshape(-1).astype(jnp.int8), scales
    return _nibbles(codes), scales


# Blocks per program of `pack_pallas`: 8 x 256 float32 = 8 KiB of x per tile (the fastest measured on an H200;
# larger tiles ran slower on the float64 routes).
PALLAS_ROWS = 8


def pack_pallas(x, *, bits: int = 8, block_size: int = 256, rows: int = PALLAS_ROWS, num_warps: int = 4,
                route: str = "u32", interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`pack` as one Pallas kernel: each program reads its tile of ``rows`` blocks once and writes their codes and
    scales (XLA's `pack` makes two passes over x: block max, then codes). The same bytes as `pack`: the same
    `_block_codes` runs on each tile. The block count must be a multiple of ``rows`` (`pack_padded` pads to that);
    ``interpret`` runs the kernel on any backend (tests). Lowered through Triton on GPUs."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    x = _check_vector(x, bits, block_size)
    blocks = x.shape[0] // block_size
    if rows < 1 or blocks % rows:
        raise ValueError(f"{blocks} blocks do not split into tiles of {rows}; pad with padded_size(n, block_size, "
                         "rows) or use pack_padded()")

    def kernel(x_ref, codes_ref, scales_ref):
        codes, scales = _block_codes(jax.lax.bitcast_convert_type(x_ref[...], jnp.uint32), bits, route)
        codes_ref[...] = codes.astype(jnp.int8)
        scales_ref[...] = scales

    codes, scales = pl.pallas_call(
        kernel, grid=(blocks // rows,),
        in_specs=[pl.BlockSpec((rows, block_size), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((rows, block_size), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((blocks, block_size), jnp.int8),
                   jax.ShapeDtypeStruct((blocks,), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=f"pack_int{bits}",
    )(x.astype(jnp.float32).reshape(blocks, block_size))
    if bits == 8:
        return codes.reshape(-1), scales
    return _nibbles(codes), scales


def pack_padded(x, *, bits: int = 8, block_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """A flat vector of any length, zero-padded to whole blocks and packed: the device's fastest route to the bytes
    of `pack`. On GPUs the Pallas kernel on the "fix" route (its tiles take the padding up to a whole tile; 1.5x
    XLA's `pack` on an H200, benchmarks/RESULTS.md, GPU section); elsewhere XLA's `pack` on the uint32 route."""
    import jax
    import jax.numpy as jnp

    n = x.shape[0]
    blocks = padded_size(n, block_size) // block_size
    if jax.default_backend() != "gpu":
        return pack(jnp.pad(x, (0, blocks * block_size - n)), bits=bits, block_size=block_size)
    codes, scales = pack_pallas(jnp.pad(x, (0, padded_size(n, block_size, PALLAS_ROWS) - n)), bits=bits,
                                block_size=block_size, route="fix")
    return codes[: blocks * block_size * bits // 8], scales[:blocks]


def _decode_codes(codes, bits: int):
    import jax.numpy as jnp

    if bits == 8:
        return codes.astype(jnp.int32)
    b = codes.astype(jnp.int32)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    return (jnp.stack([lo, hi], axis=-1).reshape(-1) ^ 8) - 8  # sign-extend the nibbles


def unpack(codes, scales, *, bits: int = 8, block_size: int = 256) -> jax.Array:
    """Decode (codes, scales) from `pack` back to float32 [n]."""
    import jax.numpy as jnp

    _check_bits(bits)
    c = _decode_codes(jnp.asarray(codes), bits).astype(jnp.float32).reshape(-1, block_size)
    return (c * jnp.asarray(scales, jnp.float32)[:, None]).reshape(-1)


# --------------------------------------------------------------------------------------------------------------------
# numpy twin: same bytes, the codes by a second exact route (float64) that cross-checks the integer one.
#
# Why float64 is exact: with r = Q x / a the real quotient, Q x is exact in float64 (7 + 24 bits) and one correctly
# rounded division gives r' = RN64(Q x / a), so (1) a tie r = k + 1/2 is representable and r' == r exactly, and (2)
# otherwise |r' - r| <= 2**-46 (|r| <= 127), while a non-tie r lies >= 2**-34 from every k + 1/2: |2Qx - (2k+1)a| is
# a nonzero multiple of ulp(x), and ulp(x) >= a 2**-33 whenever |r| >= 1/4 (x >= a / (4Q)), divided by 2a. Hence
# rint(r') == round_half_even(r). (A multiply by RN64(Q / a) would not do: it moves exact ties off k + 1/2.)

# Elements per tile (1 MiB of float32): the per-tile Python glue is small next to its array passes (measured: 2**15
# ran 1.9x slower on two threads), and the tile's temporaries stay in cache.
_NP_TILE = 1 << 18
_NP_MIN_PARALLEL = 4 * _NP_TILE  # below this a vector is coded on the calling thread


def np_codec_threads() -> int:
    """Worker threads of the numpy codec (the host path of the elastic ring): ``INTELLECT_JAX_CODEC_THREADS``, else
    min(4, the cores this process may use). numpy releases the GIL inside each tile's array passes."""
    env = os.environ.get("INTELLECT_JAX_CODEC_THREADS", "")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"INTELLECT_JAX_CODEC_THREADS={env!r}: expected a positive integer")
        return int(env)
    return min(4, pools.usable_cores())


def _over_tiles(n: int, block_size: int, work) -> None:
    """Run ``work(lo, hi)`` over [0, n) in ranges of whole tiles (whole blocks), on the codec pool when n is large.

    Ranges are disjoint and every element is computed by the same arithmetic whatever the split, so the bytes do
    not depend on the thread count.
    """
    tile = max(block_size, _NP_TILE // block_size * block_size)
    threads = np_codec_threads()
    if n < _NP_MIN_PARALLEL or threads == 1:
        work(0, n)
        return
    per = -(-n // threads // tile) * tile
    futures = [pools.pool("codec", np_codec_threads()).submit(work, lo, min(n, lo + per))
               for lo in range(0, n, per)]
    for f in futures:
        f.result()


def _pack_range(x: np.ndarray, codes8: np.ndarray, scales: np.ndarray, bits: int, block_size: int,
                pre=None) -> None:
    """Pack x[lo:hi] tile by tile into int8 codes + scales (views of the caller's outputs). `pre(tile_lo, tile_hi,
    buf)`, if given, writes the float32 values to pack into `buf` instead of reading x (fused decode + add)."""
    q_max = qmax(bits)
    n = codes8.size
    tile = max(block_size, _NP_TILE // block_size * block_size)
    u32 = np.empty(tile, np.uint32)
    r64 = np.empty(tile, np.float64)
    f32 = np.empty(tile, np.float32) if pre is not None else None
    with np.errstate(invalid="ignore", over="ignore"):  # thread-local: set here, in the worker
        for lo in range(0, n, tile):
            _pack_tile(x, codes8, scales, bits, block_size, pre, lo, min(n, lo + tile), q_max, u32, r64, f32)


def _pack_tile(x, codes8, scales, bits, block_size, pre, lo, hi, q_max, u32, r64, f32) -> None:
    t, rows = hi - lo, (hi - lo) // block_size
    if pre is not None:
        xt = f32[:t]
        pre(lo, hi, xt)
    else:
        xt = x[lo:hi]
    np.bitwise_and(xt.view(np.uint32), np.uint32(_ABS_MASK), out=u32[:t])
    amax_b = u32[:t].reshape(rows, block_size).max(axis=1)  # uint order == float order for |x|
    nonfinite = amax_b >= _EXP_MASK  # Inf is 0x7F800000, NaNs lie above it
    flushed = amax_b < _FLUSH_BITS
    bad = nonfinite | flushed
    amax = amax_b.view(np.float32)
    den = amax.astype(np.float64)
    any_bad = bool(bad.any())
    if any_bad:
        den[bad] = 1.0
    r = r64[:t]
    r[...] = xt
    r *= q_max  # exact
    r2 = r.reshape(rows, block_size)
    np.divide(r2, den[:, None], out=r2)  # one correctly rounded division
    if any_bad:
        r2[bad] = 0.0
    np.rint(r, out=r)
    codes8[lo:hi] = r
    sc = scales[lo // block_size:hi // block_size]
    np.multiply(amax, _inv_q(bits), out=sc)
    if any_bad:
        sc[flushed] = 0.0
        sc[nonfinite] = np.nan


def _pack_into(n: int, bits: int, block_size: int, x: np.ndarray | None, pre) -> tuple[np.ndarray, np.ndarray]:
    scales = np.empty(n // block_size, np.float32)
    out = np.empty(n, np.int8) if bits == 8 else np.empty(n // 2, np.uint8)

    def work(lo, hi):
        c8 = out[lo:hi] if bits == 8 else np.empty(hi - lo, np.int8)
        _pack_range(x[lo:hi] if x is not None else None, c8, scales[lo // block_size:hi // block_size], bits,
                    block_size, pre and (lambda a, b, buf: pre(lo + a, lo + b, buf)))
        if bits == 4:  # two codes per byte: element 2j in the low nibble
            nib = (c8.view(np.uint8) & 0xF).reshape(-1, 2)
            np.bitwise_or(nib[:, 0], nib[:, 1] << 4, out=out[lo // 2:hi // 2])
    _over_tiles(n, block_size, work)
    return out, scales


def pack_np(x: np.ndarray, *, bits: int = 8, block_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of `pack`: identical codes and scales bytes (tiles of whole blocks, on the codec thread pool)."""
    _check_bits(bits)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"pack_np takes a 1-D vector, got shape {x.shape}")
    _check_len(x.shape[0], bits, block_size)
    return _pack_into(x.shape[0], bits, block_size, x, None)


def mean_np(acc: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """acc / n in float32 as every ring member computes it: a multiply when 1/n is exact (n a power of two), else a
    division; n = 1 returns acc (into `out` if given)."""
    if n == 1:
        if out is None:
            return acc
        out[...] = acc
        return out
    if n & (n - 1) == 0:
        return np.multiply(acc, np.float32(1.0 / n), out=out, dtype=np.float32)
    return np.divide(acc, np.float32(n), out=out, dtype=np.float32)


def accumulate_pack_np(codes: np.ndarray, scales: np.ndarray, x: np.ndarray, *, bits: int = 8,
                       block_size: int = 256, mean_of: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``pack_np(mean_np(unpack_np(codes, scales) + x, mean_of))`` in one pass per tile, same bytes (`mean_of` = N:
    the ring owner's mean; 1: a plain hop).

    The ring's hop: decode a partial sum, add this member's values in float32, re-pack the new partial sum.
    """
    _check_bits(bits)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.shape[0]
    _check_len(n, bits, block_size)
    codes = np.asarray(codes)
    scales = np.asarray(scales, np.float32)
    if codes.size != n * bits // 8 or scales.size != n // block_size:
        raise ValueError(f"{codes.size} codes / {scales.size} scales do not hold {n} int{bits} elements")

    def pre(lo, hi, buf):
        _unpack_into(codes[lo * bits // 8:hi * bits // 8], scales[lo // block_size:hi // block_size], bits,
                     block_size, buf)
        np.add(buf, x[lo:hi], out=buf)
        mean_np(buf, mean_of, out=buf)

    return _pack_into(n, bits, block_size, None, pre)


# Byte -> its two signed 4-bit codes (low nibble first), as float32: one gather decodes int4.
_INT4_LUT = ((np.stack([np.arange(256) & 0xF, np.arange(256) >> 4], axis=-1) ^ 8) - 8).astype(np.float32)


def _unpack_into(codes, scales, bits: int, block_size: int, out: np.ndarray) -> None:
    c = codes.view(np.int8) if bits == 8 else np.take(_INT4_LUT, codes.view(np.uint8), axis=0)
    with np.errstate(invalid="ignore"):
        np.multiply(c.reshape(-1, block_size), scales[:, None], out=out.reshape(-1, block_size), dtype=np.float32)


def unpack_np(codes, scales, *, bits: int = 8, block_size: int = 256) -> np.ndarray:
    """numpy twin of `unpack`: identical float32 bytes (exact int -> float32, then one float32 multiply)."""
    _check_bits(bits)
    codes = np.asarray(codes)
    scales = np.asarray(scales, np.float32)
    out = np.empty(scales.shape[0] * block_size, np.float32)
    _unpack_into(codes, scales, bits, block_size, out)
    return out
