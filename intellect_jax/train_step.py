"""The pure inner training step: fp32 cross-entropy + max-z-loss, gradient accumulation, clipping, AdamW.

``step(state, batch) -> (state, metrics)`` knows nothing of islands; diloco.py wraps it.

A batch is a dict of [B, L] arrays: ``inputs``, ``targets``, ``segment_ids``, ``positions`` (int32) and
``loss_mask`` (float32), as produced by data.py.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from intellect_jax import model as model_lib
from intellect_jax.config import OptimConfig

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
    params: Any  # nested dict of fp32 arrays
    opt_state: Any
    step: jax.Array  # int32 scalar: inner steps taken


# ---------------------------------------------------------------------------------------------------------------------
# Schedules (counted in inner steps)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    lr, warmup, total = cfg.learning_rate, cfg.warmup_steps, cfg.total_steps

    def warm(step):
        return lr * jnp.minimum(1.0, (step + 1) / max(warmup, 1)) if warmup else jnp.asarray(lr, jnp.float32)

    if cfg.schedule == "constant":
        return lambda step: warm(jnp.asarray(step, jnp.float32))
    if cfg.schedule == "cosine":
        floor = cfg.min_lr_ratio * lr

        def cosine(step):
            step = jnp.asarray(step, jnp.float32)
            frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
            decayed = floor + (lr - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
            return jnp.where(step < warmup, warm(step), decayed)

        return cosine
    # WSD-sqrt (INTELLECT-1): warmup, stable, then lr * (1 - sqrt((t - decay_start) / (total - decay_start))).
    decay_start = total if cfg.decay_start == -1 else cfg.decay_start
    floor = cfg.min_lr_ratio * lr

    def wsd_sqrt(step):
        step = jnp.asarray(step, jnp.float32)
        frac = jnp.clip((step - decay_start) / max(total - decay_start, 1), 0.0, 1.0)
        decayed = floor + (lr - floor) * (1 - jnp.sqrt(frac))
        return jnp.where(step < warmup, warm(step), jnp.where(step < decay_start, lr, decayed))

    return wsd_sqrt


def make_optimizer(cfg: OptimConfig, axes_tree: Any) -> optax.GradientTransformation:
    """AdamW (fp32 moments) with global-norm clipping; no weight decay on norm scales."""
    decay_mask = jax.tree.map(lambda axes: "norm" not in tuple(axes), axes_tree,
                              is_leaf=lambda x: isinstance(x, PartitionSpec))
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw


def init_state(params: Any, optimizer: optax.GradientTransformation, step: Any = 0) -> TrainState:
    """Fresh optimizer state at inner step `step`: the learning-rate schedule resumes at `step` (a restarted or
    joining island must not redo the warmup), while Adam's moments and bias correction start from zero."""
    opt_state = optimizer.init(params)
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    opt_state = jax.tree.map(lambda x: x._replace(count=jnp.asarray(step, x.count.dtype)) if is_sched(x) else x,
                             opt_state, is_leaf=is_sched)
    return TrainState(params=params, opt_state=opt_state, step=jnp.asarray(step, jnp.int32))


# ---------------------------------------------------------------------------------------------------------------------
# Loss


def loss_sums(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, sum of max-logit**2) over masked tokens, in fp32."""
    logits = logits_BLV.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    ce = (logz - target_logit) * mask_BL
    z = jnp.square(jnp.max(logits, axis=-1)) * mask_BL
    return ce.sum(), z.sum()


def make_loss_fn(graphdef, z_loss_weight: float, constrain=None):
    def loss_fn(params, batch: Batch):
        logits = model_lib.apply(graphdef, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                 constrain)
        ce_sum, z_sum = loss_sums(logits, batch["targets"], batch["loss_mask"])
        return ce_sum + z_loss_weight * z_sum, (ce_sum, z_sum)

    return loss_fn


def make_train_step(graphdef, optim_cfg: OptimConfig, optimizer: optax.GradientTransformation,
                    constrain=None) -> Callable[[TrainState, Batch], tuple]:
    """Returns the pure step. The loss is the mean over all unmasked tokens of the whole (accumulated) batch."""
    loss_fn = make_loss_fn(graphdef, optim_cfg.z_loss_weight, constrain)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    schedule = make_schedule(optim_cfg)
    accum = optim_cfg.grad_accum_steps

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if accum == 1:
            (_, (ce_sum, z_sum)), grad_sum = grad_fn(state.params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(carry, mb):
                g_acc, ce_acc, z_acc = carry
                (_, (ce, z)), g = grad_fn(state.params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, z_acc + z), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grad_sum, ce_sum, z_sum), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
        tokens = batch["loss_mask"].sum()
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": ce_sum / denom,
            "z_loss": z_sum / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": tokens,
        }
        return TrainState(params, opt_state, state.step + 1), metrics

    return step
