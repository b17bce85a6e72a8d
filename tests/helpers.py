"""Small shared builders for tests: tiny configs and hand-made batches."""

from __future__ import annotations

import numpy as np

from intellect_jax.config import Config, ModelConfig, from_dict


def tiny_model(**overrides) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, remat="none")
    base.update(overrides)
    return ModelConfig(**base)


def tiny_config(**sections) -> Config:
    raw = {
        "model": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=10000.0, remat="none"),
        "optim": dict(learning_rate=3e-3, warmup_steps=5, total_steps=200, weight_decay=0.0, z_loss_weight=1e-4),
        "data": dict(kind="synthetic", seq_len=32, batch_size=8),
        "run": dict(steps=10),
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


def tiny_run_config(run_dir, steps: int, *, every_outer_steps: int = 1, **sections) -> Config:
    """A tiny 2-island DiLoCo run (H=3, fsdp 4) writing to run_dir; checkpoints every `every_outer_steps` syncs."""
    base = dict(mesh=dict(islands=2, fsdp=4), diloco=dict(inner_steps=3, block_size=64),
                checkpoint=dict(every_outer_steps=every_outer_steps, max_to_keep=10),
                run=dict(steps=steps, dir=str(run_dir)), optim=dict(total_steps=40, warmup_steps=2))
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return tiny_config(**base)


def random_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, docs_per_row: int = 1) -> dict:
    """Rows of packed random documents with EOS-free segment ids and per-document positions."""
    tokens = rng.integers(0, vocab, size=(batch, length + 1), dtype=np.int32)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=docs_per_row - 1, replace=False)) if docs_per_row > 1 \
            else np.array([], int)
        bounds = [0, *cuts.tolist(), length]
        for d in range(len(bounds) - 1):
            seg[b, bounds[d]:bounds[d + 1]] = d + 1
            pos[b, bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
            "loss_mask": np.ones((batch, length), np.float32)}
