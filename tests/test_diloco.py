"""DiLoCo: equivalences, a hand-computed case, bit-identical islands, s8 on the wire, falling loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from intellect_jax import collective, diloco
from intellect_jax import sharding as sh
from intellect_jax.config import DilocoConfig, MeshConfig
from intellect_jax.state import ModelSetup, init_train_state
from intellect_jax.train_step import TrainState, init_state, make_train_step
from intellect_jax.trainer import Trainer
from tests.helpers import random_batch, tiny_config


def test_one_island_h1_plain_sgd_equals_plain_training():
    cfg = tiny_config()
    mesh1 = sh.make_mesh(MeshConfig(islands=1, fsdp=1), jax.devices()[:1])
    setup = ModelSetup.build(cfg.model, cfg.optim)
    step = make_train_step(setup.graphdef, cfg.optim, setup.optimizer)
    plain, _ = init_train_state(setup, cfg.model, mesh1, seed=0)
    outer = diloco.make_outer_optimizer(DilocoConfig(outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0))
    state = diloco.init_state(plain.params, lambda p: init_state(p, setup.optimizer), outer, 1)
    reduce_mean = lambda t: jax.tree.map(lambda x: x.mean(0), t)  # noqa: E731 - exact mean over 1 island
    inner = jax.jit(diloco.island_inner_step(step, spmd_axis_name=None))
    sync = jax.jit(lambda s: diloco.outer_update(s, reduce_mean, outer))
    jstep = jax.jit(step)
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = random_batch(rng, 4, 32, cfg.model.vocab_size, docs_per_row=2)
        plain, m_plain = jstep(plain, batch)
        ist, m_isl = inner(state.inner, jax.tree.map(lambda x: x[None], batch))
        state, _ = sync(state._replace(inner=ist))
        np.testing.assert_allclose(m_isl["loss"][0], m_plain["loss"], rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state.global_params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state.inner.opt_state), jax.tree.leaves(plain.opt_state)):
        np.testing.assert_allclose(np.asarray(a)[0] if np.ndim(a) else a, b, rtol=1e-6, atol=1e-6)


def test_two_islands_linear_model_hand_computed_nesterov():
    """Two islands, a linear model w.x trained by plain SGD, H=2, two outer steps of SGD+Nesterov (lr .7, mu .9)."""
    x = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)  # island i's single example
    y = np.array([1.0, -2.0], np.float32)
    inner_lr, outer_lr, mu, H = 0.1, 0.7, 0.9, 2

    def inner_step(state, batch):
        xi, yi = batch
        grad = (state.params["w"] @ xi - yi) * xi  # d/dw 0.5 (w.x - y)^2
        return state._replace(params={"w": state.params["w"] - inner_lr * grad}, step=state.step + 1), {}

    outer = optax.sgd(outer_lr, momentum=mu, nesterov=True)
    w0 = np.array([0.2, -0.3], np.float32)
    state = diloco.init_state({"w": jnp.asarray(w0)},
                              lambda p: TrainState(p, (), jnp.zeros((), jnp.int32)), outer, 2)
    exact_mean = lambda t: jax.tree.map(lambda v: v.mean(0), t)  # noqa: E731
    inner = jax.vmap(inner_step)
    batches = (jnp.asarray(x), jnp.asarray(y))
    for _ in range(2):
        for _ in range(H):
            ist, _ = inner(state.inner, batches)
            state = state._replace(inner=ist)
        state, _ = diloco.outer_update(state, exact_mean, outer)

    # Derivation by hand (float64): each island runs H SGD steps from the global weights, the pseudo-gradients are
    # averaged, and the outer SGD-Nesterov step (PyTorch convention, which optax follows) is
    #   m <- delta + mu m ;  w <- w - lr (delta + mu m)
    w, m = w0.astype(np.float64), np.zeros(2)
    for _ in range(2):
        locals_ = []
        for i in range(2):
            wi = w.copy()
            for _ in range(H):
                wi = wi - inner_lr * (wi @ x[i] - y[i]) * x[i]
            locals_.append(wi)
        delta = np.mean([w - wi for wi in locals_], axis=0)
        m = delta + mu * m
        w = w - outer_lr * (delta + mu * m)
    np.testing.assert_allclose(np.asarray(state.global_params["w"]), w, rtol=1e-6, atol=1e-7)
    assert int(state.outer_step) == 2
    # every island restarts from the new global weights
    np.testing.assert_array_equal(np.asarray(state.inner.params["w"]), np.stack([state.global_params["w"]] * 2))


def _diloco_trainer(compression="int8", islands=4, fsdp=2, tensor=1, **cfg_overrides):
    cfg_overrides.setdefault("diloco", dict(inner_steps=5, compression=compression, block_size=64))
    cfg = tiny_config(mesh=dict(islands=islands, fsdp=fsdp, tensor=tensor), **cfg_overrides)
    return cfg, Trainer(cfg)


def _synthetic_batches(cfg, n, steps, seed=0):
    from intellect_jax import data
    it = data.make_iterator(cfg.data, vocab_size=cfg.model.vocab_size, num_islands=n)
    try:
        return [next(it) for _ in range(steps)]
    finally:
        it.close()


def test_islands_bit_identical_after_sync_and_s8_on_the_wire():
    cfg, tr = _diloco_trainer(islands=4, fsdp=2)
    for b in _synthetic_batches(cfg, 4, 5):
        tr.inner_step(tr.make_batch(b))
    # islands diverged during the inner steps
    q = np.asarray(tr.state.inner.params["layers"]["q_proj"])
    assert not np.array_equal(q[0], q[1])
    hlo = tr.sync._sync.lower(tr.state).compile().as_text()
    tr.sync.outer_now()
    # the outer state lives in pinned host memory between syncs (the CPU backend has that memory kind too)
    assert tr.sync.host_offload
    assert all(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(tr.state.global_params))
    assert all(x.sharding.memory_kind == "device" for x in jax.tree.leaves(tr.state.inner.params))
    # every device's copy of the global params equals every other copy of the same slice, bit for bit
    for leaf in jax.tree.leaves(tr.state.global_params):
        by_index = {}
        for shard in leaf.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index)
            by_index.setdefault(key, []).append(np.asarray(shard.data))
        assert all(len(v) >= 4 for v in by_index.values())  # at least one copy per island
        for copies in by_index.values():
            for c in copies[1:]:
                assert c.tobytes() == copies[0].tobytes()
    # islands restart from identical params
    q = np.asarray(tr.state.inner.params["layers"]["q_proj"])
    assert all(q[i].tobytes() == q[0].tobytes() for i in range(4))
    traffic = collective.island_traffic(hlo, tr.mesh)
    nparams = sum(x.size for x in jax.tree.leaves(tr.state.global_params))
    s8 = sum(v for (op, dt), v in traffic.items() if dt == "s8" and not op.startswith("other"))
    f32_island = sum(v for (op, dt), v in traffic.items() if dt == "f32" and not op.startswith("other"))
    # each device moves int8 codes for its half (fsdp=2) of the params, twice: the all_to_all's result holds every
    # island's codes of its owned chunk and the all_gather's every island's codes of the mean, n chunks of its local,
    # padded vector each (2 (n-1)/n of them cross the wire: collective.wire_bytes_per_island)
    for op in ("all-to-all", "all-gather"):
        assert traffic[(op, "s8")] >= nparams / 2, traffic
    assert s8 >= nparams, traffic
    assert f32_island <= s8 / 64 * 2 + 64, traffic  # only the per-block scales travel as f32
    assert not any(op.startswith("other") and dt == "f32" and v > 1024 for (op, dt), v in traffic.items()), traffic


def test_int8_sync_close_to_exact_fp32_sync():
    cfg, tr8 = _diloco_trainer("int8")
    _, tr32 = _diloco_trainer("none")
    for b in _synthetic_batches(cfg, 4, 5):
        tr8.inner_step(tr8.make_batch(b))
        tr32.inner_step(tr32.make_batch(b))
    before = jax.tree.leaves(jax.device_get(tr8.state.global_params))
    islands = jax.tree.leaves(jax.device_get(tr8.state.inner.params))
    # both runs took the same inner steps, so they sync the same pseudo-gradients
    for a, b in zip(islands, jax.tree.leaves(jax.device_get(tr32.state.inner.params))):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    tr8.sync.outer_now()
    m32 = tr32.sync.outer_now()
    d8 = jax.tree.leaves(jax.device_get(tr8.state.global_params))
    d32 = jax.tree.leaves(jax.device_get(tr32.state.global_params))
    # global params differ only by lr_outer * (1 + mu) * int8 error of the mean pseudo-gradient
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(d8, d32))
    delta_scale = float(m32["delta_norm"])
    assert 0 < err < 0.7 * 1.9 * delta_scale / 127, (err, delta_scale)
    # Per element, from the codec's bound (quant.error_bound: |x - decode(x)| <= scale * (1/2 + 2**-15), scale <=
    # absmax_block / 127 * (1 + 2**-22)). No block mixes two leaves (collective.py), so a leaf's absmax bounds the
    # absmax of each of its blocks. The mean is quantized twice: every island's pseudo-gradient d_i (error e1 after
    # the fp32 mean of the decoded d_i), then the mean itself once more by its owner (its absmax <= max|m| + e1).
    # The first Nesterov step applies lr * (1 + mu) * mean; the fp32 rounding of that update and of the two
    # subtractions is a few ulps, counted by the last term.
    lr, mu, n, c = 0.7, 0.9, len(islands[0]), 0.5 + 2.0**-15
    s = lambda absmax: absmax / 127 * (1 + 2.0**-22)  # noqa: E731 - largest stored scale for that absmax
    update_sq = err_sq = 0.0
    for p0, pi, a, b in zip(before, islands, d8, d32):
        d = np.asarray(p0, np.float64)[None] - np.asarray(pi, np.float64)  # [islands, ...] pseudo-gradients
        e1 = sum(c * s(np.max(np.abs(d[i]))) for i in range(n)) / n
        e_mean = e1 + c * s(np.max(np.abs(d.mean(0))) + e1)
        bound = lr * (1 + mu) * e_mean * (1 + 2.0**-20) + 4 * np.spacing(np.max(np.abs(b)).astype(np.float32))
        assert np.max(np.abs(a - b)) <= bound, (np.max(np.abs(a - b)), bound, a.shape)
        update_sq += float(np.sum((np.asarray(b, np.float64) - p0) ** 2))
        err_sq += float(np.sum((np.asarray(a, np.float64) - b) ** 2))
    # and the update was applied: the int8 result is far closer to the fp32 one than the fp32 one is to the start
    # (a sync that applies nothing gives a ratio of 1, one that drops a fraction f of the update at least f; two int8
    # roundings of at most 1/254 of a block's absmax each leave a few per mille here)
    assert update_sq > 0 and err_sq < 0.05**2 * update_sq, (err_sq, update_sq)


def test_four_islands_train_with_falling_loss_and_wire_ratio():
    cfg, tr = _diloco_trainer(islands=4, fsdp=2, optim=dict(learning_rate=5e-3, warmup_steps=2))
    losses = []
    for i, b in enumerate(_synthetic_batches(cfg, 4, 30)):
        losses.append(float(np.mean(tr.inner_step(tr.make_batch(b))["loss"])))
        if (i + 1) % cfg.diloco.inner_steps == 0:
            tr.sync.outer_now()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert int(tr.state.outer_step) == 6
    # bytes on the wire vs data-parallel fp32 at H=100, scales and padding included
    n = 10_211_381_248
    ratio = collective.ring_allreduce_bytes_per_island(n, 4) * 100 / collective.wire_bytes_per_island(n, 4)
    assert ratio >= 0.98 * 4 * 100, ratio
    assert tr.sync.wire_ratio_vs_ddp >= 0.98 * 4 * cfg.diloco.inner_steps * 0.9


def test_host_offload_changes_nothing_numerically():
    cfg, on = _diloco_trainer(islands=2, fsdp=4)
    _, off = _diloco_trainer(islands=2, fsdp=4, diloco=dict(inner_steps=5, block_size=64, outer_state_on_host=False))
    assert on.sync.host_offload and not off.sync.host_offload
    for i, b in enumerate(_synthetic_batches(cfg, 2, 10)):
        for tr in (on, off):
            tr.inner_step(tr.make_batch(b))
            if (i + 1) % 5 == 0:
                tr.sync.outer_now()
    for a, b in zip(jax.tree.leaves(jax.device_get(on.state)), jax.tree.leaves(jax.device_get(off.state))):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_nonfinite_mean_is_not_applied():
    """A NaN in the mean pseudo-gradient keeps the global state, restarts every island from it, counts the step."""
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    state = diloco.init_state({"w": jnp.asarray([0.2, -0.3], jnp.float32)},
                              lambda p: TrainState(p, (), jnp.zeros((), jnp.int32)), outer, 2)
    state, _ = diloco.apply_outer(state, {"w": jnp.asarray([0.1, 0.1], jnp.float32)}, outer)  # momentum != 0
    diverged = state._replace(inner=state.inner._replace(params={"w": jnp.asarray([[9.0, 9.0], [8.0, 7.0]])}))
    after, m = diloco.apply_outer(diverged, {"w": jnp.asarray([jnp.nan, 0.5], jnp.float32)}, outer)
    assert float(m["skipped_nonfinite"]) == 1.0 and float(m["outer_update_norm"]) == 0.0
    for a, b in zip(jax.tree.leaves((after.global_params, after.outer_opt_state)),
                    jax.tree.leaves((state.global_params, state.outer_opt_state))):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    np.testing.assert_array_equal(after.inner.params["w"], np.stack([state.global_params["w"]] * 2))
    assert int(after.outer_step) == int(state.outer_step) + 1
    ok, m = diloco.apply_outer(state, {"w": jnp.asarray([0.1, 0.1], jnp.float32)}, outer)
    assert float(m["skipped_nonfinite"]) == 0.0 and not np.array_equal(ok.global_params["w"], state.global_params["w"])
