"""diloco.guard: a non-finite or outlier island is left out of the mean, in the pure update and in the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intellect_jax import diloco
from intellect_jax.config import DilocoConfig
from intellect_jax.train_step import TrainState


def _state(x, g, residual=None):
    inner = TrainState(params={"w": x}, opt_state=(), step=jnp.zeros((x.shape[0],), jnp.int32))
    outer = diloco.make_outer_optimizer(DilocoConfig(outer_lr=0.7, outer_momentum=0.9))
    return diloco.DilocoState(inner, {"w": g}, outer.init({"w": g}), jnp.zeros((), jnp.int32),
                              None if residual is None else {"w": residual}), outer


def _mean(t):
    return jax.tree.map(lambda v: v.mean(0), t)


@pytest.mark.parametrize("poison", ["nan", "inf", "100x"])
def test_a_bad_island_is_left_out_and_the_others_match_a_run_without_it(poison):
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    x = g[None] - 0.01 * jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    bad = {"nan": x.at[0, 2, 3].set(jnp.nan), "inf": x.at[0, 1, 1].set(jnp.inf),
           "100x": x.at[0].set(g - 100.0 * (g - x[0]))}[poison]
    s4, outer = _state(bad, g)
    s3, _ = _state(x[1:], g)
    out4, m4 = jax.jit(lambda s: diloco.outer_update(s, _mean, outer, 5.0))(s4)
    out3, _ = jax.jit(lambda s: diloco.outer_update(s, _mean, outer, 5.0))(s3)
    assert float(m4["excluded_islands"]) == 1.0 and float(m4["skipped_nonfinite"]) == 0.0
    np.testing.assert_allclose(out4.global_params["w"], out3.global_params["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out4.inner.params["w"], np.broadcast_to(out4.global_params["w"], (4, 6, 5)))
    # ratio 0 (no norm test) still leaves non-finite islands out; a 100x island then drags the mean
    unguarded, m = jax.jit(lambda s: diloco.outer_update(s, _mean, outer, 0.0))(s4)
    if poison == "100x":
        assert not np.allclose(unguarded.global_params["w"], out3.global_params["w"], atol=1e-3)
    else:
        assert float(m["skipped_nonfinite"]) == 0.0 and float(m["excluded_islands"]) == 1.0  # non-finite: always


def test_no_outlier_means_bit_identical_to_no_guard_and_residuals_kept_for_the_left_out():
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    x = g[None] - 0.01 * jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    r = 0.001 * jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    lossy = lambda t: (_mean(jax.tree.map(lambda v: jnp.round(v * 256) / 256, t)),  # noqa: E731
                       jax.tree.map(lambda v: jnp.round(v * 256) / 256, t))
    s, outer = _state(x, g, r)
    a, _ = jax.jit(lambda s: diloco.outer_update(s, lossy, outer, 5.0))(s)
    b, _ = jax.jit(lambda s: diloco.outer_update(s, lossy, outer, 0.0))(s)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    s_bad, _ = _state(x.at[2].set(jnp.nan), g, r)
    c, m = jax.jit(lambda s: diloco.outer_update(s, lossy, outer, 5.0))(s_bad)
    assert float(m["excluded_islands"]) == 1.0
    np.testing.assert_array_equal(c.residual["w"][2], r[2])  # the left-out island keeps its residual
    assert np.isfinite(np.asarray(c.residual["w"])).all() and np.isfinite(np.asarray(c.global_params["w"])).all()


def test_trainer_survives_a_nan_island(tmp_path, caplog):
    """4 in-program islands, int8 collective: island 0's params turn NaN mid-round; the outer step leaves it out,
    every island restarts from finite global params and training goes on."""
    from intellect_jax.trainer import Trainer
    from tests.helpers import random_batch, tiny_config

    cfg = tiny_config(mesh=dict(islands=4, fsdp=2), diloco=dict(inner_steps=2), data=dict(batch_size=2, seq_len=32))
    trainer = Trainer(cfg)
    rng = np.random.default_rng(0)

    def batch():
        rows = [random_batch(rng, 2, 32, cfg.model.vocab_size) for _ in range(4)]
        return trainer.make_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})

    trainer.inner_step(batch())
    sync = trainer.sync
    poisoned = jax.tree.map(lambda p: p.at[0].set(jnp.nan), sync.state.inner.params)
    sync.state = sync.state._replace(inner=sync.state.inner._replace(params=poisoned))
    metrics = jax.device_get(sync.outer_now())
    assert float(metrics["excluded_islands"]) == 1.0 and float(metrics["skipped_nonfinite"]) == 0.0
    for leaf in jax.tree.leaves(jax.device_get(sync.state.inner.params)):
        assert np.isfinite(leaf).all()
    m = jax.device_get(trainer.inner_step(batch()))
    assert np.isfinite(np.asarray(m["loss"])).all()
