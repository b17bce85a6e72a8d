"""Flax NNX Llama-3 with Hugging Face ``LlamaForCausalLM`` semantics.

Same maths and RoPE layout as transformers' Llama (rotate-half over concatenated halves), so export to Hugging Face
is a rename + transpose, never a permutation. Knows nothing of islands or meshes: every parameter carries logical
axis names (metadata ``axes``) that sharding.py maps onto a mesh.

Decoder layers keep their parameters stacked on a leading ``layers`` axis and run under ``jax.lax.scan`` with a
configurable remat policy (what ``nnx.scan`` does, written out so the per-layer init scale below is exact).

Shape legend: B batch, L sequence, D hidden, H query heads, K key/value heads, Dh head dim, F ffn, V vocab,
N layers.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from intellect_jax import attention
from intellect_jax.config import ModelConfig

Array = jax.Array
ActivationConstraint = Callable[[Array, tuple[str | None, ...]], Array]

LAYER_NAMES = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
               "gate_proj", "up_proj", "down_proj")


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _no_constraint(x: Array, axes: tuple[str | None, ...]) -> Array:
    del axes
    return x


@jax.custom_vjp
def head_logits(x_BLD: Array, head_DV: Array) -> Array:
    """LM head: fp32 logits from compute-dtype activations and weights (fp32 accumulation).

    The custom backward rounds the fp32 logit cotangent to the compute dtype before its two matmuls, as every other
    matmul of the model runs: plain autodiff would pair the fp32 cotangent [B, L, V] with bf16 operands, and XLA
    runs such mixed matmuls in fp32 (the head's two backward matmuls are ~2/3 of its FLOPs, ~1/7 of the model's at
    the 1B preset). With fp32 compute the cast is the identity and the gradients are autodiff's.
    """
    return jnp.einsum("bld,dv->blv", x_BLD, head_DV, preferred_element_type=jnp.float32)


def _head_logits_fwd(x_BLD, head_DV):
    return head_logits(x_BLD, head_DV), (x_BLD, head_DV)


def _head_logits_bwd(res, g_BLV):
    x_BLD, head_DV = res
    g_BLV = g_BLV.astype(x_BLD.dtype)
    dx = jnp.einsum("blv,dv->bld", g_BLV, head_DV, preferred_element_type=jnp.float32).astype(x_BLD.dtype)
    dw = jnp.einsum("bld,blv->dv", x_BLD, g_BLV, preferred_element_type=jnp.float32).astype(head_DV.dtype)
    return dx, dw


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


class DecoderLayers(nnx.Module):
    """All decoder layers, parameters stacked as [N, ...]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n, d, f = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        h, k, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
        pdt = _dtype(cfg.param_dtype)
        std = cfg.initializer_range
        # Output projections are scaled by depth: std / sqrt(2 (layer + 1)) (torchtitan's `depth_init`, which PRIME,
        # the INTELLECT-1 training code, uses).
        out_scale = std / jnp.sqrt(2.0 * (jnp.arange(n, dtype=jnp.float32) + 1.0))

        def normal(shape, scale=None):
            w = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
            # Truncation at 2 sigma shrinks the std by 0.8796; undo it so the std is exactly as asked.
            w = w / 0.87962566103423978
            w = w * (std if scale is None else scale.reshape((n,) + (1,) * (len(shape) - 1)))
            return w.astype(pdt)

        def param(value, axes):
            return nnx.Param(value, axes=("layers",) + axes)

        self.input_layernorm = param(jnp.ones((n, d), pdt), ("norm",))
        self.q_proj = param(normal((n, d, h, dh)), ("embed", "heads", "head_dim"))
        self.k_proj = param(normal((n, d, k, dh)), ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(normal((n, d, k, dh)), ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(normal((n, h, dh, d), out_scale), ("heads", "head_dim", "embed"))
        self.post_attention_layernorm = param(jnp.ones((n, d), pdt), ("norm",))
        self.gate_proj = param(normal((n, d, f)), ("embed", "mlp"))
        self.up_proj = param(normal((n, d, f)), ("embed", "mlp"))
        self.down_proj = param(normal((n, f, d), out_scale), ("mlp", "embed"))

    def __call__(self, x_BLD, cos_BLK, sin_BLK, segment_ids_BL, constrain: ActivationConstraint) -> Array:
        cfg = self.cfg
        stacked = {name: getattr(self, name)[...] for name in LAYER_NAMES}

        def body(x, layer):
            return decoder_layer(cfg, layer, x, cos_BLK, sin_BLK, segment_ids_BL, constrain), None

        body = _remat(body, cfg.remat)
        if cfg.scan_layers:
            x_BLD, _ = jax.lax.scan(body, x_BLD, stacked)
        else:
            for i in range(cfg.num_hidden_layers):
                x_BLD, _ = body(x_BLD, {name: w[i] for name, w in stacked.items()})
        return x_BLD

    def extend(self, x_BLD, cos_BLK, sin_BLK, mask_B1LS, cache: KVCache, start) -> tuple[Array, Array, Array]:
        """All layers over L new tokens at cache slots [start, start + L): (output, their keys, their values)."""
        cfg = self.cfg
        stacked = {name: getattr(self, name)[...] for name in LAYER_NAMES}

        def body(x, layer_k_v):
            layer, k_BSKD, v_BSKD = layer_k_v
            x, k_BLKD, v_BLKD = decoder_layer_cached(cfg, layer, x, cos_BLK, sin_BLK, mask_B1LS, k_BSKD, v_BSKD,
                                                     start)
            return x, (k_BLKD, v_BLKD)

        x_BLD, (k_NBLKD, v_NBLKD) = jax.lax.scan(body, x_BLD, (stacked, cache.k, cache.v))
        return x_BLD, k_NBLKD, v_NBLKD


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def decoder_layer(cfg: ModelConfig, p: dict[str, Array], x_BLD: Array, cos, sin, segment_ids_BL, constrain) -> Array:
    w = _layer_weights(cfg, p)
    q_BLHD, k_BLKD, v_BLKD = _qkv(cfg, w, x_BLD, cos, sin)
    attn_BLHD = attention.attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, cfg.attention_impl,
                                    mesh=getattr(constrain, "mesh", None))
    return _attn_out_and_mlp(cfg, w, x_BLD, attn_BLHD, constrain)


def _layer_weights(cfg: ModelConfig, p: dict[str, Array]) -> dict[str, Array]:
    cdt = _dtype(cfg.compute_dtype)
    return {k: v.astype(cdt) for k, v in p.items()}


def _qkv(cfg: ModelConfig, w: dict[str, Array], x_BLD: Array, cos, sin) -> tuple[Array, Array, Array]:
    h_BLD = rms_norm(x_BLD, w["input_layernorm"], cfg.rms_norm_eps)
    q_BLHD = jnp.einsum("bld,dhk->blhk", h_BLD, w["q_proj"])
    k_BLKD = jnp.einsum("bld,dhk->blhk", h_BLD, w["k_proj"])
    v_BLKD = jnp.einsum("bld,dhk->blhk", h_BLD, w["v_proj"])
    return apply_rope(q_BLHD, cos, sin), apply_rope(k_BLKD, cos, sin), v_BLKD


def _attn_out_and_mlp(cfg: ModelConfig, w: dict[str, Array], x_BLD: Array, attn_BLHD: Array, constrain) -> Array:
    x_BLD = x_BLD + jnp.einsum("blhk,hkd->bld", attn_BLHD, w["o_proj"])
    x_BLD = constrain(x_BLD, ("batch", "length", "act_embed"))
    h_BLD = rms_norm(x_BLD, w["post_attention_layernorm"], cfg.rms_norm_eps)
    gate_BLF = jnp.einsum("bld,df->blf", h_BLD, w["gate_proj"])
    up_BLF = jnp.einsum("bld,df->blf", h_BLD, w["up_proj"])
    act_BLF = constrain(jax.nn.silu(gate_BLF) * up_BLF, ("batch", "length", "act_mlp"))
    x_BLD = x_BLD + jnp.einsum("blf,fd->bld", act_BLF, w["down_proj"])
    return constrain(x_BLD, ("batch", "length", "act_embed"))


# ---------------------------------------------------------------------------------------------------------------------
# Incremental decoding with a key/value cache (generate.py). The training forward above does not use any of it.


class KVCache(NamedTuple):
    """Rotated keys and values of every layer, ``[N, B, S, K, Dh]``; slot s holds position s."""

    k: Array
    v: Array


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.resolved_head_dim)
    zeros = jnp.zeros(shape, _dtype(cfg.compute_dtype))
    return KVCache(zeros, zeros)


def decoder_layer_cached(cfg: ModelConfig, p: dict[str, Array], x_BLD: Array, cos, sin, mask_B1LS: Array,
                         k_BSKD: Array, v_BSKD: Array, start: Array) -> tuple[Array, Array, Array]:
    """:func:`decoder_layer` for L new tokens at cache slots [start, start + L) of one layer's cache.

    Returns (output, the new tokens' keys, their values); the caller writes those into the cache. XLA attention:
    the cuDNN kernel is for training-shaped (square, causal) inputs.
    """
    w = _layer_weights(cfg, p)
    q_BLHD, k_BLKD, v_BLKD = _qkv(cfg, w, x_BLD, cos, sin)
    k_BSKD = jax.lax.dynamic_update_slice_in_dim(k_BSKD, k_BLKD.astype(k_BSKD.dtype), start, axis=1)
    v_BSKD = jax.lax.dynamic_update_slice_in_dim(v_BSKD, v_BLKD.astype(v_BSKD.dtype), start, axis=1)
    attn_BLHD = jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask_B1LS, implementation="xla")
    return _attn_out_and_mlp(cfg, w, x_BLD, attn_BLHD, _no_constraint), k_BLKD, v_BLKD


# ---------------------------------------------------------------------------------------------------------------------
# Rotary embeddings (HF layout: the two halves of the head dim are the real/imaginary parts).


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies, computed on the host in transformers' order of fp32 operations (bit-identical).

    XLA's fp32 power/division differ from torch by a few ulp for some head dims; doing it in numpy exactly as
    transformers does keeps HF logit parity at 1e-5 for every configuration.
    """
    f32 = np.float32
    dh = cfg.resolved_head_dim
    exponent = np.arange(0, dh, 2).astype(f32) / f32(dh)
    inv_freq = f32(1) / (np.float64(cfg.rope_theta) ** exponent.astype(np.float64)).astype(f32)
    if cfg.rope_scaling == "llama3":
        # Llama 3.1 frequency-dependent scaling (transformers' _compute_llama3_parameters).
        old_len = cfg.rope_original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / cfg.rope_low_freq_factor, old_len / cfg.rope_high_freq_factor
        wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)  # torch evaluates scalar / tensor as reciprocal * scalar
        scaled = np.where(wavelen > low_wavelen, inv_freq / f32(cfg.rope_factor), inv_freq)
        smooth = (((f32(1) / wavelen) * f32(old_len) - f32(cfg.rope_low_freq_factor))
                  / f32(cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
        smoothed = (f32(1) - smooth) * scaled / f32(cfg.rope_factor) + smooth * scaled
        inv_freq = np.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), smoothed, scaled)
    return inv_freq.astype(f32)


def rope_cos_sin(cfg: ModelConfig, positions_BL: Array, dtype) -> tuple[Array, Array]:
    freqs_BLK = positions_BL.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
    emb = jnp.concatenate([freqs_BLK, freqs_BLK], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_BLHD: Array, cos_BLD: Array, sin_BLD: Array) -> Array:
    half = x_BLHD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BLHD[..., half:], x_BLHD[..., :half]], axis=-1)
    return x_BLHD * cos_BLD[:, :, None, :] + rotated * sin_BLD[:, :, None, :]


# ---------------------------------------------------------------------------------------------------------------------


class Llama(nnx.Module):
    """Llama-3 causal LM. ``__call__(tokens, positions, segment_ids) -> fp32 logits [B, L, V]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = _dtype(cfg.param_dtype)
        init = jax.nn.initializers.truncated_normal(cfg.initializer_range)
        self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt),
                                      axes=("vocab", "embed"))
        self.layers = DecoderLayers(cfg, rngs=rngs)
        self.norm = nnx.Param(jnp.ones((cfg.hidden_size,), pdt), axes=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt),
                                     axes=("embed", "vocab"))

    def __call__(self, tokens_BL: Array | None, positions_BL: Array | None = None,
                 segment_ids_BL: Array | None = None, constrain: ActivationConstraint | None = None,
                 inputs_embeds_BLD: Array | None = None) -> Array:
        """Either tokens or (as in transformers) input embeddings; segment_ids mask attention per document."""
        cfg = self.cfg
        constrain = constrain or _no_constraint
        cdt = _dtype(cfg.compute_dtype)
        if inputs_embeds_BLD is None:
            inputs_embeds_BLD = jnp.take(self.embed_tokens[...], tokens_BL, axis=0)
        B, L = inputs_embeds_BLD.shape[:2]
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        cos, sin = rope_cos_sin(cfg, positions_BL, cdt)
        x_BLD = inputs_embeds_BLD.astype(cdt)
        x_BLD = constrain(x_BLD, ("batch", "length", "act_embed"))
        x_BLD = self.layers(x_BLD, cos, sin, segment_ids_BL, constrain)
        return constrain(self._head(x_BLD), ("batch", "length", "act_vocab"))

    def _head(self, x_BLD: Array) -> Array:
        """Final norm and LM head: fp32 logits."""
        cfg = self.cfg
        x_BLD = rms_norm(x_BLD, self.norm[...], cfg.rms_norm_eps)
        head_DV = self.embed_tokens[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        return head_logits(x_BLD, head_DV.astype(_dtype(cfg.compute_dtype)))

    def extend(self, tokens_BL: Array, cache: KVCache, start: Array) -> tuple[Array, KVCache]:
        """Incremental forward for generation: tokens_BL are positions [start, start + L) of every row, the cache
        holds positions [0, start). Returns (fp32 logits [B, L, V], the cache with the new positions added)."""
        cfg = self.cfg
        cdt = _dtype(cfg.compute_dtype)
        B, L = tokens_BL.shape
        S = cache.k.shape[2]
        positions_L = start + jnp.arange(L, dtype=jnp.int32)
        mask_B1LS = jnp.broadcast_to(jnp.arange(S)[None, :] <= positions_L[:, None], (B, 1, L, S))
        cos, sin = rope_cos_sin(cfg, jnp.broadcast_to(positions_L, (B, L)), cdt)
        x_BLD = jnp.take(self.embed_tokens[...], tokens_BL, axis=0).astype(cdt)
        x_BLD, k_NBLKD, v_NBLKD = self.layers.extend(x_BLD, cos, sin, mask_B1LS, cache, start)
        cache = KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k_NBLKD, start, axis=2),
                        jax.lax.dynamic_update_slice_in_dim(cache.v, v_NBLKD, start, axis=2))
        return self._head(x_BLD), cache


# ---------------------------------------------------------------------------------------------------------------------
# Functional view used by the trainer: graphdef + a plain nested dict of parameter arrays.


def create(cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, dict]:
    """Builds the model; returns (graphdef, params as a nested dict of arrays). Wrap in eval_shape/jit as needed."""
    model = Llama(cfg, rngs=nnx.Rngs(params=seed))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, ShapeDtypeStruct tree, logical-axes tree) without allocating anything.

    The axes tree mirrors the params dict; each leaf is a PartitionSpec of logical axis names.
    """
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, state = nnx.split(abstract_model, nnx.Param)
    axes: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = axes
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = PartitionSpec(*var.get_metadata()["axes"])
    return graphdef, nnx.to_pure_dict(state), axes


def apply(graphdef: nnx.GraphDef, params: dict, tokens_BL, positions_BL=None, segment_ids_BL=None,
          constrain: ActivationConstraint | None = None) -> Array:
    """Pure forward: params (nested dict) -> fp32 logits."""
    return nnx.merge(graphdef, params)(tokens_BL, positions_BL, segment_ids_BL, constrain)


def apply_cached(graphdef: nnx.GraphDef, params: dict, tokens_BL, cache: KVCache, start) -> tuple[Array, KVCache]:
    """Pure incremental forward (see :meth:`Llama.extend`): -> (fp32 logits, updated cache)."""
    return nnx.merge(graphdef, params).extend(tokens_BL, cache, start)
