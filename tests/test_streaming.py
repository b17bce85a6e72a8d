"""Streaming DiLoCo: fragment partition and schedule, a hand-computed fragment sync, P = 1 equals plain DiLoCo
bit for bit, error feedback per fragment, and the trainer's schedule end to end (tau = 0 and tau > 0, resume)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from intellect_jax import diloco, streaming
from intellect_jax.config import DilocoConfig
from intellect_jax.train_step import TrainState


def _tree(rng, n_layers=3, islands=None):
    lead = () if islands is None else (islands,)
    f = lambda *s: jnp.asarray(rng.normal(size=lead + s), jnp.float32)  # noqa: E731
    return {"embed_tokens": f(4, 2), "layers": {"w": f(n_layers, 2, 3), "b": f(n_layers, 3)}, "norm": f(2)}


def _state(rng, islands=2, n_layers=3, outer=None, frags=None, residual=False):
    g = _tree(rng, n_layers)
    x = _tree(rng, n_layers, islands)
    inner = TrainState(params=x, opt_state=(), step=jnp.zeros((islands,), jnp.int32))
    opt = streaming.init_outer_states(frags, outer, g) if frags else outer.init(g)
    res = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32) * 0.01, x) if residual else None
    return diloco.DilocoState(inner, g, opt, jnp.zeros((), jnp.int32), res)


def _mean(t):
    return jax.tree.map(lambda v: v.mean(0), t)


def test_fragments_cover_every_element_once_and_follow_the_layers():
    rng = np.random.default_rng(0)
    g = _tree(rng, n_layers=5)
    frags = streaming.Fragments(g, num_layers=5, count=3)
    # vocabulary rows of the embedding strided like the layers, the norm with the last layer's (4 -> fragment 1)
    assert frags.owner[("embed_tokens",)] is None and frags.owner[("norm",)] == 1
    assert frags.take(g, 1)["embed_tokens"].shape == (1, 2) and "norm" not in frags.take(g, 2)
    assert frags.take(g, 2)["layers/w"].shape == (1, 2, 3) and frags.take(g, 0)["layers/w"].shape == (2, 2, 3)
    total = jax.tree.map(jnp.zeros_like, g)
    count = jax.tree.map(jnp.zeros_like, g)
    for p in range(3):
        view = frags.take(g, p)
        total = jax.tree.map(jnp.add, total, frags.put(jax.tree.map(jnp.zeros_like, g), p, view))
        count = jax.tree.map(jnp.add, count, frags.put(jax.tree.map(jnp.zeros_like, g), p,
                                                      jax.tree.map(jnp.ones_like, view)))
    for a, b, c in zip(jax.tree.leaves(total), jax.tree.leaves(g), jax.tree.leaves(count)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, 1)
    assert sum(frags.size(p, g) for p in range(3)) == sum(x.size for x in jax.tree.leaves(g))
    # the host-side inverse over all fragments (a peer's per-fragment snapshot -> the tree), from shapes alone
    views = [jax.tree.map(np.asarray, frags.take(g, p)) for p in range(3)]
    back = frags.assemble(jax.eval_shape(lambda t: t, g), views)
    assert jax.tree.structure(back) == jax.tree.structure(g)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(g)):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_hand_computed_fragment_sync_with_merge():
    """P = 2 of 3 layers, 2 islands, SGD lr 0.5 (no momentum), alpha 0.25: fragment 1 is layer 1 alone."""
    rng = np.random.default_rng(1)
    outer = optax.sgd(0.5)
    g0 = _tree(rng)
    frags = streaming.Fragments(g0, num_layers=3, count=2)
    s = _state(rng, outer=outer, frags=frags)
    s, delta, m = streaming.reduce_fragment(s, frags, 1, _mean)
    # islands train on for tau steps: their params move; the merge uses the moved values
    moved = jax.tree.map(lambda a: a + 1.0, s.inner.params)
    s2, _ = streaming.apply_fragment(s._replace(inner=s.inner._replace(params=moved)), frags, 1, delta, outer, 0.25)
    G, X, Xm = (np.asarray(s.global_params["layers"]["w"]), np.asarray(s.inner.params["layers"]["w"]),
                np.asarray(moved["layers"]["w"]))
    want_delta = (G[1][None] - X[:, 1]).mean(0)
    np.testing.assert_allclose(delta["layers/w"][0], want_delta, rtol=1e-6)
    want_g = G[1] - 0.5 * want_delta
    np.testing.assert_allclose(s2.global_params["layers"]["w"][1], want_g, rtol=1e-6)
    np.testing.assert_allclose(s2.inner.params["layers"]["w"][:, 1], 0.25 * Xm[:, 1] + 0.75 * want_g[None],
                               rtol=1e-6)
    # everything outside fragment 1 is untouched: the global params, and the islands' moved values
    np.testing.assert_array_equal(np.asarray(s2.global_params["layers"]["w"])[[0, 2]], G[[0, 2]])
    np.testing.assert_array_equal(np.asarray(s2.global_params["embed_tokens"])[[0, 2]],
                                  np.asarray(s.global_params["embed_tokens"])[[0, 2]])
    np.testing.assert_array_equal(np.asarray(s2.inner.params["layers"]["w"])[:, [0, 2]], Xm[:, [0, 2]])
    np.testing.assert_array_equal(s2.inner.params["norm"], moved["norm"])
    assert int(s2.outer_step) == 1
    Gb, Xb = np.asarray(s.global_params["layers"]["b"]), np.asarray(s.inner.params["layers"]["b"])
    Ge, Xe = np.asarray(s.global_params["embed_tokens"]), np.asarray(s.inner.params["embed_tokens"])
    want_norm = [np.sqrt(np.sum((G[1] - X[i, 1]) ** 2) + np.sum((Gb[1] - Xb[i, 1]) ** 2)
                         + np.sum((Ge[1::2] - Xe[i, 1::2]) ** 2)) for i in range(2)]  # embedding rows 1 and 3
    np.testing.assert_allclose(m["pseudo_grad_norm"], want_norm, rtol=1e-6)


@pytest.mark.parametrize("residual", [False, True])
def test_one_fragment_no_overlap_equals_plain_diloco_bit_for_bit(residual):
    rng = np.random.default_rng(2)
    outer = diloco.make_outer_optimizer(DilocoConfig(outer_lr=0.7, outer_momentum=0.9))
    g = _tree(rng)
    frags = streaming.Fragments(g, num_layers=3, count=1)
    plain = _state(np.random.default_rng(3), outer=outer, residual=residual)
    stream = plain._replace(outer_opt_state=streaming.init_outer_states(frags, outer, plain.global_params))

    def reduce(t):  # error feedback: (mean, sent) with a lossy "transport" that rounds to 1/64
        sent = jax.tree.map(lambda v: jnp.round(v * 64) / 64, t)
        return (_mean(sent), sent) if residual else _mean(t)

    for _ in range(3):
        plain, _ = jax.jit(lambda s: diloco.outer_update(s, reduce, outer))(plain)
        stream, _ = jax.jit(lambda s: streaming.sync_fragment(s, frags, 0, reduce, outer, 0.0))(stream)
        # the islands train: same moves on both
        move = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32) * 0.1, plain.inner.params)
        plain = plain._replace(inner=plain.inner._replace(params=jax.tree.map(jnp.add, plain.inner.params, move)))
        stream = stream._replace(inner=stream.inner._replace(params=jax.tree.map(jnp.add, stream.inner.params, move)))
    for a, b in zip(jax.tree.leaves((plain.global_params, plain.inner.params, plain.residual)),
                    jax.tree.leaves((stream.global_params, stream.inner.params, stream.residual))):
        np.testing.assert_array_equal(a, b)


def test_error_feedback_and_nonfinite_means_stay_within_the_fragment():
    rng = np.random.default_rng(4)
    outer = optax.sgd(1.0)
    g = _tree(rng)
    frags = streaming.Fragments(g, num_layers=3, count=2)
    s = _state(rng, outer=outer, frags=frags, residual=True)
    lossy = lambda t: (_mean(jax.tree.map(lambda v: jnp.round(v * 4) / 4, t)),  # noqa: E731
                       jax.tree.map(lambda v: jnp.round(v * 4) / 4, t))
    s1, delta, _ = streaming.reduce_fragment(s, frags, 1, lossy)
    r0, r1 = np.asarray(s.residual["layers"]["w"]), np.asarray(s1.residual["layers"]["w"])
    np.testing.assert_array_equal(r1[:, [0, 2]], r0[:, [0, 2]])  # fragment 0's residual untouched
    assert not np.array_equal(r1[:, 1], r0[:, 1])
    # a NaN from island 0: it is left out of the fragment's mean (diloco.guard), keeps its residual, and takes the
    # new global fragment like every island; island 1 alone makes the mean
    bad = s._replace(inner=s.inner._replace(params=jax.tree.map(lambda a: a.at[0].set(jnp.nan), s.inner.params)))
    b1, delta, m1 = streaming.reduce_fragment(bad, frags, 1, lossy)
    assert float(m1["excluded_islands"]) == 1.0
    np.testing.assert_array_equal(np.asarray(b1.residual["layers"]["w"])[0], r0[0])
    assert not np.array_equal(np.asarray(b1.residual["layers"]["w"])[1, 1], r0[1, 1])
    b2, m = streaming.apply_fragment(b1, frags, 1, delta, outer, 0.0)
    assert float(m["skipped_nonfinite"]) == 0.0
    w = np.asarray(b2.global_params["layers"]["w"])
    assert np.isfinite(w).all() and not np.array_equal(w[1], np.asarray(s.global_params["layers"]["w"])[1])
    np.testing.assert_array_equal(np.asarray(b2.inner.params["layers"]["w"])[:, 1], np.broadcast_to(w[1], (2, 2, 3)))
    # every island non-finite: nothing to average, the fragment's outer step is skipped and nothing changes
    worse = s._replace(inner=s.inner._replace(params=jax.tree.map(lambda a: a * jnp.nan, s.inner.params)))
    w1, delta, _ = streaming.reduce_fragment(worse, frags, 1, lossy)
    np.testing.assert_array_equal(w1.residual["layers"]["w"], s.residual["layers"]["w"])
    w2, m = streaming.apply_fragment(w1, frags, 1, delta, outer, 0.0)
    assert float(m["skipped_nonfinite"]) == 1.0
    np.testing.assert_array_equal(w2.global_params["layers"]["w"], s.global_params["layers"]["w"])


# -- the trainer (MeshSync) ---------------------------------------------------------------------------------------


def _run(run_dir, steps, **diloco):
    from intellect_jax.trainer import train
    from tests.helpers import tiny_run_config

    cfg = tiny_run_config(run_dir, steps, diloco=dict(fragments=2, **diloco), model=dict(num_hidden_layers=3))
    return train(cfg)


def _rows(run_dir, kind):
    from intellect_jax.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def _ckpt_arrays(run_dir, step, names):
    from intellect_jax.checkpoint import Checkpointer
    from intellect_jax.config import CheckpointConfig

    ckpt = Checkpointer(run_dir, CheckpointConfig(), read_only=True)
    try:
        return {name: ckpt.restore_numpy(step, name) for name in names}
    finally:
        ckpt.close()


@pytest.mark.parametrize("diloco", [pytest.param(dict(overlap_steps=0), marks=pytest.mark.slow),  # the simpler path
                                    dict(overlap_steps=1, merge_alpha=0.5)], ids=["tau0", "tau1-alpha0.5"])
def test_trainer_schedule_rows_and_bit_exact_resume_mid_overlap(tmp_path, diloco):
    """H = 3, 2 fragments of 3 layers (offsets 0 and 1): fragment 0 syncs at 3, 6, 9, 12 and fragment 1 at 4, 7, 10;
    with tau = 1 each is applied one step later. A run stopped at step 6 (fragment 0's mean pending when tau = 1)
    and resumed ends bit-identical to one run straight through."""
    tau = diloco["overlap_steps"]
    _run(tmp_path / "a", 12, **diloco)
    outer = _rows(tmp_path / "a", "outer")
    assert [(r["step"], r["fragment"]) for r in outer] == \
        [(s + tau, p) for s, p in [(3, 0), (4, 1), (6, 0), (7, 1), (9, 0), (10, 1), (12, 0)] if s + tau <= 12]
    assert all(r["overlap_steps"] == tau and r["wait_seconds"] == r["sync_seconds"] > 0 for r in outer)
    # fragment 0 holds 2 of the 3 layers and the embedding: it sends more than fragment 1, together the whole model
    b0, b1 = outer[0]["bytes_sent_per_island"], outer[1]["bytes_sent_per_island"]
    assert b0 > b1 > 0
    _run(tmp_path / "b", 6, **diloco)
    _run(tmp_path / "b", 12, **diloco)
    la = [(r["step"], r["loss"]) for r in _rows(tmp_path / "a", "inner")]
    lb = [(r["step"], r["loss"]) for r in _rows(tmp_path / "b", "inner")]
    assert la == lb
    last, names = 12, ("inner", "outer")
    a, b = _ckpt_arrays(tmp_path / "a", last, names), _ckpt_arrays(tmp_path / "b", last, names)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    if tau:  # the run ends with fragment 0's mean in flight: it is part of the checkpoint
        pend = _ckpt_arrays(tmp_path / "a", last, ("pending",))["pending"]
        assert "embed_tokens" in pend and pend["layers/q_proj"].shape[0] == 2  # layers 0 and 2
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(pend))


def test_resume_with_other_fragments_is_refused(tmp_path):
    from intellect_jax.checkpoint import CheckpointError

    _run(tmp_path / "r", 3)
    with pytest.raises(CheckpointError, match="diloco.fragments=2 .* this run has diloco.fragments=3"):
        from intellect_jax.trainer import train
        from tests.helpers import tiny_run_config

        train(tiny_run_config(tmp_path / "r", 6, diloco=dict(fragments=3), model=dict(num_hidden_layers=3)))


def test_fragments_hold_one_pth_of_the_model_each_when_p_divides_the_layers():
    """The embedding and head are split along the vocabulary like the layers: each fragment is 1/P of the model
    (the last one also has the final norm)."""
    g = _tree(np.random.default_rng(5), n_layers=4)
    g["lm_head"] = jnp.zeros((2, 4))
    frags = streaming.Fragments(g, num_layers=4, count=2)
    total = sum(x.size for x in jax.tree.leaves(g))
    sizes = [frags.size(p, g) for p in range(2)]
    assert sizes[0] == (total - g["norm"].size) // 2 and sizes[1] == sizes[0] + g["norm"].size
    assert frags.take(g, 1)["lm_head"].shape == (2, 2)


def test_overlapped_reduce_runs_inside_the_next_step_program(tmp_path):
    """tau > 0 in one program: fragment p's reduce and the next inner step are compiled together, read the same
    pre-step state, and give what the reduce alone and the step alone give; the HLO holds both the island-axis
    collectives and the step's matmuls."""
    from intellect_jax.trainer import Trainer
    from tests.helpers import random_batch, tiny_config

    cfg = tiny_config(mesh=dict(islands=2, fsdp=4), model=dict(num_hidden_layers=3),
                      diloco=dict(inner_steps=3, fragments=2, overlap_steps=1, compression="int8"),
                      data=dict(batch_size=4, seq_len=32))
    trainer = Trainer(cfg)
    sync = trainer.sync
    rng = np.random.default_rng(0)
    rows = [random_batch(rng, 4, 32, cfg.model.vocab_size, docs_per_row=2) for _ in range(2)]
    batch = trainer.make_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    trainer.inner_step(batch)  # islands differ from the global params now
    copy = lambda: jax.tree.map(jnp.copy, sync.state)  # noqa: E731 - the programs donate their input
    fused = sync._frag_step_reduce[1]
    hlo = fused.lower(sync.state, batch).compile().as_text()
    assert ("all-to-all" in hlo or "all-gather" in hlo) and ("dot(" in hlo or "convolution(" in hlo)
    s_f, delta_f, _, m_f = fused(copy(), batch)
    s_r, delta_r, _ = sync._frag_reduce[1](copy())
    inner_s, m_s = sync._inner(copy().inner, batch)
    for a, b in zip(jax.tree.leaves(delta_f), jax.tree.leaves(delta_r)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(m_f["loss"], m_s["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s_f.inner.params), jax.tree.leaves(inner_s.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_elastic_snapshot_is_per_fragment_and_a_fragment_sync_rehashes_only_its_part(tmp_path):
    """ElasticSync's host snapshot (what the islands hash and vote on and a joiner fetches) is named per fragment;
    after a fragment's sync the island copies and hashes only that fragment's part and gets the hash a full copy
    gives; a peer's snapshot installs bit for bit, and one from a run with other fragments is refused by name."""
    import threading

    from intellect_jax.elastic import identity
    from intellect_jax.island import ElasticIsland
    from intellect_jax.trainer import Trainer
    from tests.helpers import tiny_config

    secret = tmp_path / "secret"
    identity.write_secret(secret)
    cfg = tiny_config(mesh=dict(islands=1, fsdp=-1), model=dict(num_hidden_layers=3),
                      diloco=dict(inner_steps=4, fragments=2, overlap_steps=1),
                      elastic=dict(coordinator="127.0.0.1:9", secret_file=str(secret)))
    sync = Trainer(cfg).sync  # not started: nothing connects
    frags, rng = sync.frags, np.random.default_rng(0)
    noisy = lambda t: jax.tree.map(lambda a: (a + rng.normal(size=a.shape)).astype(a.dtype), t)  # noqa: E731
    g, opt = noisy(jax.device_get(sync.state.global_params)), noisy(jax.device_get(sync.state.outer_opt_state))
    sync.install_global(g, opt, 3, 12)
    full = sync.snapshot_arrays()
    assert {k.split("/")[0] for k in full} == {"fragment 0", "fragment 1"}
    n = sum(x.size for x in jax.tree.leaves((g, opt)))
    assert sum(a.size for a in full.values()) == n  # every number once
    for p in range(2):
        part = sync.snapshot_arrays(p)
        assert set(part) == {k for k in full if k.startswith(f"fragment {p}/")}
        assert all(np.array_equal(part[k], full[k]) for k in part)
    g2, opt2 = sync.global_from_snapshot(full)
    for x, y in zip(jax.tree.leaves((g2, opt2)), jax.tree.leaves((g, opt)), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    with pytest.raises(RuntimeError, match="diloco.fragments"):
        sync.global_from_snapshot({k: v for k, v in full.items() if "embed_tokens" not in k})

    def island():  # the snapshot half of an ElasticIsland, without its client
        isl = ElasticIsland.__new__(ElasticIsland)
        isl.local, isl._lock, isl._snapshot = sync, threading.Lock(), None
        return isl

    a = island()
    h0 = a.refresh_snapshot()
    # fragment 1's sync changes its global params and its outer state only
    view = {k: v + 1 for k, v in frags.take(g, 1).items()}
    g3 = frags.assemble(g, [frags.take(g, 0), view])
    opt3 = (opt[0], jax.tree.map(lambda v: v * 2, opt[1]))
    sync.install_global(g3, opt3, 4, 13)
    arrays, meta, known = a._host_copy(1)
    assert set(known) == {k for k in full if k.startswith("fragment 0/")}
    assert all(arrays[k] is a._provide()[0][k] for k in known)  # not copied again
    h1 = a._publish(arrays, meta, known)
    assert h1 != h0 and h1 == island().refresh_snapshot() and meta["outer_step"] == 4


@pytest.mark.parametrize("on_host", [True, False], ids=["outer-state-on-host", "outer-state-on-device"])
def test_snapshot_dispatched_at_the_sync_and_fetched_later_is_the_state_at_the_sync(tmp_path, on_host):
    """The hash vote's thread fetches the host copy that the sync dispatched, while the training thread goes on: it
    must hold the state as it was at the sync even after the next programs donated (deleted) the state's buffers."""
    from intellect_jax.elastic import identity
    from intellect_jax.trainer import Trainer
    from tests.helpers import tiny_config

    secret = tmp_path / "secret"
    identity.write_secret(secret)
    cfg = tiny_config(mesh=dict(islands=1, fsdp=-1), model=dict(num_hidden_layers=3),
                      diloco=dict(inner_steps=4, fragments=2, overlap_steps=1, outer_state_on_host=on_host),
                      elastic=dict(coordinator="127.0.0.1:9", secret_file=str(secret)))
    sync = Trainer(cfg).sync  # not started: nothing connects
    before = sync.snapshot_arrays(1)
    from intellect_jax.sync import _has_pinned_host

    if _has_pinned_host():  # the copy waits for the vote thread in host memory, not in the devices'
        assert {x.sharding.memory_kind for x in jax.tree.leaves(sync._frag_global[1](sync.state))} == {"pinned_host"}
    fetch = sync.snapshot_later(1)
    old = jax.tree.leaves(sync.state.global_params)
    sync.state = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(sync.state)
    assert all(x.is_deleted() for x in old)  # the buffers the copy was taken from are gone
    later = fetch()
    assert set(later) == set(before) and all(np.array_equal(later[k], before[k]) for k in later)
    assert not any(np.array_equal(v, before[k]) for k, v in sync.snapshot_arrays(1).items())
