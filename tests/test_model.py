import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from intellect_jax import model as M
from intellect_jax.config import load_config
from tests.helpers import tiny_model


def _build(cfg, seed=0):
    graphdef, params = M.create(cfg, seed)
    return graphdef, params


def test_param_count_10b_preset_without_allocation():
    cfg = load_config("configs/intellect1-10b.toml").model
    _, shapes, axes = M.abstract_params(cfg)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert abs(n - 10.2e9) / 10.2e9 < 0.01, n
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))


def test_every_parameter_has_logical_axes_of_its_rank():
    cfg = tiny_model()
    _, shapes, axes = M.abstract_params(cfg)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_axes) == len(flat_shapes)
    for a, s in zip(flat_axes, flat_shapes):
        assert len(a) == len(s.shape) and all(isinstance(n, str) for n in a)


def test_init_scales_follow_reference():
    cfg = tiny_model(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                     num_key_value_heads=4)
    _, p = _build(cfg)
    assert np.std(np.asarray(p["layers"]["q_proj"])) == pytest.approx(0.02, rel=0.03)
    for layer in range(4):
        want = 0.02 / np.sqrt(2 * (layer + 1))
        assert np.std(np.asarray(p["layers"]["down_proj"][layer])) == pytest.approx(want, rel=0.05)
        assert np.std(np.asarray(p["layers"]["o_proj"][layer])) == pytest.approx(want, rel=0.05)
    assert np.abs(np.asarray(p["embed_tokens"])).max() <= 2 * 0.02 / 0.8796 + 1e-6


@pytest.mark.parametrize("tie", [False, True])
def test_causality_by_gradient(tie):
    cfg = tiny_model(tie_word_embeddings=tie)
    graphdef, params = _build(cfg)
    L = 12
    emb = jax.random.normal(jax.random.key(1), (1, L, cfg.hidden_size))

    def loss_at(x, t):
        logits = nnx.merge(graphdef, params)(None, inputs_embeds_BLD=x)
        return logits[0, t].sum()

    for t in (0, 5, L - 2):
        g = jax.grad(loss_at)(emb, t)
        assert np.all(np.asarray(g[0, t + 1:]) == 0.0), f"position {t} depends on the future"
        assert np.any(np.asarray(g[0, : t + 1]) != 0.0)


def test_packed_documents_match_separate_runs():
    cfg = tiny_model()
    graphdef, params = _build(cfg)
    rng = np.random.default_rng(0)
    a = rng.integers(0, cfg.vocab_size, 7).astype(np.int32)
    b = rng.integers(0, cfg.vocab_size, 9).astype(np.int32)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 7 + [2] * 9], np.int32)
    pos = np.array([list(range(7)) + list(range(9))], np.int32)
    logits = M.apply(graphdef, params, packed, pos, seg)
    la = M.apply(graphdef, params, a[None])
    lb = M.apply(graphdef, params, b[None])
    np.testing.assert_allclose(logits[0, :7], la[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[0, 7:], lb[0], atol=1e-5, rtol=1e-5)


def test_scan_equals_unrolled_and_remat_is_transparent():
    base = tiny_model()
    graphdef, params = _build(base)
    toks = np.arange(20, dtype=np.int32)[None] % base.vocab_size
    ref = M.apply(graphdef, params, toks)
    for kw in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots")):
        g2, _ = _build(tiny_model(**kw))
        out = M.apply(g2, params, toks)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    scaled = M.rope_inv_freq(tiny_model(head_dim=64, num_attention_heads=2, hidden_size=128, rope_scaling="llama3",
                                        rope_theta=500000.0, rope_original_max_position_embeddings=64))
    plain = M.rope_inv_freq(tiny_model(head_dim=64, num_attention_heads=2, hidden_size=128, rope_theta=500000.0))
    wavelen = 2 * np.pi / np.asarray(plain)
    hi = wavelen < 64 / 4.0
    lo = wavelen > 64 / 1.0
    np.testing.assert_allclose(np.asarray(scaled)[hi], np.asarray(plain)[hi], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(scaled)[lo], np.asarray(plain)[lo] / 8.0, rtol=1e-6)
    assert lo.any() and hi.any()


def _head_reference(x, w):
    return jnp.einsum("bld,dv->blv", x, w, preferred_element_type=jnp.float32)


def _head_loss(head):
    return lambda x, w: jnp.sum(jax.nn.log_softmax(head(x, w), axis=-1)[..., 0] + jnp.sin(head(x, w)).mean(-1))


def test_head_backward_equals_autodiff_in_float32():
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 5, 16), jnp.float32)
    w = jax.random.normal(kw, (16, 40), jnp.float32)
    got = jax.grad(_head_loss(M.head_logits), argnums=(0, 1))(x, w)
    want = jax.grad(_head_loss(_head_reference), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_head_backward_runs_its_matmuls_in_the_compute_dtype():
    """Autodiff pairs the fp32 logit cotangent with bf16 operands (an fp32 matmul on the GPU); the custom backward
    rounds the cotangent to bf16 first, and its gradients stay within bf16 rounding of the fp32 reference."""
    kx, kw = jax.random.split(jax.random.key(1))
    x32 = jax.random.normal(kx, (2, 8, 64), jnp.float32)
    w32 = jax.random.normal(kw, (64, 96), jnp.float32) / 8
    x, w = x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)

    def dot_dtypes(head):
        jaxpr = jax.make_jaxpr(jax.grad(_head_loss(head), argnums=(0, 1)))(x, w)
        return {tuple(v.aval.dtype.name for v in e.invars) for e in jaxpr.eqns if e.primitive.name == "dot_general"}

    assert ("float32", "bfloat16") in dot_dtypes(_head_reference)  # what the custom backward avoids
    assert dot_dtypes(M.head_logits) == {("bfloat16", "bfloat16")}
    got = jax.grad(_head_loss(M.head_logits), argnums=(0, 1))(x, w)
    want = jax.grad(_head_loss(_head_reference), argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    for g, r, inp in zip(got, want, (x, w)):
        assert g.dtype == inp.dtype
        err = np.abs(np.asarray(g, np.float32) - np.asarray(r))
        assert err.max() <= 2**-7 * np.abs(np.asarray(r)).max(), err.max()
