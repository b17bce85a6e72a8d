"""collective: int8 cross-island mean inside one program. Error within the bound derived from the block scales,
bit-identical copies on every island, and only s8 codes (plus block_size x smaller f32 scales) on the island axis."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from intellect_jax import collective, quant

AXES = ("island", "data", "fsdp", "tensor")
BLOCK = 256
# (island, data, fsdp, tensor) over the 8 CPU devices of tests/conftest.py
MESHES = [(1, 1, 8, 1), (2, 1, 2, 2), (4, 1, 2, 1), (8, 1, 1, 1), (2, 2, 2, 1), (3, 1, 2, 1)]
SPECS = {
    "wq": P("island", "fsdp", "tensor"),
    "emb": P("island", ("data", "fsdp"), None),
    "norm": P("island", None),
    "bias": P("island", "tensor"),
    "odd": P("island", None),
}
SHAPES = {"wq": (64, 96), "emb": (40, 64), "norm": (64,), "bias": (96,), "odd": (3,)}
MAGNITUDE = {"wq": 0.02, "emb": 1.0, "norm": 1e-3, "bias": 0.1, "odd": 5.0}


def _mesh(shape):
    """A mesh over the first prod(shape) devices (3 islands x 2 uses 6 of the 8)."""
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), AXES)


def _pseudo_grads(n, seed=0):
    """Per-island trees [n, ...]: a shared part plus island-specific noise, per-leaf magnitudes."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in SHAPES.items():
        common = rng.standard_normal(shape)
        out[k] = (MAGNITUDE[k] * (common + 0.5 * rng.standard_normal((n, *shape)))).astype(np.float32)
    return out


def _put(tree, mesh, specs):
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}


def _reference_bound(x, out, specs, n, bits):
    """Per device: (err, bound, exact) vectors over its local elements, the bound derived from the block scales.

    |out - mean_i x_i| <= mean_i eb(s_i) + (n+1) 2**-24 mean_i |dq_i| + eb(s')
    where eb(s) = s (1/2 + 2**-15) is quant.error_bound, s_i island i's scale of the block holding the element,
    the middle term the float32 rounding of the mean (n-1 additions, RN(1/n), one multiply), and s' the scale
    of the re-quantized mean's block, s' <= max|out over the block| / (Q (1 - 2**-24)) since its absmax has code Q
    and decodes to RN(Q s'). A block flushed to zero (s' = 0) is bounded by quant.FLUSH_BELOW.
    """
    q = quant.qmax(bits)
    results = []
    for dev in out["norm"].sharding.device_set:
        idx = {k: out[k].sharding.devices_indices_map(out[k].shape)[dev] for k in out}
        for k in sorted(specs):  # the layout of collective.py: each leaf starts on a block boundary
            v = [x[k][i][idx[k]].reshape(-1) for i in range(n)]
            got = np.asarray(_shard_on(out[k], dev)).reshape(-1)
            length = v[0].size
            padded = quant.padded_size(length, BLOCK)
            eb_sum = np.zeros(length)
            abs_dq = np.zeros(length)
            for vi in v:
                c, s = quant.pack_np(np.pad(vi, (0, padded - length)), bits=bits, block_size=BLOCK)
                eb_sum += quant.error_bound(s, block_size=BLOCK)[:length]
                abs_dq += np.abs(quant.unpack_np(c, s, bits=bits, block_size=BLOCK)[:length])
            blocks = np.abs(np.pad(got.astype(np.float64), (0, padded - length))).reshape(-1, BLOCK).max(axis=1)
            s_out = blocks / (q * (1 - 2.0**-24))
            eb_out = np.where(s_out == 0, quant.FLUSH_BELOW, s_out * (0.5 + 2.0**-15))
            bound = eb_sum / n + (n + 1) * 2.0**-24 * abs_dq / n + np.repeat(eb_out, BLOCK)[:length]
            exact = np.mean(np.stack(v).astype(np.float64), axis=0)
            results.append((np.abs(got - exact), bound, exact))
    return results


def _shard_on(arr, dev):
    (shard,) = [s for s in arr.addressable_shards if s.device == dev]
    return shard.data


def _assert_bitwise_replicated(arr, n):
    by_index = {}
    for s in arr.addressable_shards:
        by_index.setdefault(str(s.index), []).append(np.asarray(s.data).view(np.uint32))
    for copies in by_index.values():
        assert len(copies) >= n  # every island holds this slice
        for c in copies[1:]:
            np.testing.assert_array_equal(c, copies[0])


@pytest.mark.parametrize("shape,compression", [(s, "int8") for s in MESHES] + [((4, 1, 2, 1), "int4")],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_island_mean_error_within_scale_bound_and_bit_identical(shape, compression):
    bits = quant.SUPPORTED_BITS[compression == "int8"]
    mesh = _mesh(shape)
    n = shape[0]
    x = _pseudo_grads(n)
    reduce_mean = jax.jit(collective.make_island_mean(mesh, SPECS, compression=compression, block_size=BLOCK))
    out = reduce_mean(_put(x, mesh, SPECS))
    for k in SHAPES:
        assert out[k].shape == SHAPES[k] and out[k].dtype == np.float32
        want = NamedSharding(mesh, collective.inner_spec(SPECS[k]))
        assert out[k].sharding.is_equivalent_to(want, len(SHAPES[k])), (out[k].sharding, want)
        _assert_bitwise_replicated(out[k], n)
    worst, num, den = 0.0, 0.0, 0.0
    for err, bound, exact in _reference_bound(x, out, SPECS, n, bits):
        assert np.all(err <= bound), (np.max(err / bound), np.argmax(err / bound))
        worst = max(worst, float(np.max(err / bound)))
        num, den = num + float(np.sum(err**2)), den + float(np.sum(exact**2))
    for k in SHAPES:  # relative error of the mean, per leaf and overall
        rel = np.linalg.norm(np.asarray(out[k]) - x[k].mean(0)) / np.linalg.norm(x[k].mean(0))
        print(f"{compression} mesh={shape} {k}: relative L2 error of the mean {rel:.2e}")
    print(f"{compression} mesh={shape}: relative L2 error {np.sqrt(num / den):.2e}, max err/bound {worst:.3f}")
    assert worst > 0.2  # the bound is tight enough to mean something


def _replicas(mesh, spec):
    """How many devices of one island hold the same slice of a leaf (its inner axes of size > 1 not in spec)."""
    used = set(collective._mentioned_axes(collective.inner_spec(spec)))
    return int(np.prod([mesh.shape[a] for a in AXES[1:] if a not in used]))


def _code_bounds(mesh, xs, specs):
    """(unique, naive) codes per device on the island axis: each parameter once per island (replicas sharing the
    work) vs every replica sending all its leaves, each padded to whole blocks, in one vector of n whole blocks."""
    n = mesh.shape["island"]
    local = {k: int(np.prod(xs[k].addressable_shards[0].data.shape[1:])) for k in specs}
    unique = sum(local[k] / _replicas(mesh, specs[k]) for k in specs)
    naive = quant.padded_size(sum(quant.padded_size(v, BLOCK) for v in local.values()), BLOCK, n)
    return unique, naive


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_only_int8_codes_and_scales_cross_the_island_axis(shape):
    mesh = _mesh(shape)
    n = shape[0]
    xs = _put(_pseudo_grads(n), mesh, SPECS)
    hlo = jax.jit(collective.make_island_mean(mesh, SPECS, block_size=BLOCK)).lower(xs).compile().as_text()
    traffic = collective.island_traffic(hlo, mesh)
    print(f"mesh={shape}: per-device collective result elements {traffic}")
    # Collectives that are not over the island axis stay inside one island: they reassemble replicas' parts.
    island_of = np.arange(mesh.devices.size).reshape(shape)
    island_of = {int(d): i for i in range(n) for d in island_of[i].reshape(-1)}
    for c in collective.hlo_collectives(hlo):
        if frozenset(map(frozenset, c["groups"] or ())) != collective.axis_groups(mesh, "island"):
            assert c["op"] == "all-gather" and c["groups"], c["line"]
            assert all(len({island_of[d] for d in g}) == 1 for g in c["groups"]), c["line"]
    others = {k: v for k, v in traffic.items() if k[0].startswith("other:")}
    assert set(others) <= {("other:all-gather", "s8"), ("other:all-gather", "f32")}
    if others:
        assert others[("other:all-gather", "f32")] * BLOCK == others[("other:all-gather", "s8")]
    if n == 1:  # XLA drops the size-1 all_to_all; what is left moves codes only
        assert set(traffic) - set(others) <= {("all-gather", "s8"), ("all-gather", "f32")}
        return
    assert set(traffic) - set(others) == {("all-to-all", "s8"), ("all-to-all", "f32"), ("all-gather", "s8"),
                                          ("all-gather", "f32")}
    for op in ("all-to-all", "all-gather"):
        # The only f32 on the island axis is one scale per block of codes: block_size x fewer elements.
        assert traffic[(op, "f32")] * BLOCK == traffic[(op, "s8")]
    # Every parameter travels as a code; replicas splitting their work never costs more than all sending all.
    unique, naive = _code_bounds(mesh, xs, SPECS)
    assert unique <= traffic[("all-to-all", "s8")] <= naive

    # The fp32 baseline, for contrast: a parameter-sized f32 all-reduce over the island axis.
    local_params = sum(int(np.prod(a.addressable_shards[0].data.shape[1:])) for a in xs.values())
    base = jax.jit(collective.make_island_mean(mesh, SPECS, compression="none")).lower(xs).compile().as_text()
    base_traffic = collective.island_traffic(base, mesh)
    assert base_traffic == {("all-reduce", "f32"): local_params}


def test_replicas_split_the_island_traffic():
    """Params replicated over data (2) and a norm replicated over data x fsdp (4): each replica sends its share."""
    mesh = _mesh((2, 2, 2, 1))
    specs = {"w": P("island", "fsdp", None), "norm": P("island", None)}
    rng = np.random.default_rng(7)
    x = {"w": rng.standard_normal((2, 1024, 256)).astype(np.float32),
         "norm": rng.standard_normal((2, 4096)).astype(np.float32)}
    xs = _put(x, mesh, specs)
    reduce_mean = jax.jit(collective.make_island_mean(mesh, specs))
    traffic = collective.island_traffic(reduce_mean.lower(xs).compile().as_text(), mesh)
    unique, naive = _code_bounds(mesh, xs, specs)
    # At most one partly filled block per leaf and n blocks of chunk padding per replica group beyond `unique`.
    assert unique <= traffic[("all-to-all", "s8")] <= unique + 2 * BLOCK + 2 * 2 * BLOCK < naive
    out = reduce_mean(xs)
    for k in x:
        _assert_bitwise_replicated(out[k], 2 * (4 if k == "norm" else 2))
    for err, bound, _ in _reference_bound(x, out, specs, 2, 8):
        assert np.all(err <= bound)


def test_int4_moves_packed_bytes():
    mesh = _mesh((4, 1, 2, 1))
    xs = _put(_pseudo_grads(4), mesh, SPECS)
    hlo = jax.jit(collective.make_island_mean(mesh, SPECS, compression="int4")).lower(xs).compile().as_text()
    traffic = collective.island_traffic(hlo, mesh)
    assert {k for k in traffic if not k[0].startswith("other:")} == {
        ("all-to-all", "u8"), ("all-to-all", "f32"), ("all-gather", "u8"), ("all-gather", "f32")}
    for op in ("all-to-all", "all-gather"):
        assert traffic[(op, "f32")] * BLOCK == 2 * traffic[(op, "u8")]  # two codes per byte


@pytest.mark.parametrize("shape", [(4, 1, 2, 1), (1, 1, 8, 1)], ids=lambda s: "x".join(map(str, s)))
def test_uncompressed_mean_is_fp32_exact(shape):
    mesh = _mesh(shape)
    n = shape[0]
    x = _pseudo_grads(n, seed=1)
    out = jax.jit(collective.make_island_mean(mesh, SPECS, compression="none"))(_put(x, mesh, SPECS))
    for k in SHAPES:
        exact = x[k].astype(np.float64).mean(0)
        # n float32 terms summed and scaled by 1/n (a power of two): <= n 2**-24 mean|x_i| per element.
        bound = n * 2.0**-24 * np.abs(x[k]).astype(np.float64).mean(0)
        assert np.all(np.abs(np.asarray(out[k]) - exact) <= bound)
        _assert_bitwise_replicated(out[k], n)


def test_nan_in_one_island_poisons_only_its_block():
    mesh = _mesh((4, 1, 2, 1))
    specs = {"a": P("island", None), "b": P("island", "fsdp")}
    rng = np.random.default_rng(5)
    x = {"a": rng.standard_normal((4, 1024)).astype(np.float32), "b": rng.standard_normal((4, 512)).astype(np.float32)}
    x["a"][1, 300] = np.nan
    out = jax.jit(collective.make_island_mean(mesh, specs))(_put(x, mesh, specs))
    a = np.asarray(out["a"])
    assert np.all(np.isnan(a[256:512])) and np.all(np.isfinite(np.r_[a[:256], a[512:]]))
    assert np.all(np.isfinite(np.asarray(out["b"])))


def test_wire_bytes():
    # 1000 params, 4 islands, blocks of 256: padded to 1024 = 4 chunks of 256 codes + 1 scale (260 bytes);
    # all_to_all sends 3 chunks, all_gather sends the owned chunk to 3 peers.
    assert collective.wire_bytes_per_island(1000, 4, "int8", 256) == 2 * 3 * 260
    assert collective.wire_bytes_per_island(1000, 4, "int4", 256) == 2 * 3 * (128 + 4)
    assert collective.wire_bytes_per_island(1000, 4, "none", 256) == 2 * 3 * 250 * 4
    assert collective.ring_allreduce_bytes_per_island(1000, 4) == 6000
    assert collective.wire_bytes_per_island(10**6, 1, "int8", 256) == 0
    # ~3.9x fewer bytes than the fp32 ring at scale (4 bytes -> 1 + 4/256).
    ratio = collective.ring_allreduce_bytes_per_island(10**9, 8) / collective.wire_bytes_per_island(10**9, 8)
    assert 3.9 < ratio < 4.0 * 256 / 260 + 1e-9


def test_hlo_parser_reads_iota_and_async_forms():
    line = ("%ag = (s8[256]{0}, s8[1024]{0}) all-gather-start(%p), channel_id=1, "
            "replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}, use_global_device_ids=true")
    (c,) = collective.hlo_collectives(line)
    assert c["op"] == "all-gather" and c["arrays"] == (("s8", 1024),)
    assert c["groups"] == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert collective.axis_groups(_mesh((4, 1, 2, 1)), "island") == frozenset(map(frozenset, c["groups"]))
    assert not collective.hlo_collectives("%d = s8[1024]{0} all-gather-done(%ag)")


def test_rejects_bad_arguments():
    mesh = _mesh((4, 1, 2, 1))
    with pytest.raises(ValueError):
        collective.make_island_mean(mesh, {"a": P("fsdp", None)})
    with pytest.raises(ValueError):
        collective.make_island_mean(mesh, {"a": P("island")}, compression="fp8")


def test_composes_inside_a_jitted_step_and_keeps_dtypes():
    mesh = _mesh((2, 1, 2, 2))
    specs = {"w": P("island", "fsdp", "tensor"), "h": P("island", None)}
    rng = np.random.default_rng(6)
    x = {"w": rng.standard_normal((2, 16, 8)).astype(np.float32),
         "h": rng.standard_normal((2, 256)).astype(jax.numpy.bfloat16)}
    reduce_mean = collective.make_island_mean(mesh, specs)

    @jax.jit
    def outer(params, tree):  # the shape of a DiLoCo outer update: global params - mean pseudo-gradient
        delta = reduce_mean(tree)
        return jax.tree.map(lambda p, d: p - d, params, delta)

    params = {"w": np.zeros((16, 8), np.float32), "h": np.zeros(256, jax.numpy.bfloat16)}
    new = outer(params, _put(x, mesh, specs))
    assert new["w"].dtype == np.float32 and new["h"].dtype == jax.numpy.bfloat16
    for k in x:
        mean = x[k].astype(np.float64).mean(0)
        # Every block scale is <= A/127 (A: absmax over all islands' data and hence over the mean), so the bound of
        # the main test is <= A/127 (1/2 + 1/2 + 2**-14) plus the float32 mean rounding 3 * 2**-24 A; a bf16 result
        # adds its own rounding, <= 2**-9 of the value.
        a = np.abs(x[k].astype(np.float64)).max()
        tol = a / 127 * (1 + 2.0**-13) + (2.0**-9 * (np.abs(mean) + a / 127) if k == "h" else 0)
        assert np.all(np.abs(-np.asarray(new[k], np.float64) - mean) <= tol)
