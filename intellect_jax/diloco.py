"""DiLoCo (Douillard et al., arXiv 2311.08105) around any inner step, any cross-island mean, any optax outer optimizer.

    every island i:   params_i <- global;  H x params_i <- inner_step(params_i, batch_i)
    pseudo_grad_i  = global - params_i
    delta          = reduce_mean_i(pseudo_grad_i)        # the only cross-island traffic
    global         <- outer_optimizer(global, delta)    # default SGD + Nesterov momentum, lr 0.7, momentum 0.9

Error feedback (``diloco.error_feedback``; Seide et al. 2014, Karimireddy et al. 2019, arXiv 1901.09847): island i
keeps the part of its contribution that the lossy payload dropped and adds it to its next pseudo-gradient::

    p_i       = pseudo_grad_i + residual_i
    sent_i    = decode(encode(p_i))                       # what the transport actually carried for island i
    delta     = reduce_mean_i(sent_i) (re-quantized once by the chunk owner, identical on every island)
    residual_i <- p_i - sent_i                            # float32, per island, checkpointed with the state

The re-quantization of the mean (and, in the TCP ring, of partial sums) is shared by all islands and is not fed
back. A non-finite mean skips the outer step and keeps every residual as it was.

Per-island state carries a leading island dimension and runs under ``jax.vmap(..., spmd_axis_name="island")``, so
the inner step and the model never mention islands (MaxText's DiLoCo layout). The inner AdamW state is kept across
outer steps, as INTELLECT-1 did.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from intellect_jax import quant
from intellect_jax.sharding import ISLAND
from intellect_jax.config import DilocoConfig
from intellect_jax.train_step import TrainState

ReduceMean = Callable[[Any], Any]  # tree with leading island dim -> tree without it (identical on every island)


class DilocoState(NamedTuple):
    inner: TrainState  # every leaf [islands, ...]
    global_params: Any  # one copy, replicated over islands
    outer_opt_state: Any
    outer_step: jax.Array  # int32 scalar: outer steps applied
    residual: Any = None  # error feedback: float32 like inner.params ([islands, ...]); None when it is off


def make_outer_optimizer(cfg: DilocoConfig) -> optax.GradientTransformation:
    if cfg.outer_optimizer == "nesterov":
        return optax.sgd(cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=True)
    if cfg.outer_optimizer == "sgd":
        return optax.sgd(cfg.outer_lr, momentum=cfg.outer_momentum or None)
    return optax.adam(cfg.outer_lr, b1=cfg.outer_momentum)


def broadcast_islands(tree: Any, num_islands: int) -> Any:
    return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (num_islands,) + x.shape), tree)


def init_state(global_params: Any, inner_init: Callable[[Any], TrainState], outer: optax.GradientTransformation,
               num_islands: int, error_feedback: bool = False) -> DilocoState:
    """Every island starts from the same global params (and a fresh inner optimizer state, a zero residual)."""
    inner = jax.vmap(inner_init, axis_size=num_islands)(broadcast_islands(global_params, num_islands))
    return DilocoState(inner, global_params, outer.init(global_params), jnp.zeros((), jnp.int32),
                       zero_residual(inner.params) if error_feedback else None)


def zero_residual(island_params: Any) -> Any:
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), island_params)


def island_inner_step(inner_step: Callable, spmd_axis_name: str | None = ISLAND) -> Callable:
    """The inner step of every island at once: (inner [n,...], batch [n,...]) -> (inner, metrics [n])."""
    return jax.vmap(inner_step, spmd_axis_name=spmd_axis_name)


def pseudo_gradients(global_params: Any, island_params: Any) -> Any:
    return jax.tree.map(lambda g, p: g[None].astype(jnp.float32) - p.astype(jnp.float32), global_params,
                        island_params)


def guard(pseudo: Any, max_norm_ratio: float) -> tuple[Any, jax.Array, jax.Array]:
    """Which islands' pseudo-gradients enter the mean (``diloco.max_norm_ratio``).

    An island is left out of this outer step if its pseudo-gradient is not finite, or (with a ratio > 0 and at
    least 3 islands, so that a median means something) if its norm exceeds ratio x the median norm of the finite
    ones: a loss spike, a bit flip or a poisoned update on one island no longer reaches the others. Returns (the
    pseudo-gradients with left-out islands' rows zeroed, included [islands] bool, norms [islands]).
    """
    leaves = jax.tree.leaves(pseudo)
    n = leaves[0].shape[0]
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
                         for x in leaves))
    ok = jnp.isfinite(norms)
    if max_norm_ratio > 0 and n >= 3:
        median = jnp.nanmedian(jnp.where(ok, norms, jnp.nan))
        ok = ok & (norms <= max_norm_ratio * median)
    masked = jax.tree.map(lambda x: jnp.where(ok.reshape((n,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x)), pseudo)
    return masked, ok, norms


def rescale(delta: Any, included: jax.Array) -> Any:
    """The mean over the included islands from a mean over all of them whose left-out rows were zero. With every
    island included it is `delta` itself (bit for bit); with none it is not finite, so the outer step is skipped."""
    n, count = included.shape[0], jnp.sum(included)
    scale = n / count.astype(jnp.float32)
    return jax.tree.map(lambda d: jnp.where(count == n, d, d * scale), delta)


def outer_update(state: DilocoState, reduce_mean: ReduceMean, outer: optax.GradientTransformation,
                 max_norm_ratio: float = 0.0) -> tuple[DilocoState, dict[str, jax.Array]]:
    """The synchronisation at an outer-step boundary. Pure; jit it with the state's shardings.

    With error feedback (``state.residual`` set) `reduce_mean` must return ``(mean, sent)``
    (collective.make_island_mean(..., return_sent=True)). Islands that :func:`guard` leaves out contribute nothing,
    keep their residual, and restart from the new global params like every island.
    """
    pseudo = pseudo_gradients(state.global_params, state.inner.params)
    residual = None
    if state.residual is not None:
        pseudo = jax.tree.map(jnp.add, pseudo, state.residual)
    masked, included, norms = guard(pseudo, max_norm_ratio)
    if state.residual is not None:
        delta, sent = reduce_mean(masked)
        keep = lambda new, old: jnp.where(included.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
        residual = jax.tree.map(lambda p, s, r: keep(p - s, r), pseudo, sent, state.residual)
    else:
        delta = reduce_mean(masked)
    state, metrics = apply_outer(state, rescale(delta, included), outer, residual)
    if residual is not None:
        metrics["residual_norm"] = optax.tree.norm(state.residual)
    metrics["pseudo_grad_norm"] = norms  # [islands]
    metrics["excluded_islands"] = jnp.sum(~included).astype(jnp.float32)
    return state, metrics


def apply_outer(state: DilocoState, delta: Any, outer: optax.GradientTransformation, residual: Any = None,
                ) -> tuple[DilocoState, dict[str, jax.Array]]:
    """Applies the mean pseudo-gradient `delta` with the outer optimizer; every island restarts from the result.

    `residual` (error feedback) replaces ``state.residual`` when the step is applied.

    A `delta` holding a NaN or Inf (an island diverged, or a corrupted contribution: a non-finite block decodes to
    NaN, see quant.py) is not applied: the global params and the outer optimizer state stay as they were, every
    island restarts from them, the outer step still counts (so every island's schedule stays aligned) and the
    metric ``skipped_nonfinite`` is 1. Every island decodes the same bytes, so all of them skip together.
    """
    num_islands = jax.tree.leaves(state.inner.params)[0].shape[0]
    bad = jnp.any(jnp.stack([quant.has_nonfinite(x) for x in jax.tree.leaves(delta)]))
    safe_delta = jax.tree.map(lambda x: jnp.where(bad, jnp.zeros_like(x), x), delta)
    updates, outer_opt_state = outer.update(safe_delta, state.outer_opt_state, state.global_params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(bad, b, a), new, old)  # noqa: E731
    global_params = keep(optax.apply_updates(state.global_params, updates), state.global_params)
    outer_opt_state = keep(outer_opt_state, state.outer_opt_state)
    if residual is not None:
        residual = keep(residual, state.residual)
    inner = state.inner._replace(params=broadcast_islands(global_params, num_islands))
    metrics = {"delta_norm": optax.tree.norm(delta), "outer_update_norm": jnp.where(bad, 0.0, optax.tree.norm(updates)),
               "skipped_nonfinite": bad.astype(jnp.float32)}
    return DilocoState(inner, global_params, outer_opt_state, state.outer_step + 1,
                       state.residual if residual is None else residual), metrics
