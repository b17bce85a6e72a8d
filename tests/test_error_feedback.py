"""int4 payloads and error feedback in training: the residual carries exactly (hand-computed), what each island sent
is what the collective moved, only packed 4-bit codes cross the island axis, the ring carries int4 bit-identically,
and the bad configurations are refused by name."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from intellect_jax import collective, diloco, quant
from intellect_jax.config import COMPRESSION_BITS, ConfigError
from intellect_jax.elastic import ring
from intellect_jax.train_step import TrainState
from tests.helpers import tiny_config

AXES = ("island", "data", "fsdp", "tensor")


def _mesh(shape):
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), AXES)


def _f32(x):
    return np.asarray(x, np.float32)


def _np_roundtrip(v, bits, block):
    """decode(encode(v)) with the numpy twin, v zero-padded to whole blocks and cut back."""
    pad = np.zeros(quant.padded_size(v.size, block), np.float32)
    pad[:v.size] = v
    return quant.unpack_np(*quant.pack_np(pad, bits=bits, block_size=block), bits=bits, block_size=block)[:v.size]


def _mean_and_sent(mesh, specs, x, compression, block):
    """The collective's (mean, sent) for host leaves x [n, ...] placed by specs."""
    xs = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in x.items()}
    reduce_mean = collective.make_island_mean(mesh, specs, compression=compression, block_size=block,
                                              return_sent=True)
    return xs, jax.jit(reduce_mean)(xs)


def _two_island_outer(mesh, compression, error_feedback):
    """outer_update with plain SGD lr 1 (global <- global - delta) on one 4-element leaf, block size 4."""
    specs = {"w": P("island", None)}
    reduce_mean = collective.make_island_mean(mesh, specs, compression=compression, block_size=4,
                                              return_sent=error_feedback)
    outer = optax.sgd(1.0)
    shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731

    def init(g):
        g = {"w": shard(_f32(g), P())}
        inner = TrainState(params={"w": shard(np.stack([g["w"]] * 2), specs["w"])}, opt_state=(),
                           step=np.int32(0))
        return diloco.DilocoState(inner, g, outer.init(g), np.int32(0),
                                  diloco.zero_residual(inner.params) if error_feedback else None)

    def step(state, pseudo):
        """Islands move to global - pseudo (both islands the same pseudo), then the outer step."""
        x = _f32(state.global_params["w"]) - _f32(pseudo)
        state = state._replace(inner=state.inner._replace(params={"w": shard(np.stack([x, x]), specs["w"])}))
        return jax.jit(lambda s: diloco.outer_update(s, reduce_mean, outer))(state)

    return init, step


def test_residual_carries_exactly_hand_computed():
    """int4, block 4, Q = 7. Step 1: pseudo p1 = [7, 1.5, -3.2, 0]: absmax 7, scale RN(7 RN(1/7)) = 1 exactly,
    codes round_half_even(p1) = [7, 2, -3, 0], so the islands send [7, 2, -3, 0] and keep r1 = p1 - sent =
    [0, -0.5, -0.2, 0] (float32). Step 2: pseudo q = [0.25, 0.5, 0.2, 0] + r1 = [0.25, 0, ~0, 0]: absmax 0.25, the
    codes [7, 0, 0, 0] decode to 7 RN(0.25 RN(1/7)) = 0.25 (1 + 4.5e-8). After both steps the global params moved by exactly p1 + q = [7.25, 2, -3, 0],
    the pseudo-gradients' sum; without error feedback int4 loses 0.5 of the second element."""
    mesh = _mesh((2, 1, 1, 1))
    init, step = _two_island_outer(mesh, "int4", error_feedback=True)
    g0 = _f32([10, 10, 10, 10])
    p1 = _f32([7, 1.5, -3.2, 0])
    s, m = step(init(g0), p1)
    np.testing.assert_array_equal(_f32(s.global_params["w"]), g0 - _f32([7, 2, -3, 0]))
    r1 = _f32(s.residual["w"])
    expect_r1 = (g0 - (g0 - p1)) - _f32([7, 2, -3, 0])  # the pseudo-gradient as outer_update forms it, minus sent
    np.testing.assert_array_equal(r1, np.stack([expect_r1, expect_r1]))
    np.testing.assert_allclose(r1[0], [0, -0.5, -0.2, 0], atol=1e-6)
    q = _f32([0.25, 0.5, 0.2, 0])
    s, m = step(s, q)
    g1 = g0 - _f32([7, 2, -3, 0])
    p2 = (g1 - (g1 - q)) + expect_r1
    assert np.abs(p2).max() == _f32(0.25) and np.abs(p2[1:]).max() < 1e-6
    np.testing.assert_array_equal(_f32(s.global_params["w"]), g1 - _f32([0.25, 0, 0, 0]))
    np.testing.assert_allclose(_f32(s.global_params["w"]), g0 - (p1 + q), atol=1e-6)  # nothing lost over two steps
    # p2 - decode: XLA may fuse the decoding multiply into the subtraction (an FMA), so compare to the exact value
    sent0 = 7 * np.float64(np.float32(0.25) * np.float32(1 / 7))
    np.testing.assert_allclose(_f32(s.residual["w"])[0], p2.astype(np.float64) - [sent0, 0, 0, 0], rtol=0,
                               atol=2.0**-26)
    assert float(m["residual_norm"]) < 1e-6

    init, step = _two_island_outer(mesh, "int4", error_feedback=False)
    s, _ = step(step(init(g0), p1)[0], q)
    assert s.residual is None
    assert abs(float(_f32(s.global_params["w"])[1]) - float(g0[1] - 2.0)) >= 0.49  # the 0.5 went missing


def test_nonfinite_step_keeps_the_residual():
    mesh = _mesh((2, 1, 1, 1))
    init, step = _two_island_outer(mesh, "int8", error_feedback=True)
    s, _ = step(init(_f32([1, 1, 1, 1])), _f32([0.3, -0.2, 0.1, 0.05]))
    before = _f32(s.residual["w"])
    s2, m = step(s, _f32([np.nan, 0, 0, 0]))
    assert float(m["skipped_nonfinite"]) == 1.0
    np.testing.assert_array_equal(_f32(s2.residual["w"]), before)
    np.testing.assert_array_equal(_f32(s2.global_params["w"]), _f32(s.global_params["w"]))


@pytest.mark.parametrize("shape", [(4, 1, 2, 1), (2, 2, 2, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_sent_is_each_islands_own_codes(shape, compression):
    """`sent` is decode(encode(leaf)) of every island's own leaf on the collective's grid (each leaf starts on a
    block boundary), also where replicas split the traffic (data=2), and returning it changes no byte of the mean."""
    mesh, n, block = _mesh(shape), shape[0], 64
    specs = {"w": P("island", "fsdp", None), "norm": P("island", None), "odd": P("island", None)}
    rng = np.random.default_rng(3)
    x = {"w": rng.standard_normal((n, 32, 48)).astype(np.float32) * 0.02,
         "norm": rng.standard_normal((n, 200)).astype(np.float32), "odd": rng.standard_normal((n, 5)).astype(np.float32)}
    xs, (mean, sent) = _mean_and_sent(mesh, specs, x, compression, block)
    plain = jax.jit(collective.make_island_mean(mesh, specs, compression=compression, block_size=block))(xs)
    bits = COMPRESSION_BITS[compression]
    for k in x:
        assert np.asarray(mean[k]).tobytes() == np.asarray(plain[k]).tobytes()
        assert sent[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), x[k].ndim)
        for shard in sent[k].addressable_shards:  # one island's local slice, as the device packed it
            want = _np_roundtrip(x[k][shard.index].reshape(-1), bits, block)
            assert np.asarray(shard.data).reshape(-1).tobytes() == want.tobytes()


def test_training_sync_moves_only_packed_int4_codes_and_scales():
    """The compiled outer step of a 4-island int4 + error-feedback run: on the island axis only u8 (two 4-bit codes
    per byte) and one f32 scale per block; the residual never leaves its island."""
    from intellect_jax.trainer import Trainer

    cfg = tiny_config(mesh=dict(islands=4, fsdp=2), diloco=dict(inner_steps=2, block_size=64, compression="int4",
                                                                 error_feedback=True))
    tr = Trainer(cfg)
    hlo = tr.sync._sync.lower(tr.state).compile().as_text()
    traffic = collective.island_traffic(hlo, tr.mesh)
    island = {k: v for k, v in traffic.items() if not k[0].startswith("other:")}
    assert set(island) == {("all-to-all", "u8"), ("all-to-all", "f32"), ("all-gather", "u8"), ("all-gather", "f32")}
    for op in ("all-to-all", "all-gather"):
        assert island[(op, "f32")] * 64 == 2 * island[(op, "u8")]
    nparams = sum(x.size for x in jax.tree.leaves(tr.state.global_params))
    # half a byte per param, fsdp=2 halves per device: each result holds the codes of n chunks of the device's local,
    # padded vector (2 (n-1)/n of them cross the wire: collective.wire_bytes_per_island)
    for op in ("all-to-all", "all-gather"):
        assert island[(op, "u8")] >= nparams / 2 / 2, island
    # Anything else is scalars (metric norms, the non-finite vote) or codes; no fp32 param or residual moves.
    other_f32 = sum(v for (op, dt), v in traffic.items() if op.startswith("other:") and dt != "u8")
    assert other_f32 < 256, traffic


@pytest.mark.parametrize("n_members", [2, 3])
def test_int4_ring_codec_round_trip_and_error_bound(n_members):
    """Ring arithmetic with the int4 codec: the reference ring's mean is within the int4 hop bound, and
    BlockCodec.roundtrip is decode(encode()) on blocks from element 0 (what error feedback subtracts)."""
    rng = np.random.default_rng(n_members)
    vecs = [rng.standard_normal(1000).astype(np.float32) * (i + 1) for i in range(n_members)]
    codec = ring.make_codec("int4", 64)
    assert codec.wire_bytes(1024) == 512 + 4 * 16
    out = ring.reference_ring_mean(vecs, codec, 4096, 64)
    exact = np.mean(np.stack(vecs).astype(np.float64), axis=0)
    step = sum(np.abs(v).max() for v in vecs) / 7
    assert np.abs(out - exact).max() <= ((n_members - 1) * step / 2 + step / 2 * 1.01) / n_members
    rt = codec.roundtrip(vecs[0])
    pad = np.zeros(1024, np.float32)
    pad[:1000] = vecs[0]
    want = codec.decode(memoryview(b"".join(bytes(b) for b in codec.encode(pad))), 1024)[:1000]
    assert rt.tobytes() == want.tobytes()
    assert 0 < np.abs(rt - vecs[0]).max() <= np.abs(vecs[0]).max() / 7 / 2 * 1.001


@pytest.mark.parametrize("overrides, key", [
    (dict(compression="int2"), "diloco.compression"),
    (dict(compression="none", error_feedback=True), "diloco.error_feedback"),
    (dict(compression="int4", block_size=255), "diloco.block_size"),
])
def test_bad_compression_settings_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(diloco=overrides)


@pytest.mark.parametrize("compression", ["int8", "int4", "none"])
def test_one_device_reference_matches_the_collective(compression):
    """collective.reference_island_mean (islands vmapped on one device, for benchmarks/quality.py): exactly the numpy
    model (each island's codes decoded, summed in island order, times 1/n, packed once); the same codes as the
    collective (each island one device), whose compiled sum may round differently by an ulp."""
    mesh, n, block = _mesh((4, 1, 1, 1)), 4, 64
    specs = {"a": P("island", None, None), "b": P("island", None), "c": P("island", None)}
    rng = np.random.default_rng(11)
    x = {"a": rng.standard_normal((n, 24, 40)).astype(np.float32) * 0.01,
         "b": rng.standard_normal((n, 300)).astype(np.float32), "c": rng.standard_normal((n, 7)).astype(np.float32)}
    _, (mean, sent) = _mean_and_sent(mesh, specs, x, compression, block)
    rmean, rsent = jax.jit(lambda t: collective.reference_island_mean(t, compression=compression, block_size=block,
                                                                      return_sent=True))(x)
    bits = COMPRESSION_BITS[compression]
    for k in x:
        np.testing.assert_allclose(np.asarray(rmean[k]), np.asarray(mean[k]), rtol=3e-7, atol=0)
        assert np.asarray(sent[k]).tobytes() == np.asarray(rsent[k]).tobytes()
    if bits == 32:
        return
    rt = lambda u: quant.unpack_np(*quant.pack_np(u, bits=bits, block_size=block), bits=bits,  # noqa: E731
                                   block_size=block)
    flat = lambda t, i: np.concatenate([np.pad(t[k][i].reshape(-1), (0, quant.padded_size(t[k][i].size, block)  # noqa
                                                                     - t[k][i].size)) for k in sorted(t)])
    acc = rt(flat(x, 0))
    for i in range(1, n):
        acc = acc + rt(flat(x, i))
    want = rt(acc * np.float32(1 / n))
    got = np.concatenate([np.pad(np.asarray(rmean[k]).reshape(-1), (0, quant.padded_size(x[k][0].size, block)
                                                                     - x[k][0].size)) for k in sorted(x)])
    assert got.tobytes() == want.tobytes()
