"""Model arithmetic without allocation: parameter counts, FLOPs per token, per-device memory estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np

from intellect_jax.config import Config, ModelConfig


@dataclass(frozen=True)
class ModelInfo:
    total_params: int
    embedding_params: int  # input embedding (+ output head when untied)

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params


def count_params(cfg: ModelConfig) -> ModelInfo:
    """Counts from the abstract (eval_shape) model, so the numbers are the model's, not a formula's."""
    from intellect_jax import model as model_lib

    _, shapes, _ = model_lib.abstract_params(cfg)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    emb = int(np.prod(shapes["embed_tokens"].shape))
    if "lm_head" in shapes:
        emb += int(np.prod(shapes["lm_head"].shape))
    return ModelInfo(total, emb)


def flops_per_token(cfg: ModelConfig, seq_len: int, total_params: int | None = None) -> float:
    """Training FLOPs per token, 6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, appendix B).

    N counts every matmul parameter: all parameters except the input embedding (a gather), i.e. the LM head counts
    even when tied. The attention term is the full (non-causal-discounted) score + value matmuls, as in the formula.
    """
    if total_params is None:
        total_params = count_params(cfg).total_params
    matmul_params = total_params - cfg.vocab_size * cfg.hidden_size
    if cfg.tie_word_embeddings:
        matmul_params += cfg.vocab_size * cfg.hidden_size
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.resolved_head_dim * seq_len
    return 6.0 * matmul_params + attn


def memory_estimate(cfg: Config, mesh_sizes: dict[str, int], info: ModelInfo) -> dict[str, float]:
    """Bytes per device for one island's inner training, plus the DiLoCo outer state (host memory when offloaded).

    Parameters, gradients and AdamW moments are fp32 and sharded over fsdp x tensor. Activations assume the configured
    remat (full: one saved residual per layer plus one layer's working set) and a fused attention that does not
    materialise the L x L score matrix.
    """
    m = cfg.model
    shard = mesh_sizes["fsdp"] * mesh_sizes["tensor"]
    n = info.total_params
    bytes_c = np.dtype(m.compute_dtype).itemsize
    micro = cfg.data.batch_size // cfg.optim.grad_accum_steps
    b_local = max(1, math.ceil(micro / (mesh_sizes["data"] * mesh_sizes["fsdp"])))
    tokens = b_local * cfg.data.seq_len
    d, f, v = m.hidden_size, m.intermediate_size, m.vocab_size
    q = m.num_attention_heads * m.resolved_head_dim
    kv = 2 * m.num_key_value_heads * m.resolved_head_dim
    layer_working = tokens * (6 * d + 2 * q + 2 * kv + 4 * f) * bytes_c / mesh_sizes["tensor"]
    if m.remat == "none":
        saved = m.num_hidden_layers * layer_working
    elif m.remat == "full":
        saved = m.num_hidden_layers * tokens * d * bytes_c + layer_working
    else:  # dots: matmul outputs kept
        saved = m.num_hidden_layers * tokens * (2 * d + q + kv + 2 * f) * bytes_c / mesh_sizes["tensor"] \
            + layer_working
    logits = 2 * tokens * v * 4 / mesh_sizes["tensor"]  # fp32 logits and their gradient
    out = {
        "params (fp32)": 4 * n / shard,
        "gradients (fp32)": 4 * n / shard,
        "adamw moments (fp32)": 8 * n / shard,
        "activations (est.)": saved + logits,
    }
    out["total per device"] = sum(out.values())
    out["diloco outer state (global params + momentum, fp32)"] = 8 * n / shard
    return out


def format_info(cfg: Config, mesh_sizes: dict[str, int]) -> str:
    info = count_params(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len, info.total_params)
    mem = memory_estimate(cfg, mesh_sizes, info)
    mesh_txt = " x ".join(f"{k}={v}" for k, v in mesh_sizes.items())
    lines = [
        f"parameters            {info.total_params:,} ({info.total_params / 1e9:.2f}B)",
        f"non-embedding params  {info.non_embedding_params:,} ({info.non_embedding_params / 1e9:.2f}B)",
        f"embedding params      {info.embedding_params:,}",
        f"FLOPs per token       {fpt:.4g} (train, 6N + 12LHQT at seq_len {cfg.data.seq_len})",
        f"FLOPs per inner step  {fpt * cfg.data.batch_size * cfg.data.seq_len:.4g} per island",
        f"mesh                  {mesh_txt}",
        f"memory per device (batch {cfg.data.batch_size} / accum {cfg.optim.grad_accum_steps}, "
        f"remat {cfg.model.remat}, compute {cfg.model.compute_dtype}):",
    ]
    for k, v in mem.items():
        lines.append(f"  {k:<52} {v / 2**30:9.2f} GiB")
    return "\n".join(lines)
