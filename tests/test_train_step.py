import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intellect_jax import sharding as sh
from intellect_jax.config import MeshConfig, OptimConfig
from intellect_jax.state import ModelSetup, init_train_state
from intellect_jax.train_step import make_schedule, make_train_step
from tests.helpers import random_batch, tiny_config


def _run_one_step(cfg, mesh_cfg, devices, batch, steps=1):
    mesh = sh.make_mesh(mesh_cfg, devices)
    setup = ModelSetup.build(cfg.model, cfg.optim)
    state, shardings = init_train_state(setup, cfg.model, mesh, seed=0)
    step = make_train_step(setup.graphdef, cfg.optim, setup.optimizer, sh.activation_constraint(mesh))
    batch_sharding = jax.sharding.NamedSharding(mesh, sh.batch_spec())
    jstep = jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                    donate_argnums=0)
    metrics = []
    for _ in range(steps):
        state, m = jstep(state, jax.device_put(batch, batch_sharding))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics, state


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(fsdp=4, tensor=2), MeshConfig(fsdp=8), MeshConfig(data=2, fsdp=2,
                                                                                                    tensor=2)])
def test_sharded_step_equals_unsharded(mesh_cfg):
    cfg = tiny_config()
    batch = random_batch(np.random.default_rng(0), 8, 32, cfg.model.vocab_size, docs_per_row=2)
    ref_state, ref_m, _ = _run_one_step(cfg, MeshConfig(fsdp=1), jax.devices()[:1], batch)
    state, m, live = _run_one_step(cfg, mesh_cfg, jax.devices(), batch)
    # the parameters really are sharded over the 8 devices
    q = live.params["layers"]["q_proj"]
    assert len({d for d in q.sharding.device_set}) == 8
    assert q.addressable_shards[0].data.size < q.size
    np.testing.assert_allclose(m[0]["loss"], ref_m[0]["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m[0]["grad_norm"], ref_m[0]["grad_norm"], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(ref_state.opt_state)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_equals_full_batch():
    cfg = tiny_config()
    cfg_acc = tiny_config(optim=dict(grad_accum_steps=4))
    batch = random_batch(np.random.default_rng(1), 8, 32, cfg.model.vocab_size, docs_per_row=3)
    batch["loss_mask"][:, -5:] = 0.0  # uneven token counts per micro-batch
    batch["loss_mask"][0, :] = 0.0
    s1, m1, _ = _run_one_step(cfg, MeshConfig(fsdp=1), jax.devices()[:1], batch)
    s2, m2, _ = _run_one_step(cfg_acc, MeshConfig(fsdp=1), jax.devices()[:1], batch)
    np.testing.assert_allclose(m2[0]["loss"], m1[0]["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_loss_falls_on_learnable_sequences():
    # Each row is a repeated random motif: after one period the next token is fully predictable.
    cfg = tiny_config(optim=dict(learning_rate=1e-2, warmup_steps=2, z_loss_weight=0.0))
    rng = np.random.default_rng(0)
    motifs = rng.integers(0, cfg.model.vocab_size, size=(8, 6))
    seq = np.tile(motifs, (1, 7))[:, :33].astype(np.int32)
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "segment_ids": np.ones((8, 32), np.int32),
             "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1)), "loss_mask": np.ones((8, 32), np.float32)}
    _, metrics, _ = _run_one_step(cfg, MeshConfig(fsdp=1), jax.devices()[:1], batch, steps=60)
    losses = [float(m["loss"]) for m in metrics]
    assert losses[0] > np.log(cfg.model.vocab_size) - 0.5
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_z_loss_is_mean_max_logit_squared():
    from intellect_jax.train_step import loss_sums
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)) * 3, jnp.float32)
    targets = np.asarray([[0, 1, 2], [3, 4, 0]])
    mask = np.asarray([[1, 1, 0], [1, 0, 1]], np.float32)
    ce, z = loss_sums(logits, jnp.asarray(targets), jnp.asarray(mask))
    lg = np.asarray(logits, np.float64)
    want_ce = sum((np.log(np.exp(lg[b, t]).sum()) - lg[b, t, targets[b, t]]) * mask[b, t]
                  for b in range(2) for t in range(3))
    want_z = sum(lg[b, t].max() ** 2 * mask[b, t] for b in range(2) for t in range(3))
    assert float(ce) == pytest.approx(want_ce, rel=1e-5)
    assert float(z) == pytest.approx(want_z, rel=1e-5)


def test_schedules_match_formulas():
    lr = 1e-3
    wsd = make_schedule(OptimConfig(learning_rate=lr, schedule="wsd_sqrt", warmup_steps=10, decay_start=60,
                                    total_steps=100))
    assert float(wsd(0)) == pytest.approx(lr * 1 / 10)
    assert float(wsd(4)) == pytest.approx(lr * 5 / 10)
    assert float(wsd(30)) == pytest.approx(lr)
    assert float(wsd(60)) == pytest.approx(lr)
    assert float(wsd(70)) == pytest.approx(lr * (1 - np.sqrt(10 / 40)))
    assert float(wsd(100)) == pytest.approx(0.0, abs=1e-12)
    cos = make_schedule(OptimConfig(learning_rate=lr, schedule="cosine", warmup_steps=10, total_steps=110,
                                    min_lr_ratio=0.1))
    assert float(cos(9)) == pytest.approx(lr)
    assert float(cos(60)) == pytest.approx(0.1 * lr + 0.9 * lr * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert float(cos(110)) == pytest.approx(0.1 * lr)
    const = make_schedule(OptimConfig(learning_rate=lr, schedule="constant", warmup_steps=0, total_steps=10))
    assert float(const(0)) == pytest.approx(lr) and float(const(9)) == pytest.approx(lr)
    # INTELLECT-1's WSD schedule and cooldown (INTELLECT-1 technical report, Jaghouar et al. 2024, arXiv 2412.01152)
    i1 = make_schedule(OptimConfig(learning_rate=7.5e-5, warmup_steps=1000, decay_start=74700, total_steps=90400))
    t = 80000
    assert float(i1(t)) == pytest.approx(7.5e-5 * (1 - np.sqrt((t - 74700) / (90400 - 74700))), rel=1e-5)


@pytest.mark.parametrize("at", [0, 7, 30])
def test_fresh_optimizer_state_resumes_the_schedule_but_not_the_moments(at):
    """An island that installs a peer's state at inner step `at` gets fresh AdamW moments, but its learning rate is
    the schedule's at `at`, not the warmup's start (else a restarted island would redo the warmup: larger updates
    than its peers', which the pseudo-gradient guard then leaves out step after step)."""
    from jax.sharding import PartitionSpec

    from intellect_jax.train_step import init_state, make_optimizer
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, total_steps=40, schedule="cosine", weight_decay=0.0,
                      grad_clip=0.0, eps=1e-12)
    opt = make_optimizer(cfg, {"w": PartitionSpec()})
    state = init_state({"w": jnp.zeros(3)}, opt, at)
    assert int(state.step) == at
    updates, _ = opt.update({"w": jnp.asarray([0.5, -2.0, 1e-3])}, state.opt_state, state.params)
    # Adam's first step from fresh moments (bias-corrected) is -lr * sign(g): its size is exactly the lr at `at`.
    np.testing.assert_allclose(np.abs(updates["w"]), float(make_schedule(cfg)(at)), rtol=1e-5)
    # and that lr, by hand: linear warmup (step + 1) / 10, then a cosine from 1 to min_lr_ratio over steps 10..40
    floor = cfg.min_lr_ratio
    want = (at + 1) / 10 if at < 10 else floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * (at - 10) / 30))
    np.testing.assert_allclose(np.abs(updates["w"]), want, rtol=1e-5)
