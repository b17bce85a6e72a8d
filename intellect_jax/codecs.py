"""The wire codecs of the cross-island mean, one class each: ``none`` (raw fp32), ``int8`` and ``int4``.

A codec owns everything that depends on how a float32 vector is carried between islands:

- its packed layout (`Codec.layout`): the dtype and shape of the codes and of the fp32 scales for n elements, what an
  island's device produces and the ring's `Packed` holds;
- its jnp twin (`Codec.pack`, `Codec.unpack`), traced inside jit on the devices (sync.ElasticSync, collective);
- its numpy twin (`Codec.pack_np`, `Codec.unpack_np`, and the ring's `encode` / `decode` / `accumulate` /
  `roundtrip` on wire buffers), which gives the same bytes as the jnp twin (tests/test_codecs.py);
- its wire bytes (`Codec.wire_bytes`).

Vectors are coded on a grid of whole blocks from element 0 (`Codec.padded`; the tail zero-padded). The block codecs
call the kernels of ``intellect_jax.quant`` (its module docstring has the format, the exact rounding and the error
bound); the numerics are theirs. A new codec is one class here, registered in `CODECS` under the name that
``diloco.compression`` takes (config.py reads the names and bit widths from `CODECS`).

Like quant, this module imports no jax at import time: the elastic ring uses the numpy twin in processes that never
start jax; the jnp methods import it when called.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from intellect_jax import quant

if TYPE_CHECKING:
    import jax

Shape = tuple[int, ...]
PackedLayout = tuple[tuple[Shape, np.dtype], tuple[Shape, np.dtype]]  # ((codes shape, dtype), (scales shape, dtype))


def _malformed(msg: str) -> Exception:
    """A wire chunk that does not decode (wrong size, non-finite values or block scales): the ring's frame error,
    imported only when one is raised."""
    from intellect_jax.elastic.wire import MalformedFrame

    return MalformedFrame(msg)


class Codec:
    """The interface. ``name`` is the ``diloco.compression`` value; ``bits`` the bits per element of the codes
    (32: fp32, no scales); ``block_size`` the elements per fp32 scale (1 for fp32: no blocks); ``exact``: decode
    returns the input bit for bit."""

    name: ClassVar[str]
    bits: ClassVar[int]
    exact: ClassVar[bool] = False
    codes_dtype: ClassVar[np.dtype]
    block_size: int

    # ---- layout and sizes

    def padded(self, n: int) -> int:
        """Elements on the codec's grid for a vector of n: n rounded up to whole blocks."""
        return quant.padded_size(n, self.block_size)

    def codes_size(self, m: int) -> int:
        """Entries of the codes array for m elements on the grid (m a multiple of block_size)."""
        return m * self.bits // (8 * self.codes_dtype.itemsize)

    def scales_size(self, m: int) -> int:
        """float32 scales for m elements on the grid."""
        raise NotImplementedError

    def layout(self, n: int) -> PackedLayout:
        """((codes shape, dtype), (scales shape, dtype)) of a vector of n elements packed (`Packed`, `pack`)."""
        m = self.padded(n)
        return ((self.codes_size(m),), self.codes_dtype), ((self.scales_size(m),), np.dtype(np.float32))

    def wire_bytes(self, n: int) -> int:
        """Bytes on the wire for n elements (codes plus scales, n padded to whole blocks)."""
        m = self.padded(n)
        return self.codes_size(m) * self.codes_dtype.itemsize + 4 * self.scales_size(m)

    # ---- jnp twin (inside jit, on the devices)

    def pack(self, v) -> tuple[jax.Array, jax.Array]:
        """A flat float32 vector of any length -> (codes, scales) in `layout(len(v))`, the tail zero-padded."""
        raise NotImplementedError

    def unpack(self, codes, scales, n: int | None = None) -> jax.Array:
        """(codes, scales) from `pack` -> float32, the first n elements (all of the grid if n is None)."""
        raise NotImplementedError

    # ---- numpy twin (the host ring)

    def pack_np(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """numpy twin of `pack`: the same bytes."""
        raise NotImplementedError

    def unpack_np(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """numpy twin of `unpack` over the whole grid: the same bytes."""
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> list[memoryview]:
        """A chunk (len a multiple of block_size) -> its wire buffers (codes, then scales)."""
        raise NotImplementedError

    def split(self, buf: memoryview, n: int) -> tuple[np.ndarray, np.ndarray]:
        """A wire chunk of n elements -> (codes, scales) views; wire.MalformedFrame if it does not decode."""
        raise NotImplementedError

    def decode(self, buf: memoryview, n: int) -> np.ndarray:
        """A wire chunk of n elements -> float32 [n]."""
        return self.unpack_np(*self.split(buf, n))

    def accumulate(self, buf: memoryview, x: np.ndarray, mean_of: int = 1) -> list[memoryview]:
        """encode(f(decode(buf) + x)), f = quant.mean_np by `mean_of` (the ring's hop)."""
        return self.encode(quant.mean_np(self.decode(buf, x.size) + x, mean_of))

    def roundtrip(self, x: np.ndarray) -> np.ndarray:
        """decode(encode(x)) on the codec's grid (blocks from element 0; the tail zero-padded), len(x) back."""
        x = np.asarray(x, np.float32).reshape(-1)
        return self.unpack_np(*self.pack_np(x))[:x.size]


def _views(*arrays: np.ndarray) -> list[memoryview]:
    return [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays]


class Fp32Codec(Codec):
    """``none``: raw float32, no scales (codes = the values). Exact; the baseline."""

    name, bits, exact, codes_dtype = "none", 32, True, np.dtype(np.float32)

    def __init__(self, block_size: int | None = None):
        self.block_size = 1  # no blocks: `block_size` is accepted (make_codec passes one) and not used

    def scales_size(self, m: int) -> int:
        return 0

    def pack(self, v):
        import jax.numpy as jnp

        return jnp.asarray(v, jnp.float32).reshape(-1), jnp.zeros((0,), jnp.float32)

    def unpack(self, codes, scales, n: int | None = None):
        import jax.numpy as jnp

        out = jnp.asarray(codes, jnp.float32)
        return out if n is None else out[:n]

    def pack_np(self, x):
        return np.array(x, np.float32).reshape(-1), np.zeros(0, np.float32)

    def unpack_np(self, codes, scales):
        return np.asarray(codes, np.float32)

    def encode(self, x):
        return _views(np.asarray(x, np.float32))

    def split(self, buf, n):
        if len(buf) != 4 * n:
            raise _malformed(f"fp32 chunk of {len(buf)} bytes, expected {4 * n}")
        x = np.frombuffer(buf, np.float32, n)
        if not np.isfinite(x).all():
            raise _malformed("fp32 chunk with non-finite values")
        return x, np.zeros(0, np.float32)

    def roundtrip(self, x):
        return np.array(x, np.float32)


class BlockCodec(Codec):
    """Blockwise absmax int8 or int4 via ``intellect_jax.quant`` (codes then fp32 scales, concatenated on the wire).

    The numpy twin runs tile by tile on quant's codec thread pool; a hop's decode + add + re-pack is one fused pass
    (``quant.accumulate_pack_np``), byte for byte the same as ``encode(decode(buf) + x)``. The jnp twin is
    ``quant.pack_padded`` (the device's fastest route to the bytes of ``quant.pack``) and ``quant.unpack``.
    """

    def __init__(self, block_size: int):
        per_byte = 8 // self.bits  # int4: two codes per byte, so a block holds whole bytes only if it is even
        if block_size < 1 or block_size % per_byte:
            raise ValueError(f"{self.name} needs a block_size that is a positive multiple of {per_byte}, got "
                             f"{block_size}")
        self.block_size = block_size

    def scales_size(self, m: int) -> int:
        return m // self.block_size

    def pack(self, v):
        return quant.pack_padded(v, bits=self.bits, block_size=self.block_size)

    def unpack(self, codes, scales, n: int | None = None):
        out = quant.unpack(codes, scales, bits=self.bits, block_size=self.block_size)
        return out if n is None else out[:n]

    def pack_np(self, x):
        x = np.asarray(x, np.float32).reshape(-1)
        m = self.padded(x.size)
        if m != x.size:
            x = np.concatenate([x, np.zeros(m - x.size, np.float32)])
        return quant.pack_np(x, bits=self.bits, block_size=self.block_size)

    def unpack_np(self, codes, scales):
        return quant.unpack_np(codes, scales, bits=self.bits, block_size=self.block_size)

    def encode(self, x):
        return _views(*quant.pack_np(np.ascontiguousarray(x, np.float32), bits=self.bits,
                                     block_size=self.block_size))

    def split(self, buf, n):
        if n % self.block_size or len(buf) != self.wire_bytes(n):
            raise _malformed(f"{self.name} chunk of {len(buf)} bytes for {n} elements, expected "
                                 f"{self.wire_bytes(n)}")
        nbytes = self.codes_size(n)
        codes = np.frombuffer(buf, self.codes_dtype, nbytes)
        scales = np.frombuffer(buf, np.float32, self.scales_size(n), offset=nbytes)
        if not np.isfinite(scales).all():
            raise _malformed(f"{self.name} chunk with non-finite block scales")
        return codes, scales

    def accumulate(self, buf, x, mean_of: int = 1):
        """encode(f(decode(buf) + x)) in one fused pass, f = quant.mean_np by `mean_of`."""
        return _views(*quant.accumulate_pack_np(*self.split(buf, x.size), x, bits=self.bits,
                                                block_size=self.block_size, mean_of=mean_of))


class Int8Codec(BlockCodec):
    """``int8``: int8 [m] codes, one fp32 scale per block."""

    name, bits, codes_dtype = "int8", 8, np.dtype(np.int8)


class Int4Codec(BlockCodec):
    """``int4``: uint8 [m // 2] codes (two 4-bit codes per byte, element 2j in the low nibble), one fp32 scale per
    block."""

    name, bits, codes_dtype = "int4", 4, np.dtype(np.uint8)


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Fp32Codec, Int8Codec, Int4Codec)}


def make_codec(compression: str, block_size: int) -> Codec:
    """The codec named by ``diloco.compression``, on blocks of `block_size` elements."""
    if compression not in CODECS:
        raise ValueError(f"compression={compression!r}: expected one of {', '.join(map(repr, CODECS))}")
    return CODECS[compression](block_size)


@dataclasses.dataclass(frozen=True)
class Packed:
    """A vector of `n` elements in a codec's packed layout: `codes` and fp32 `scales` over whole blocks from element
    0, the last block zero-padded (`Codec.pack` of the vector). An island packs its pseudo-gradient on its own devices
    into this form (only the codes cross PCIe), and the ring can return the mean in it, to be decoded on the device.
    Only the block codecs carry it (an fp32 ring moves the vector itself)."""

    codes: np.ndarray  # Codec.layout(n)[0]: int8 [m] (int8) or uint8 [m // 2] (int4), m = n on whole blocks
    scales: np.ndarray  # float32 [m // block_size]
    n: int

    def check(self, codec: Codec) -> None:
        if not isinstance(codec, BlockCodec):
            raise ValueError(f"a packed vector needs an int8/int4 ring, not compression={codec.name!r}")
        (cs, cd), (ss, sd) = codec.layout(self.n)
        if (self.codes.dtype != cd or self.codes.size != cs[0] or self.scales.dtype != sd
                or self.scales.size != ss[0]):
            raise ValueError(f"packed vector of {self.n} elements has {self.codes.size} {self.codes.dtype} codes and "
                             f"{self.scales.size} {self.scales.dtype} scales; {codec.name} with blocks of "
                             f"{codec.block_size} needs {cs[0]} {cd} and {ss[0]} {sd}")

    def parts(self, codec: Codec, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Codes and scales of elements [lo, hi) (whole blocks), zero blocks past the end."""
        c, s = codec.codes_size, codec.scales_size
        m = codec.padded(self.n)
        if hi <= m:
            return self.codes[c(lo):c(hi)], self.scales[s(lo):s(hi)]
        codes = np.zeros(c(hi) - c(lo), self.codes.dtype)
        scales = np.zeros(s(hi) - s(lo), np.float32)
        if lo < m:
            codes[:c(m) - c(lo)] = self.codes[c(lo):]
            scales[:s(m) - s(lo)] = self.scales[s(lo):]
        return codes, scales

    def decode(self, codec: Codec) -> np.ndarray:
        return codec.unpack_np(self.codes, self.scales)[:self.n]
