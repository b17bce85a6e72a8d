"""The reduce's payload codecs (float32 chunk <-> wire bytes) and `Packed`, a vector as an island's device packs it.

``compression="none"`` sends raw fp32; int8 / int4 send blockwise absmax codes + fp32 block scales
(``quant.pack_np``), and a hop's decode + add + re-pack is one fused pass. Every decode refuses non-finite values, so a
peer's bad frame breaks the reduce at the link that received it rather than reaching an accumulator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from intellect_jax import quant  # the numpy twin; imports no jax

from . import wire


class Fp32Codec:
    name = "none"
    bits = 32

    def encode(self, x: np.ndarray) -> list[memoryview]:
        return [memoryview(np.ascontiguousarray(x, np.float32)).cast("B")]

    def decode(self, buf: memoryview, n: int) -> np.ndarray:
        if len(buf) != 4 * n:
            raise wire.MalformedFrame(f"fp32 chunk of {len(buf)} bytes, expected {4 * n}")
        x = np.frombuffer(buf, np.float32, n)
        if not np.isfinite(x).all():
            raise wire.MalformedFrame("fp32 chunk with non-finite values")
        return x

    def accumulate(self, buf: memoryview, x: np.ndarray, mean_of: int = 1) -> list[memoryview]:
        """encode(f(decode(buf) + x)), f = quant.mean_np by `mean_of`."""
        return self.encode(quant.mean_np(self.decode(buf, x.size) + x, mean_of))

    def wire_bytes(self, n: int) -> int:
        return 4 * n

    def roundtrip(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, np.float32)


class BlockCodec:
    """Blockwise absmax int8 or int4 via ``intellect_jax.quant`` (codes then fp32 scales, concatenated).

    The numpy twin runs tile by tile on quant's codec thread pool; a hop's decode + add + re-pack is one fused pass
    (``quant.accumulate_pack_np``), byte for byte the same as ``encode(decode(buf) + x)``.
    """

    def __init__(self, bits: int, block_size: int):
        if bits not in (4, 8) or block_size < 2 or block_size % 2:
            raise ValueError(f"bits must be 4 or 8 and block_size even, got bits={bits}, block_size={block_size}")
        self.name, self.bits, self.block_size = f"int{bits}", bits, block_size

    def encode(self, x: np.ndarray) -> list[memoryview]:
        codes, scales = quant.pack_np(np.ascontiguousarray(x, np.float32), bits=self.bits, block_size=self.block_size)
        return [memoryview(codes).cast("B"), memoryview(scales).cast("B")]

    def _split(self, buf: memoryview, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n % self.block_size or len(buf) != self.wire_bytes(n):
            raise wire.MalformedFrame(f"{self.name} chunk of {len(buf)} bytes for {n} elements, expected "
                                      f"{self.wire_bytes(n)}")
        nbytes = n * self.bits // 8
        codes = np.frombuffer(buf, np.int8 if self.bits == 8 else np.uint8, nbytes)
        scales = np.frombuffer(buf, np.float32, n // self.block_size, offset=nbytes)
        if not np.isfinite(scales).all():
            raise wire.MalformedFrame(f"{self.name} chunk with non-finite block scales")
        return codes, scales

    def decode(self, buf: memoryview, n: int) -> np.ndarray:
        codes, scales = self._split(buf, n)
        return quant.unpack_np(codes, scales, bits=self.bits, block_size=self.block_size)

    def accumulate(self, buf: memoryview, x: np.ndarray, mean_of: int = 1) -> list[memoryview]:
        """encode(f(decode(buf) + x)) in one fused pass, f = quant.mean_np by `mean_of`."""
        codes, scales = quant.accumulate_pack_np(*self._split(buf, x.size), x, bits=self.bits,
                                                 block_size=self.block_size, mean_of=mean_of)
        return [memoryview(codes).cast("B"), memoryview(scales).cast("B")]

    def wire_bytes(self, n: int) -> int:
        return n * self.bits // 8 + 4 * (n // self.block_size)

    def roundtrip(self, x: np.ndarray) -> np.ndarray:
        """decode(encode(x)) on the ring's block grid (blocks from element 0; the tail zero-padded), len(x) back."""
        x = np.asarray(x, np.float32).reshape(-1)
        padded = np.zeros(-(-max(x.size, 1) // self.block_size) * self.block_size, np.float32)
        padded[:x.size] = x
        codes, scales = quant.pack_np(padded, bits=self.bits, block_size=self.block_size)
        return quant.unpack_np(codes, scales, bits=self.bits, block_size=self.block_size)[:x.size]


Codec = Fp32Codec | BlockCodec


def make_codec(compression: str, block_size: int) -> Codec:
    if compression == "none":
        return Fp32Codec()
    if compression in ("int8", "int4"):
        return BlockCodec(int(compression[3:]), block_size)
    raise ValueError(f"compression={compression!r}: expected 'none', 'int8' or 'int4'")


@dataclasses.dataclass(frozen=True)
class Packed:
    """A vector of `n` elements as a BlockCodec carries it: `codes` and fp32 `scales` over whole blocks from element
    0, the last block zero-padded (``quant.pack`` of the vector padded to ``blocks(n) x block_size``). An island
    packs its pseudo-gradient on its own devices into this form (only the codes cross PCIe), and the ring can return
    the mean in it, to be decoded on the device."""

    codes: np.ndarray  # int8 [m] (int8) or uint8 [m // 2] (int4), m = n rounded up to whole blocks
    scales: np.ndarray  # float32 [m // block_size]
    n: int

    def check(self, codec: "Codec") -> None:
        if not isinstance(codec, BlockCodec):
            raise ValueError(f"a packed vector needs an int8/int4 ring, not compression={codec.name!r}")
        m = -(-self.n // codec.block_size) * codec.block_size
        want = np.int8 if codec.bits == 8 else np.uint8
        if (self.codes.dtype != want or self.codes.size != m * codec.bits // 8 or self.scales.dtype != np.float32
                or self.scales.size != m // codec.block_size):
            raise ValueError(f"packed vector of {self.n} elements has {self.codes.size} {self.codes.dtype} codes and "
                             f"{self.scales.size} {self.scales.dtype} scales; {codec.name} with blocks of "
                             f"{codec.block_size} needs {m * codec.bits // 8} {np.dtype(want)} and "
                             f"{m // codec.block_size} float32")

    def parts(self, codec: "BlockCodec", lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Codes and scales of elements [lo, hi) (whole blocks), zero blocks past the end."""
        b, bs = codec.bits, codec.block_size
        m = self.scales.size * bs
        if hi <= m:
            return self.codes[lo * b // 8:hi * b // 8], self.scales[lo // bs:hi // bs]
        codes = np.zeros((hi - lo) * b // 8, self.codes.dtype)
        scales = np.zeros((hi - lo) // bs, np.float32)
        if lo < m:
            codes[:(m - lo) * b // 8] = self.codes[lo * b // 8:]
            scales[:(m - lo) // bs] = self.scales[lo // bs:]
        return codes, scales

    def decode(self, codec: "BlockCodec") -> np.ndarray:
        return quant.unpack_np(self.codes, self.scales, bits=codec.bits, block_size=codec.block_size)[:self.n]
