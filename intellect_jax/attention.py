"""Causal, document-masked attention without an [B, 1, L, L] mask.

``attention(q, k, v, segment_ids, impl)`` is what the model calls. Query i sees key j iff j <= i and both lie in the
same document (equal segment ids). The implementations:

- ``xla``: ``jax.nn.dot_product_attention`` with the full boolean mask built in memory. The reference; fine for
  short sequences (tests, Hugging Face parity) but at the 10B preset's 8192 tokens the mask alone is 64 MiB per row
  and XLA's logits are [B, H, L, L].
- ``cudnn``: cuDNN's fused flash kernel (NVIDIA GPUs). Without segment ids it takes ``is_causal`` and builds no
  mask; with them it is fed the [B, 1, L, L] mask as a bias (``cudnn_mask`` names that explicitly).
- ``blockwise``: flash attention written in JAX (any backend): queries and keys in blocks, an online softmax over
  key blocks up to the diagonal only, the mask of each block made from the segment ids of its rows and columns, and
  a ``custom_vjp`` whose backward pass recomputes the blocks from the saved log-sum-exp. Memory O(B L H Dh) and
  O(B H block^2) per step; no L x L array in the forward or the backward pass.
- ``pallas``: the fused Triton kernel of ``jax.experimental.pallas.ops.gpu.attention`` (GPU only; takes segment
  ids), key/value heads repeated to the query heads.
- ``auto``: on a GPU in bf16/fp16, ``cudnn`` without segment ids; with them ``cudnn_mask`` below
  AUTO_BLOCKWISE_MIN_LEN and ``pallas`` from there on. Elsewhere ``xla`` below AUTO_BLOCKWISE_MIN_LEN and
  ``blockwise`` from there on. So from 2048 tokens on no [L, L] array is built anywhere.

Measured on one H200 at the 10B preset's attention shape (B1 L8192 H32 K8 Dh128, bf16, fwd + bwd with documents;
benchmarks/RESULTS.md, GPU): pallas 7.5 ms with tuned tiles (14.7 ms with jax's default tiles),
cudnn_mask 12.9 ms, blockwise 27 ms, xla 25 ms with 20 GiB of temporaries; cuDNN causal without documents 4.1 ms. cuDNN's packed layout ran in 2.8 ms with M = 64 document slots
but its workspace grows with M (16 GiB at M = 64; M = L asks for TiBs), so it needs a bound on documents per row
that packed data does not have; :func:`cudnn_packed_attention` keeps it for the benchmark, no config reaches it.

Shape legend: B batch, L query length, S key length (= L here), H query heads, K key/value heads, G = H / K,
Dh head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLS = ("auto", "xla", "cudnn", "cudnn_mask", "blockwise", "pallas")
AUTO_BLOCKWISE_MIN_LEN = 2048  # from here on the [B, 1, L, L] mask and [B, H, L, L] logits dominate memory
DEFAULT_BLOCK = 512
_NEG = -1e30  # a finite "minus infinity": exp(_NEG - m) is 0 without inf - inf NaNs


def causal_document_mask(segment_ids_BL: Array | None, B: int, L: int) -> Array:
    """[B, 1, L, L] boolean: query i sees key j iff j <= i and both lie in the same document."""
    causal = jnp.tril(jnp.ones((L, L), dtype=jnp.bool_))
    if segment_ids_BL is None:
        return jnp.broadcast_to(causal, (B, 1, L, L))
    same_doc = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (same_doc & causal)[:, None, :, :]


def resolve_impl(impl: str, dtype, length: int, has_segments: bool) -> str:
    """The implementation ``auto`` stands for on this backend (others are returned as they are)."""
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    long = length >= AUTO_BLOCKWISE_MIN_LEN
    if on_gpu:
        return "pallas" if has_segments and long else "cudnn_mask" if has_segments else "cudnn"
    if long:
        return "blockwise"
    return "xla"


def attention(q_BLHD: Array, k_BSKD: Array, v_BSKD: Array, segment_ids_BL: Array | None, impl: str = "auto",
              block: int = DEFAULT_BLOCK, mesh=None) -> Array:
    """Causal self-attention within documents; returns [B, L, H, Dh] in q's dtype.

    ``mesh``: the island's mesh when the caller runs under one (sharding.activation_constraint carries it). The
    ``pallas`` and ``blockwise`` kernels then run once per shard (batch over data x fsdp, heads over tensor) under
    ``shard_map``: XLA has no partitioning rule for a Pallas call and would otherwise gather q, k and v on every
    device.
    """
    B, L = q_BLHD.shape[:2]
    impl = resolve_impl(impl, q_BLHD.dtype, L, segment_ids_BL is not None)
    if impl == "cudnn" and segment_ids_BL is None:
        return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, is_causal=True, implementation="cudnn")
    if impl in ("xla", "cudnn", "cudnn_mask"):
        mask = causal_document_mask(segment_ids_BL, B, L)
        return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask,
                                            implementation="xla" if impl == "xla" else "cudnn")
    if impl == "blockwise":
        return _per_shard(functools.partial(blockwise_attention, block=block), mesh, q_BLHD, k_BSKD, v_BSKD,
                          segment_ids_BL)
    if impl == "pallas":
        return _per_shard(_pallas_attention, mesh, q_BLHD, k_BSKD, v_BSKD, segment_ids_BL)
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")


def _per_shard(fn, mesh, q_BLHD, k_BSKD, v_BSKD, segment_ids_BL):
    """``fn(q, k, v, segment_ids)`` on each device's shard: batch over data x fsdp, heads over tensor."""
    if mesh is None or mesh.size == 1:
        return fn(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL)
    from jax.sharding import PartitionSpec as P

    from intellect_jax import sharding

    batch = sharding.logical_to_mesh(("batch",), q_BLHD.shape[:1], mesh)[0]
    heads = sharding.logical_to_mesh(("heads",), (math.gcd(q_BLHD.shape[2], k_BSKD.shape[2]),), mesh)[0]
    qkv = P(batch, None, heads, None)
    if segment_ids_BL is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(qkv, qkv, qkv), out_specs=qkv,
                             check_vma=False)(q_BLHD, k_BSKD, v_BSKD)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv,
                         check_vma=False)(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL)


def document_offsets(segment_ids_BL: Array, max_documents: int | None = None) -> tuple[Array, Array]:
    """cuDNN's packed-sequence description of rows of contiguous documents.

    Returns (lengths [B, M], offsets [B, M + 1]), int32: the start and length of each document of a row in order,
    padded with -1; M = ``max_documents`` (default L, always enough: a row of L tokens holds at most L documents).
    A document is a maximal run of equal segment ids.
    """
    B, L = segment_ids_BL.shape
    M = max_documents or L
    starts = jnp.concatenate([jnp.ones((B, 1), jnp.bool_), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
    first = jax.vmap(lambda s: jnp.nonzero(s, size=M, fill_value=-1)[0])(starts).astype(jnp.int32)  # [B, M]
    following = jnp.concatenate([first[:, 1:], jnp.full((B, 1), -1, jnp.int32)], axis=1)
    ends = jnp.where(following >= 0, following, L)
    lengths = jnp.where(first >= 0, ends - first, -1)
    return lengths, jnp.concatenate([first, jnp.full((B, 1), -1, jnp.int32)], axis=1)


def cudnn_packed_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, max_documents: int):
    """cuDNN with documents as packed sequences (Hopper; ``jax._src.cudnn``). Rows with more than
    ``max_documents`` documents are attended wrongly (the excess documents merge into the last), and the workspace
    grows with ``max_documents``: for benchmarks/gpu.py only."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    lengths, offsets = document_offsets(segment_ids_BL, max_documents)
    return cudnn_attention.dot_product_attention(
        q_BLHD, k_BSKD, v_BSKD, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
        scale=q_BLHD.shape[-1] ** -0.5, mask_type=cudnn_attention.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


# Tiles of the Pallas kernel: BlockSizes fields (block_q, block_k, block_q_dkv, block_kv_dkv, block_q_dq,
# block_kv_dq) plus num_warps / num_stages; missing keys take jax's defaults (forward 128 x 128, backward 32 x 32,
# 2 stages). benchmarks/gpu.py --tune timed 24 tilings on an H200 at the 1B preset's shape (B4 L4096 H32 K8 Dh128,
# documents): the backward pass's 32 x 32 default tiles were the cost (15.2 ms forward + backward); 64 x 64 or
# 128 x 128 backward tiles take 7.95-8.2 ms (within noise of each other); these gave the faster 1B step (0.367 s,
# MFU 40.8%; RESULTS.md, GPU).
PALLAS_TUNING: dict = {"block_q": 128, "block_k": 64, "block_q_dkv": 128, "block_kv_dkv": 128, "block_q_dq": 128,
                       "block_kv_dq": 128, "num_stages": 3, "num_warps": 8}


def _pallas_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, interpret: bool = False):
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    G = q_BLHD.shape[2] // k_BSKD.shape[2]
    k_BSHD, v_BSHD = (jnp.repeat(x, G, axis=2) for x in (k_BSKD, v_BSKD))
    scale = q_BLHD.shape[-1] ** -0.5
    tiles = dict(PALLAS_TUNING)
    extra = {k: tiles.pop(k) for k in ("num_warps", "num_stages") if k in tiles}
    L = q_BLHD.shape[1]
    blocks = dataclasses.replace(pallas_attention.BlockSizes.get_default(),
                                 **{k: min(v, L) for k, v in tiles.items()})
    return pallas_attention.mha(q_BLHD, k_BSHD, v_BSHD, segment_ids_BL, sm_scale=scale, causal=True,
                                block_sizes=blocks, interpret=interpret, **extra)


# ---------------------------------------------------------------------------------------------------------------------
# Blockwise (flash) attention in JAX.


def blockwise_attention(q_BLHD: Array, k_BSKD: Array, v_BSKD: Array, segment_ids_BL: Array | None,
                        block: int = DEFAULT_BLOCK) -> Array:
    """Causal document-masked attention in blocks of ``block`` queries x ``block`` keys (see the module doc).

    L need not be a multiple of ``block``: the tail is padded, and causality keeps padded keys out of every real
    query's view.
    """
    B, L, H, Dh = q_BLHD.shape
    K = k_BSKD.shape[2]
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({K})")
    if k_BSKD.shape[1] != L:
        raise ValueError(f"blockwise attention is self-attention: {L} queries but {k_BSKD.shape[1]} keys")
    block = min(block, L)
    pad = -L % block
    seg = jnp.zeros((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL.astype(jnp.int32)
    if pad:
        q_BLHD, k_BSKD, v_BSKD = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BLHD, k_BSKD, v_BSKD))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    q = q_BLHD.reshape(B, L + pad, K, H // K, Dh)
    out = _flash(q, k_BSKD, v_BSKD, seg, block)
    return out.reshape(B, L + pad, H, Dh)[:, :L]


def _blocks(x, block):
    """[B, L, ...] -> [n, B, block, ...]."""
    B, L = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, L // block, block, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """[n, B, block, ...] -> [B, n * block, ...]."""
    n, B, blk = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * blk, *x.shape[3:])


def _block_mask(i, j, seg_q, seg_k, block):
    """[B, 1, 1, bq, bk]: causal by absolute position, and same segment."""
    qpos = i * block + jnp.arange(block)
    kpos = j * block + jnp.arange(block)
    causal = qpos[:, None] >= kpos[None, :]
    same = seg_q[:, :, None] == seg_k[:, None, :]
    return (causal[None] & same)[:, None, None]


def _scores(qb, kb, scale):
    """qb [B, bq, K, G, Dh], kb [B, bk, K, Dh] -> fp32 [B, K, G, bq, bk]."""
    return jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, seg, block):
    """q [B, L, K, G, Dh], k/v [B, L, K, Dh], seg [B, L] -> (out like q, lse fp32 [B, K, G, L])."""
    B, L, K, G, Dh = q.shape
    scale = Dh ** -0.5
    kb_all, vb_all, segb_all = _blocks(k, block), _blocks(v, block), _blocks(seg, block)

    def one_query_block(args):
        i, qb, seg_q = args

        def step(j, carry):
            m, l, acc = carry
            s = _scores(qb, kb_all[j], scale)
            mask = _block_mask(i, j, seg_q, segb_all[j], block)
            s = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), vb_all[j], preferred_element_type=jnp.float32)
            acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
            return m_new, l, acc

        m0 = jnp.full((B, K, G, block), _NEG, jnp.float32)
        l0 = jnp.zeros((B, K, G, block), jnp.float32)
        acc0 = jnp.zeros((B, block, K, G, Dh), jnp.float32)
        m, l, acc = jax.lax.fori_loop(0, i + 1, step, (m0, l0, acc0))
        out = acc / jnp.moveaxis(l, -1, 1)[..., None]
        return out.astype(q.dtype), m + jnp.log(l)

    n = L // block
    outs, lses = jax.lax.map(one_query_block, (jnp.arange(n), _blocks(q, block), segb_all))
    lse = jnp.moveaxis(lses, 0, -2).reshape(B, K, G, L)  # [n, B, K, G, bq] -> [B, K, G, n * bq]
    return _unblocks(outs), lse


def _backward(q, k, v, seg, out, lse, dout, block):
    B, L, K, G, Dh = q.shape
    scale = Dh ** -0.5
    n = L // block
    delta = jnp.einsum("blkgd,blkgd->bkgl", dout.astype(jnp.float32), out.astype(jnp.float32))
    qb_all, dob_all, segb_all = _blocks(q, block), _blocks(dout, block), _blocks(seg, block)
    kb_all, vb_all = _blocks(k, block), _blocks(v, block)
    lse_b = jnp.moveaxis(lse.reshape(B, K, G, n, block), 3, 0)  # [n, B, K, G, bq]
    delta_b = jnp.moveaxis(delta.reshape(B, K, G, n, block), 3, 0)

    def probs_and_ds(i, j):
        s = _scores(qb_all[i], kb_all[j], scale)
        mask = _block_mask(i, j, segb_all[i], segb_all[j], block)
        p = jnp.where(mask, jnp.exp(s - lse_b[i][..., None]), 0.0)  # [B, K, G, bq, bk]
        dp = jnp.einsum("bqkgd,bskd->bkgqs", dob_all[i], vb_all[j], preferred_element_type=jnp.float32)
        ds = p * (dp - delta_b[i][..., None])
        return p, ds

    def key_block(j):  # dk, dv of key block j: every query block i >= j
        def step(i, carry):
            dk, dv = carry
            p, ds = probs_and_ds(i, j)
            dv += jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dout.dtype), dob_all[i], preferred_element_type=jnp.float32)
            dk += jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), qb_all[i],
                             preferred_element_type=jnp.float32) * scale
            return dk, dv

        zeros = jnp.zeros((B, block, K, Dh), jnp.float32)
        dk, dv = jax.lax.fori_loop(j, n, step, (zeros, zeros))
        return dk.astype(k.dtype), dv.astype(v.dtype)

    def query_block(i):  # dq of query block i: every key block j <= i
        def step(j, dq):
            _, ds = probs_and_ds(i, j)
            return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), kb_all[j],
                                   preferred_element_type=jnp.float32) * scale

        dq = jax.lax.fori_loop(0, i + 1, step, jnp.zeros((B, block, K, G, Dh), jnp.float32))
        return dq.astype(q.dtype)

    dk, dv = jax.lax.map(key_block, jnp.arange(n))
    dq = jax.lax.map(query_block, jnp.arange(n))
    return _unblocks(dq), _unblocks(dk), _unblocks(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, block):
    return _forward(q, k, v, seg, block)[0]


def _flash_fwd(q, k, v, seg, block):
    out, lse = _forward(q, k, v, seg, block)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(block, res, dout):
    q, k, v, seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, seg, out, lse, dout, block)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
