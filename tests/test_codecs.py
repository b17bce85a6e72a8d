"""The wire codecs (intellect_jax.codecs): for every codec the numpy and jnp twins give the same bytes, the packed
layout is what the codec produces, wire_bytes counts the bytes it really encodes, and the roundtrip stays within its
error bound."""

import jax
import numpy as np
import pytest

from intellect_jax import codecs, config, quant
from intellect_jax.elastic import ring, wire

BLOCK = 64
SIZES = [1, 63, 64, 65, 1000, 4 * BLOCK + 7]  # incl. non-multiples of the block size
NAMES = list(codecs.CODECS)


def _vector(n: int, seed: int) -> np.ndarray:
    """Values over several orders of magnitude, a zero block and ties-prone integers, so codes differ per block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * np.float32(10.0) ** rng.integers(-6, 3, n).astype(np.float32)
    x[:min(n, BLOCK) // 2] = 0.0
    if n > 2 * BLOCK:
        x[BLOCK:2 * BLOCK] = rng.integers(-127, 128, BLOCK).astype(np.float32)  # absmax 127: codes = values
    return x


@pytest.fixture(scope="module", params=NAMES)
def codec(request):
    return codecs.make_codec(request.param, BLOCK)


@pytest.mark.parametrize("n", SIZES)
def test_numpy_and_jnp_twins_give_the_same_bytes_in_the_packed_layout(codec, n):
    x = _vector(n, n)
    codes, scales = codec.pack_np(x)
    jcodes, jscales = jax.jit(codec.pack)(x)
    (cs, cd), (ss, sd) = codec.layout(n)
    for a in (codes, np.asarray(jcodes)):
        assert a.shape == cs and a.dtype == cd
    for a in (scales, np.asarray(jscales)):
        assert a.shape == ss and a.dtype == sd
    assert np.asarray(jcodes).tobytes() == codes.tobytes()
    assert np.asarray(jscales).tobytes() == scales.tobytes()
    back = codec.unpack_np(codes, scales)
    assert back.shape == (codec.padded(n),) and back.dtype == np.float32
    assert np.asarray(jax.jit(codec.unpack)(jcodes, jscales)).tobytes() == back.tobytes()
    assert np.asarray(jax.jit(codec.unpack, static_argnums=2)(jcodes, jscales, n)).tobytes() == back[:n].tobytes()
    assert codec.roundtrip(x).tobytes() == back[:n].tobytes()
    if not codec.exact:  # the block codecs are quant's kernels, unchanged
        assert codes.tobytes() == quant.pack_np(np.pad(x, (0, codec.padded(n) - n)), bits=codec.bits,
                                                block_size=BLOCK)[0].tobytes()


@pytest.mark.parametrize("n", SIZES)
def test_wire_bytes_is_what_encode_sends(codec, n):
    x = _vector(n, 7 * n)
    m = codec.padded(n)
    codes, scales = codec.pack_np(x)
    assert codec.wire_bytes(n) == codes.nbytes + scales.nbytes
    grid = np.pad(x, (0, m - n))
    blob = b"".join(bytes(p) for p in codec.encode(grid))
    assert len(blob) == codec.wire_bytes(m) == codec.wire_bytes(n)
    assert blob == codes.tobytes() + scales.tobytes()  # the wire is the packed layout: codes, then scales
    c2, s2 = codec.split(memoryview(blob), m)
    assert c2.tobytes() == codes.tobytes() and s2.tobytes() == scales.tobytes()
    assert codec.decode(memoryview(blob), m).tobytes() == codec.unpack_np(codes, scales).tobytes()
    with pytest.raises(wire.MalformedFrame):
        codec.decode(memoryview(blob[:-4]), m)


def test_wire_bytes_by_formula():
    for n in SIZES:
        m = quant.padded_size(n, BLOCK)
        assert codecs.make_codec("none", BLOCK).wire_bytes(n) == 4 * n
        assert codecs.make_codec("int8", BLOCK).wire_bytes(n) == m + 4 * (m // BLOCK)
        assert codecs.make_codec("int4", BLOCK).wire_bytes(n) == m // 2 + 4 * (m // BLOCK)
        for name in ("int8", "int4"):
            assert codecs.make_codec(name, BLOCK).wire_bytes(n) == quant.payload_bytes(
                n, bits=config.COMPRESSION_BITS[name], block_size=BLOCK)


@pytest.mark.parametrize("n", SIZES)
def test_roundtrip_error_within_half_a_step(codec, n):
    x = _vector(n, 3 * n + 1)
    codes, scales = codec.pack_np(x)
    err = np.abs(codec.roundtrip(x).astype(np.float64) - x)
    if codec.exact:
        assert err.max() == 0
        return
    # Per element: half a step, plus quant's allowance for rounding the scale: |x - decode| <= scale (1/2 + 2**-15).
    bound = quant.error_bound(scales, block_size=BLOCK)[:n]
    assert (err <= bound).all(), (err - bound).max()
    q = quant.qmax(codec.bits)
    assert (np.abs(codes.view(np.int8)) <= q).all() if codec.bits == 8 else True
    if n > 2 * BLOCK:  # the integer block: absmax 127 -> step 127 / Q; int8 codes it exactly, int4 does not
        block = slice(BLOCK, 2 * BLOCK)
        assert (err[block].max() == 0) == (codec.bits == 8)
        assert err[block].max() <= 127 / q / 2 * (1 + 2**-14)
    if n >= BLOCK:
        assert (err[:BLOCK // 2] == 0).all()  # zeros stay zeros


def test_accumulate_is_encode_of_the_decoded_sum(codec):
    m = 4 * BLOCK
    a, b = _vector(m, 1), _vector(m, 2)
    blob = memoryview(b"".join(bytes(p) for p in codec.encode(a)))
    for mean_of in (1, 2, 3):
        got = b"".join(bytes(p) for p in codec.accumulate(blob, b, mean_of=mean_of))
        want = b"".join(bytes(p) for p in codec.encode(quant.mean_np(codec.decode(blob, m) + b, mean_of)))
        assert got == want


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_packed_is_the_layout_and_parts_pad_with_zero_blocks(name):
    codec, n = codecs.make_codec(name, BLOCK), 3 * BLOCK + 5
    x = _vector(n, 5)
    p = codecs.Packed(*codec.pack_np(x), n)
    p.check(codec)
    assert p.decode(codec).tobytes() == codec.roundtrip(x).tobytes()
    m = codec.padded(n)  # 4 blocks
    codes, scales = p.parts(codec, 2 * BLOCK, m + 2 * BLOCK)  # two blocks inside, two past the end
    assert codes.size == codec.codes_size(4 * BLOCK) and codes.dtype == p.codes.dtype and scales.size == 4
    assert not codes[codec.codes_size(2 * BLOCK):].any() and not scales[2:].any()
    decoded = codec.unpack_np(codes, scales)
    assert decoded[:2 * BLOCK].tobytes() == codec.unpack_np(p.codes, p.scales)[2 * BLOCK:].tobytes()
    assert not decoded[2 * BLOCK:].any()
    other = codecs.make_codec("int4" if name == "int8" else "int8", BLOCK)
    with pytest.raises(ValueError, match="packed vector"):
        p.check(other)
    with pytest.raises(ValueError, match="needs an int8/int4 ring"):
        p.check(codecs.make_codec("none", BLOCK))


def test_registry_names_and_errors():
    assert config.COMPRESSIONS == tuple(codecs.CODECS) == ("none", "int8", "int4")
    assert {k: c.bits for k, c in codecs.CODECS.items()} == {"none": 32, "int8": 8, "int4": 4}
    assert ring.make_codec is codecs.make_codec and ring.Packed is codecs.Packed  # the ring re-exports them
    with pytest.raises(ValueError, match="expected one of"):
        codecs.make_codec("int2", BLOCK)
    with pytest.raises(ValueError, match="multiple of 2"):
        codecs.make_codec("int4", 63)
    assert codecs.make_codec("int8", 63).wire_bytes(63) == 63 + 4
