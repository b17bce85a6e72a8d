"""Blockwise (flash) attention against the masked reference: values and gradients, documents, padding, GQA,
the model as a whole, and compiled memory at the 10B preset's sequence length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intellect_jax import attention as attn
from intellect_jax import model as model_lib
from tests.helpers import tiny_model


def _qkv(B, L, H, K, D, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, L, H, D), dtype), jax.random.normal(ks[1], (B, L, K, D), dtype),
            jax.random.normal(ks[2], (B, L, K, D), dtype))


def _segments(B, L, p, seed=0):
    """Packed rows: a new document starts with probability p at each position."""
    starts = np.random.RandomState(seed).rand(B, L) < p
    return jnp.asarray(np.cumsum(starts, axis=1) + 1, jnp.int32)


@pytest.mark.parametrize("L,block,H,K,p", [(128, 32, 4, 4, 0.05), (200, 64, 4, 2, 0.03), (96, 96, 8, 1, 0.2),
                                           (64, 512, 2, 1, 0.0)])
@pytest.mark.parametrize("with_segments", [False, True])
def test_blockwise_matches_masked_reference(L, block, H, K, p, with_segments):
    q, k, v = _qkv(2, L, H, K, 16)
    seg = _segments(2, L, p) if with_segments else None

    def f(impl):
        return lambda q, k, v: attn.attention(q, k, v, seg, impl, block=block)

    ref, ref_vjp = jax.vjp(f("xla"), q, k, v)
    out, out_vjp = jax.vjp(f("blockwise"), q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    dout = jax.random.normal(jax.random.key(7), ref.shape)
    for g, g_ref in zip(out_vjp(dout), ref_vjp(dout)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiles", [None, {"block_q": 32, "block_k": 64, "block_q_dkv": 16, "block_kv_dkv": 32,
                                            "block_q_dq": 32, "block_kv_dq": 16, "num_warps": 4, "num_stages": 3}])
def test_pallas_kernel_with_its_tiles_matches_xla(tiles, monkeypatch):
    """The Pallas kernel's path (GQA repeat, scale, the tiles of attention.PALLAS_TUNING), run by Pallas' interpreter
    on the CPU: the same outputs and gradients as the XLA reference, documents included."""
    if tiles is not None:  # None: the shipped tiles
        monkeypatch.setattr(attn, "PALLAS_TUNING", tiles)
    q, k, v = _qkv(1, 128, 4, 2, 32)
    seg = _segments(1, 128, 1 / 40)
    ref, ref_vjp = jax.vjp(lambda q, k, v: attn.attention(q, k, v, seg, "xla"), q, k, v)
    out, out_vjp = jax.vjp(lambda q, k, v: attn._pallas_attention(q, k, v, seg, interpret=True), q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    dout = jax.random.normal(jax.random.key(7), ref.shape)
    for g, g_ref in zip(out_vjp(dout), ref_vjp(dout)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_auto_picks_blockwise_for_long_sequences_on_cpu():
    assert attn.resolve_impl("auto", jnp.float32, 128, True) == "xla"
    assert attn.resolve_impl("auto", jnp.float32, attn.AUTO_BLOCKWISE_MIN_LEN, True) == "blockwise"
    assert attn.resolve_impl("cudnn", jnp.float32, 128, True) == "cudnn"


def test_model_logits_and_grads_blockwise_equal_xla():
    cfg = tiny_model(attention_impl="xla")
    graphdef, params = model_lib.create(cfg, seed=0)
    graphdef_bw, _ = model_lib.create(tiny_model(attention_impl="blockwise"), seed=0)
    B, L = 2, 48
    tokens = jax.random.randint(jax.random.key(1), (B, L), 0, cfg.vocab_size)
    seg = _segments(B, L, 0.1, seed=3)
    positions = jnp.asarray(np.concatenate([[0], np.arange(1, L)])[None].repeat(B, 0), jnp.int32)

    def loss(gd):
        return lambda p: jnp.mean(model_lib.apply(gd, p, tokens, positions, seg) ** 2)

    l_ref, g_ref = jax.value_and_grad(loss(graphdef))(params)
    l_bw, g_bw = jax.value_and_grad(loss(graphdef_bw))(params)
    np.testing.assert_allclose(l_bw, l_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_bw), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _compiled_bytes(impl, L, H=32, K=8, D=128, B=1):
    """Temp + output bytes of one forward + backward of attention at [B, L, H, D] (compile only; nothing runs)."""
    q, k, v = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((B, L, H, D), (B, L, K, D), (B, L, K, D)))
    seg = jax.ShapeDtypeStruct((B, L), jnp.int32)

    def f(q, k, v, seg):
        return jax.grad(lambda q, k, v: attn.attention(q, k, v, seg, impl).astype(jnp.float32).sum(),
                        argnums=(0, 1, 2))(q, k, v)

    mem = jax.jit(f).lower(q, k, v, seg).compile().memory_analysis()
    return mem.temp_size_in_bytes + mem.output_size_in_bytes


def test_blockwise_builds_no_length_squared_array_at_10b_sequence_length():
    L = 8192
    xla, blockwise = _compiled_bytes("xla", L), _compiled_bytes("blockwise", L)
    half = _compiled_bytes("blockwise", L // 2)
    # The masked path holds [B, H, L, L] logits (32 x 8192^2 x 2 bytes = 4 GiB in bf16) and the [B, 1, L, L] mask.
    assert xla > 32 * L * L * 2, xla
    # Blockwise: O(B L H Dh) activations and gradients plus O(H block^2) per block: linear in L (doubling L at
    # most doubles it; an L x L term would quadruple), and a small fraction of the masked path.
    assert blockwise <= 2 * half, (blockwise, half)
    assert blockwise * 10 < xla, (blockwise, xla)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("max_documents", [None, 200])
def test_document_offsets_describe_the_segments(p, max_documents):
    """cuDNN's packed description (lengths, offsets) rebuilds exactly the document mask of the segment ids."""
    B, L = 3, 200
    seg = _segments(B, L, p, seed=5)
    lengths, offsets = attn.document_offsets(seg, max_documents)
    M = max_documents or L
    assert lengths.shape == (B, M) and offsets.shape == (B, M + 1)
    lengths, offsets = np.asarray(lengths), np.asarray(offsets)
    doc = np.full((B, L), -1)
    for b in range(B):
        n = int((offsets[b] >= 0).sum())
        assert (offsets[b, n:] == -1).all() and (lengths[b, n:] == -1).all() and (lengths[b, :n] > 0).all()
        assert offsets[b, 0] == 0 and (np.diff(offsets[b, :n]) == lengths[b, :n - 1]).all()
        assert offsets[b, n - 1] + lengths[b, n - 1] == L
        for d in range(n):
            doc[b, offsets[b, d]:offsets[b, d] + lengths[b, d]] = d
    rebuilt = (doc[:, :, None] == doc[:, None, :]) & np.tril(np.ones((L, L), bool))
    np.testing.assert_array_equal(rebuilt[:, None], np.asarray(attn.causal_document_mask(seg, B, L)))


@pytest.mark.parametrize("mesh_cfg", [dict(islands=2, fsdp=2, tensor=2),
                                      pytest.param(dict(islands=2, fsdp=4), marks=pytest.mark.slow)])
def test_blockwise_per_shard_in_a_sharded_diloco_step_equals_xla(mesh_cfg):
    """Under the trainer's mesh (islands vmapped, batch over fsdp, heads over tensor) the shard_mapped kernel gives
    the masked reference's loss and parameters after one inner step."""
    from intellect_jax.trainer import Trainer
    from tests.helpers import random_batch, tiny_config

    results = []
    for impl in ("xla", "blockwise"):
        cfg = tiny_config(model=dict(attention_impl=impl), mesh=mesh_cfg, data=dict(batch_size=4, seq_len=32))
        trainer = Trainer(cfg)
        rng = np.random.default_rng(0)
        rows = [random_batch(rng, 4, 32, cfg.model.vocab_size, docs_per_row=3) for _ in range(trainer.num_islands)]
        host = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        metrics = trainer.inner_step(trainer.make_batch(host))
        params = jax.device_get(trainer.sync.state.inner.params)  # [islands, ...] after the step
        results.append((np.asarray(metrics["loss"]), params))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
