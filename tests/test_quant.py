"""quant: exact codes, the jnp/numpy twins give the same bytes, round-trip error within the derived bound."""

import math
from fractions import Fraction

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from intellect_jax import quant

BLOCK = 256
F32_MIN_NORMAL = np.finfo(np.float32).tiny


def _bits_of(a):
    return np.asarray(a).view(np.uint32 if np.asarray(a).dtype == np.float32 else np.uint8)


def _edge_case_vector(rng, block=BLOCK):
    """One block per edge case, then random blocks at many scales."""
    blocks = []
    blocks.append(np.zeros(block))                                          # all zero: scale 0, no NaN
    z = np.zeros(block); z[::2] = -0.0; blocks.append(z)                    # negative zeros
    t = np.zeros(block); t[0] = 127.0; t[1:11] = np.arange(10) + 0.5        # exact ties 0.5 .. 9.5 -> even
    t[11:21] = -(np.arange(10) + 0.5); blocks.append(t)
    t = np.full(block, 2.5); t[0] = -127.0; blocks.append(t)                # all ties, negative absmax
    for a in (21.0, 7.0 * 2.0**-30 * 5):                                    # int4 ties: 7 x / a = k + 1/2
        t = np.zeros(block); t[0] = a; t[1:15] = (np.arange(-7, 7) + 0.5) * (a / 7.0); blocks.append(t)
    for a in (381.0, 635.0, 381.0 * 2.0**-20, 127.0 * 1.25):                # ties where Q / a is inexact
        t = np.zeros(block); t[0] = a; k = np.arange(-60, 60) + 0.5
        t[1:121] = k * (a / 127.0); blocks.append(t)
    blocks.append(rng.standard_normal(block) * 3e38 / 4)                    # near float32 max
    big = rng.standard_normal(block); big[5] = np.finfo(np.float32).max; blocks.append(big)
    tiny = rng.standard_normal(block) * 1e-30; blocks.append(tiny)          # small but kept (> 2**-100)
    blocks.append(rng.standard_normal(block) * 1e-32)                       # below 2**-100: flushed to 0
    sub = rng.standard_normal(block) * F32_MIN_NORMAL; blocks.append(sub)   # subnormals: flushed
    mixed = rng.standard_normal(block) * 10.0 ** rng.uniform(-40, 3, block)  # huge dynamic range in one block
    blocks.append(mixed)
    one = np.zeros(block); one[7] = -1e-3; blocks.append(one)               # single nonzero
    near = np.full(block, 1.0); near[0] = 127.0
    near[1:] = np.nextafter(np.float32(1.5), np.float32(0)); blocks.append(near)  # just below a tie
    for e in rng.integers(-60, 60, 20):
        blocks.append(rng.standard_normal(block) * 2.0 ** e)
    blocks.append(rng.uniform(-1, 1, block))
    return np.concatenate(blocks).astype(np.float32)


def _exact_codes(x, bits, block=BLOCK):
    """Oracle: round_half_even(Q x / absmax) in exact rational arithmetic (Python's round is half-even)."""
    q = quant.qmax(bits)
    out = []
    for blk in x.reshape(-1, block):
        a = max(abs(Fraction(float(v))) for v in blk)
        if a < Fraction(quant.FLUSH_BELOW):
            out.extend([0] * block)
        else:
            out.extend(round(q * Fraction(float(v)) / a) for v in blk)
    return np.array(out)


def _decode_codes_np(codes, bits, n):
    return quant.unpack_np(codes, np.ones(n // BLOCK, np.float32), bits=bits, block_size=BLOCK).astype(np.int64)


@pytest.fixture(scope="module")
def edge_x():
    return _edge_case_vector(np.random.default_rng(0))


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_are_exactly_rounded(edge_x, bits):
    codes, scales = quant.pack_np(edge_x, bits=bits)
    np.testing.assert_array_equal(_decode_codes_np(codes, bits, edge_x.size), _exact_codes(edge_x, bits))
    # Ties go to even: block 2 holds 127 then 0.5 .. 9.5 (int8: Q x / a = x exactly).
    if bits == 8:
        np.testing.assert_array_equal(_decode_codes_np(codes, 8, edge_x.size)[2 * BLOCK + 1: 2 * BLOCK + 11],
                                      [0, 2, 2, 4, 4, 6, 6, 8, 8, 10])


@pytest.mark.parametrize("bits", [8, 4])
def test_jnp_and_numpy_twins_give_same_bytes(edge_x, bits):
    rng = np.random.default_rng(1)
    for x in (edge_x, rng.standard_normal(BLOCK * 128).astype(np.float32)):
        c_np, s_np = quant.pack_np(x, bits=bits)
        c_j, s_j = jax.jit(lambda v: quant.pack(v, bits=bits))(x)
        assert c_j.dtype == c_np.dtype == (np.int8 if bits == 8 else np.uint8)
        assert c_np.shape == (x.size * bits // 8,) and s_np.shape == (x.size // BLOCK,) and s_np.dtype == np.float32
        # Eager (op by op) too, on the edge cases only: XLA must not be able to change a byte by fusing differently.
        eager = [quant.pack(jnp.asarray(x), bits=bits)] if x is edge_x else []
        # And the device's own route (on a GPU the Pallas kernel: run there with JAX_PLATFORMS=cuda).
        padded = jax.jit(lambda v: quant.pack_padded(v, bits=bits))(x)
        # The float64 routes through XLA.
        f64 = [jax.jit(lambda v: quant.pack(v, bits=bits, route="fix"))(x)]
        for c, s in [(c_j, s_j), padded, *f64] + eager:
            np.testing.assert_array_equal(_bits_of(c), _bits_of(c_np))
            np.testing.assert_array_equal(_bits_of(s), _bits_of(s_np))
        y_np = quant.unpack_np(c_np, s_np, bits=bits)
        y_j = jax.jit(lambda c, s: quant.unpack(c, s, bits=bits))(c_np, s_np)
        np.testing.assert_array_equal(_bits_of(y_j), _bits_of(y_np))


def _tiled_vector(edge_x):
    """More than the codec's parallel threshold, the edge-case blocks repeated at tile borders and spread out."""
    rng = np.random.default_rng(5)
    n = quant._NP_MIN_PARALLEL + 3 * quant._NP_TILE + 7 * BLOCK
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n // BLOCK).repeat(BLOCK)).astype(np.float32)
    for at in (0, quant._NP_TILE - BLOCK * 3, 2 * quant._NP_TILE + BLOCK * 5, n - edge_x.size):
        x[at:at + edge_x.size] = edge_x
    return x


@pytest.mark.parametrize("bits", [8, 4])
def test_tiled_threaded_numpy_pack_equals_jnp_and_does_not_depend_on_threads(edge_x, bits, monkeypatch):
    x = _tiled_vector(edge_x)
    c_j, s_j = jax.jit(lambda v: quant.pack(v, bits=bits))(x)
    for threads in ("1", "3"):
        monkeypatch.setenv("INTELLECT_JAX_CODEC_THREADS", threads)
        c, s = quant.pack_np(x, bits=bits)
        np.testing.assert_array_equal(_bits_of(c), _bits_of(c_j))
        np.testing.assert_array_equal(_bits_of(s), _bits_of(s_j))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mean_of", [1, 3, 4])
def test_fused_accumulate_pack_equals_decode_add_pack(edge_x, bits, mean_of, monkeypatch):
    """The ring's hop in one pass: the same bytes as unpack, + x, (mean), pack; overflow to Inf and NaN included."""
    x = _tiled_vector(edge_x)
    y = np.random.default_rng(6).permutation(x)
    y[BLOCK * 9 + 3] = np.nan
    x[BLOCK * 12:BLOCK * 13] = np.float32(3e38)
    y[BLOCK * 12:BLOCK * 13] = np.float32(3e38)  # sum overflows to Inf: that block's scale becomes NaN
    codes, scales = quant.pack_np(x, bits=bits)
    with np.errstate(over="ignore", invalid="ignore"):
        acc = quant.unpack_np(codes, scales, bits=bits) + y
        if mean_of > 1:
            acc = acc * np.float32(1 / mean_of) if mean_of == 4 else acc / np.float32(mean_of)
    c_ref, s_ref = quant.pack_np(acc, bits=bits)
    assert np.isnan(s_ref[9]) and np.isnan(s_ref[12]) and np.isfinite(s_ref[13])
    for threads in ("1", "2"):
        monkeypatch.setenv("INTELLECT_JAX_CODEC_THREADS", threads)
        c, s = quant.accumulate_pack_np(codes, scales, y, bits=bits, mean_of=mean_of)
        np.testing.assert_array_equal(_bits_of(c), _bits_of(c_ref))
        np.testing.assert_array_equal(_bits_of(s), _bits_of(s_ref))
    with pytest.raises(ValueError, match="do not hold"):
        quant.accumulate_pack_np(codes[:-BLOCK], scales, y, bits=bits)


def _pack_in_child(x, q):
    q.put(quant.pack_np(x)[0].tobytes())


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child runs numpy only, never jax
def test_a_forked_child_packs_on_its_own_pool(edge_x):
    """The parent's pool threads do not exist after fork: a child must not queue work on them (it would hang)."""
    import multiprocessing as mp

    x = _tiled_vector(edge_x)
    want = quant.pack_np(x)[0].tobytes()  # the parent's pool is up
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_pack_in_child, args=(x, q))
    p.start()
    try:
        assert q.get(timeout=60) == want
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()


def test_codec_threads_env_is_checked(monkeypatch):
    monkeypatch.setenv("INTELLECT_JAX_CODEC_THREADS", "zero")
    with pytest.raises(ValueError, match="INTELLECT_JAX_CODEC_THREADS"):
        quant.np_codec_threads()


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_within_derived_bound(edge_x, bits):
    rng = np.random.default_rng(2)
    for x in (edge_x, rng.standard_normal(BLOCK * 256).astype(np.float32)):
        c, s = quant.pack_np(x, bits=bits)
        y = quant.unpack_np(c, s, bits=bits)
        err = np.abs(y.astype(np.float64) - x.astype(np.float64))
        bound = quant.error_bound(s, block_size=BLOCK).astype(np.float64)
        assert np.all(err <= bound), np.max(err / bound)
    # The bound is not vacuous: on random data some element comes close to scale / 2.
    assert np.max(err / bound) > 0.9


def test_scales_are_absmax_over_q(edge_x):
    c, s = quant.pack_np(edge_x, bits=8)
    a = np.abs(edge_x.reshape(-1, BLOCK)).max(axis=1)
    expect = np.where(a < quant.FLUSH_BELOW, 0, a * np.float32(1 / 127)).astype(np.float32)
    np.testing.assert_array_equal(s, expect)
    a64 = a.astype(np.float64) / 127.0  # |RN(a RN(1/127)) - a/127| <= (2**-23 + 2**-48) a/127 for unflushed blocks
    assert np.all(np.abs(s - a64)[s > 0] <= ((2.0**-23 + 2.0**-48) * a64)[s > 0])
    assert s[0] == 0 and s[1] == 0 and np.all(np.isfinite(s))  # zero blocks: scale 0, never NaN
    y = quant.unpack_np(c, s)
    assert np.all(y[:2 * BLOCK] == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_block_is_marked_and_isolated(bad):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(BLOCK * 4).astype(np.float32)
    x_bad = x.copy()
    x_bad[BLOCK + 17] = bad
    for pack_fn in (quant.pack_np, jax.jit(quant.pack)):
        c, s = (np.asarray(a) for a in pack_fn(x_bad))
        c0, s0 = quant.pack_np(x)
        assert np.isnan(s[1]) and np.all(c[BLOCK:2 * BLOCK] == 0)
        keep = np.r_[0:BLOCK, 2 * BLOCK:4 * BLOCK]
        np.testing.assert_array_equal(c[keep], c0[keep])
        np.testing.assert_array_equal(s[[0, 2, 3]], s0[[0, 2, 3]])
        assert bool(quant.has_nonfinite(s)) and not bool(quant.has_nonfinite(s0))
        y = quant.unpack_np(c, s)
        assert np.all(np.isnan(y[BLOCK:2 * BLOCK])) and np.all(np.isfinite(y[keep]))


def test_int4_nibble_layout():
    x = np.zeros(BLOCK, np.float32)
    x[:4] = [7.0, -7.0, 1.0, -3.0]  # absmax 7 -> codes equal the values
    c, s = quant.pack_np(x, bits=4, block_size=BLOCK)
    assert c.dtype == np.uint8 and c.shape == (BLOCK // 2,)
    assert s[0] == np.float32(7) * np.float32(1 / 7)
    assert c[0] == (7 | (0x9 << 4))   # low nibble: element 0 (7), high: element 1 (-7 = 0b1001)
    assert c[1] == (1 | (0xD << 4))   # 1, -3 = 0b1101
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: quant.pack(v, bits=4))(x)[0]), c)


def _float_divisions(fn, *args):
    """Float div/rem equations anywhere in fn's jaxpr, nested jaxprs (jit, vmap bodies...) included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("div", "rem") and any(
                    jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars):
                found.append(eqn)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _near_ties(rng, bits, blocks=48, block=BLOCK):
    """Blocks of values within a few ulps of the rounding boundaries k + 1/2 of Q x / a, for absmax a at random
    mantissas and exponents from just above FLUSH_BELOW to near float32's largest."""
    q = quant.qmax(bits)
    out = []
    for e in rng.integers(-99, 127, blocks):
        a = np.float32(rng.uniform(1, 2) * 2.0 ** e)
        k = rng.integers(-q, q, block).astype(np.float64)
        x = ((k + 0.5) * (np.float64(a) / q)).astype(np.float32)
        steps = rng.integers(-3, 4, block)
        for _ in range(3):  # a few ulps either way (nextafter one ulp at a time)
            x = np.where(steps > 0, np.nextafter(x, np.float32(np.inf)), np.where(
                steps < 0, np.nextafter(x, np.float32(-np.inf)), x)).astype(np.float32)
            steps = steps - np.sign(steps)
        x[0] = a  # the block's absmax
        out.append(np.clip(x, -a, a))
    return np.concatenate(out).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4])
def test_routes_are_exactly_rounded_near_ties(bits):
    x = _near_ties(np.random.default_rng(7), bits)
    want = _exact_codes(x, bits)
    for route in ("u32", "fix"):
        codes, _ = jax.jit(lambda v, r=route: quant.pack(v, bits=bits, route=r))(x)
        np.testing.assert_array_equal(_decode_codes_np(np.asarray(codes), bits, x.size), want, err_msg=route)
    with pytest.raises(ValueError, match="route"):
        quant.pack(jnp.asarray(x), bits=bits, route="f32")


def test_pack_has_no_float_division():
    """Codes must not depend on float32 division, which XLA:GPU does not round correctly (openxla/xla#37181)."""
    x = jnp.ones(BLOCK * 2, jnp.float32)
    assert _float_divisions(lambda v: jax.jit(lambda w: w / 3.0)(v), x)  # the detector sees through jit
    for bits in (8, 4):
        assert not _float_divisions(lambda v: quant.pack(v, bits=bits), x)


def test_xla_cpu_division_matches_numpy_except_subnormals():
    """Recorded facts behind the design. On CPU, XLA f32 division is IEEE for normal results but flushes subnormal
    results to zero (numpy does not); on GPU it is not even correctly rounded (div.full.f32). Hence pack uses
    integer arithmetic for the codes and keeps every float result normal."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU fact; XLA:GPU uses div.full.f32")
    rng = np.random.default_rng(4)
    a = (rng.standard_normal(1 << 16) * 10.0 ** rng.uniform(-30, 30, 1 << 16)).astype(np.float32)
    b = (rng.standard_normal(1 << 16) * 10.0 ** rng.uniform(-30, 30, 1 << 16)).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        ref = a / b
    got = np.asarray(jax.jit(jnp.divide)(a, b))
    subnormal = (ref != 0) & (np.abs(ref) < F32_MIN_NORMAL)
    assert subnormal.sum() > 100
    np.testing.assert_array_equal(_bits_of(got[~subnormal]), _bits_of(ref[~subnormal]))
    assert np.all(got[subnormal] == 0)  # flushed: this is why no scale or decoded value may be subnormal


def test_sizes():
    assert quant.padded_size(0, 256) == 0
    assert quant.padded_size(1, 256) == 256
    assert quant.padded_size(256, 256) == 256
    assert quant.padded_size(257, 256, multiple=4) == 1024
    assert quant.payload_bytes(1024, bits=8, block_size=256) == 1024 + 16
    assert quant.payload_bytes(1000, bits=8, block_size=256) == 1024 + 16
    assert quant.payload_bytes(1024, bits=4, block_size=256) == 512 + 16
    assert quant.payload_bytes(1000, bits=32, block_size=256) == 4000
    with pytest.raises(ValueError):
        quant.pack(jnp.ones(100), bits=8, block_size=256)
    with pytest.raises(ValueError):
        quant.pack_np(np.ones(256, np.float32), bits=3)


@pytest.mark.parametrize("bits", [8, 4])
def test_pallas_pack_kernel_gives_the_same_bytes(edge_x, bits):
    """The GPU kernel (run by Pallas's interpreter here) against the numpy reference, edge cases included, for a
    tile size that splits the vector and one where the edge blocks straddle tiles."""
    x = np.concatenate([edge_x, edge_x[::-1]])
    x = np.concatenate([x, np.zeros(8 * BLOCK - x.size % (8 * BLOCK), np.float32)])
    c_np, s_np = quant.pack_np(x, bits=bits)
    for rows, route in [(8, "u32"), (math.gcd(x.size // BLOCK, 64), "u32"), (16, "fix")]:
        c, s = quant.pack_pallas(jnp.asarray(x), bits=bits, rows=rows, route=route, interpret=True)
        assert c.dtype == c_np.dtype
        np.testing.assert_array_equal(_bits_of(c), _bits_of(c_np))
        np.testing.assert_array_equal(_bits_of(s), _bits_of(s_np))
    with pytest.raises(ValueError, match="tiles of"):
        quant.pack_pallas(jnp.asarray(x[:-BLOCK]), bits=bits, rows=8, interpret=True)


def test_pack_padded_takes_the_pallas_kernel_on_gpus(monkeypatch):
    x = jax.random.normal(jax.random.key(3), (BLOCK * 9 + 17,))
    # Force the GPU route (the Pallas kernel on a tile-padded vector, sliced back) through the interpreter.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    real, calls = quant.pack_pallas, []
    monkeypatch.setattr(quant, "pack_pallas", lambda v, **kw: calls.append(kw) or real(v, interpret=True, **kw))
    for bits in (8, 4):
        got = quant.pack_padded(x, bits=bits)
        want = quant.pack(jnp.pad(x, (0, BLOCK - 17)), bits=bits)
        assert got[0].shape == want[0].shape and got[1].shape == (10,)
        np.testing.assert_array_equal(_bits_of(got[0]), _bits_of(want[0]))
        np.testing.assert_array_equal(_bits_of(got[1]), _bits_of(want[1]))
    assert [(c["bits"], c["route"]) for c in calls] == [(8, "fix"), (4, "fix")]
