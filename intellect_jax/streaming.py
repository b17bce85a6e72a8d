"""Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): fragments synced at staggered steps, each fragment's
mean applied ``overlap_steps`` after its sync while the islands keep training.

**Fragments.** Layer l (of the stacked ``layers/*`` leaves) belongs to fragment l mod P, and so do vocabulary rows
v = l mod P of the token embedding and of the LM head (their vocabulary axis is split the same strided way); the
final norm (a few thousand numbers) goes with the fragment of the last layer. So every fragment spans the whole depth
(no part of the network waits a full round for its update; the paper's "strided" variant) and, with P dividing the
layer count, every fragment holds 1/P of the parameters (the embedding and head included: they are 10% of a 10B
Llama-3 and 40% of the debug model, so giving them to one fragment would leave its sync far above 1/P of the bytes).

**Schedule** (schedule.py). With H = ``inner_steps``, fragment p syncs at steps k H + floor(p H / P), k >= 1, so one
fragment (1/P of the bytes) is on the wire at a time. With tau = ``overlap_steps``:

    at its sync step s (after s inner steps):
        g      = global_p                                 # the fragment of the global params
        x_i    = params_i,p                               # island i's fragment after s steps
        p_i    = g - x_i (+ residual_i,p)                 # pseudo-gradient (error feedback as in diloco.py)
        delta  = reduce_mean_i(p_i)                       # the only cross-island traffic, 1/P of the model
        residual_i,p <- p_i - sent_i                      # error feedback: at the sync, not at the merge
    at step s + tau (tau inner steps later; the islands kept training all fragments):
        global_p <- outer_p(g, delta)                     # the fragment's own outer optimizer state
        params_i,p <- alpha x params_i,p(s + tau) + (1 - alpha) x global_p      # alpha = merge_alpha

tau = 0 applies at the sync step; with alpha = 0 an island takes the global fragment (alpha = 0 uses it directly, so
a non-finite island value cannot leak through 0 x NaN). P = 1, tau = 0, alpha = 0 is plain DiLoCo (diloco.py) bit
for bit (tests/test_streaming.py); a run with those settings takes sync.py's plain outer step (diloco.outer_update
in-program, island.py's blocking sync over TCP). A non-finite mean skips that fragment's outer update (the global
fragment and its optimizer state are kept, every island takes the kept values as above) and leaves its residuals.
The inner optimizer state is never reset (as in plain DiLoCo here).

Everything here is pure and jit-able; the fragment index is static (fragments differ in shape), so a transport
compiles one program per fragment.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from intellect_jax import diloco, quant

ReduceMean = Callable[[Any], Any]


class Fragments:
    """Which part of every parameter leaf belongs to which fragment (see the module docstring).

    A fragment view is a flat dict ``{"layers/q_proj": leaf[p::P], "embed_tokens": leaf[p::P], "lm_head":
    leaf[:, p::P], ...}`` holding the fragment's part of each leaf it touches; ``lead`` is the number of leading
    dimensions before those (1 for per-island trees ``[islands, layers, ...]``).
    """

    # leaf -> the axis split strided over the fragments (after `lead` leading dims); other leaves: one fragment
    STRIDED_AXIS = {"layers": 0, "embed_tokens": 0, "lm_head": 1}

    def __init__(self, params: dict, num_layers: int, count: int):
        if not 1 <= count <= num_layers:
            raise ValueError(f"{count} fragments of {num_layers} layers")
        self.count, self.num_layers = count, num_layers
        last = (num_layers - 1) % count
        self.axis: dict[tuple, int | None] = {}  # path -> strided axis, or None: the whole leaf in self.owner[path]
        self.owner: dict[tuple, int | None] = {}
        for path in flatten_dict(params):
            self.axis[path] = self.STRIDED_AXIS.get(path[0])
            self.owner[path] = None if self.axis[path] is not None else last
        self.keys = {p: [path for path, o in self.owner.items() if o is None or o == p] for p in range(count)}

    @staticmethod
    def name(path: tuple) -> str:
        return "/".join(path)

    def _index(self, path: tuple, p: int, lead: int) -> tuple:
        return (slice(None),) * (lead + self.axis[path]) + (slice(p, None, self.count),)

    def take(self, tree: dict, p: int, lead: int = 0) -> dict[str, Any]:
        """Fragment p's part of `tree` (arrays, ShapeDtypeStructs or PartitionSpecs)."""
        flat = flatten_dict(tree)
        out = {}
        for path in self.keys[p]:
            x = flat[path]
            if self.owner[path] is None and isinstance(x, jax.ShapeDtypeStruct):
                a = lead + self.axis[path]
                n = len(range(p, x.shape[a], self.count))
                x = jax.ShapeDtypeStruct(x.shape[:a] + (n,) + x.shape[a + 1:], x.dtype, sharding=x.sharding)
            elif self.owner[path] is None and isinstance(x, (jax.Array, np.ndarray)):
                x = x[self._index(path, p, lead)]
            out[self.name(path)] = x  # PartitionSpecs and shardings: the same for the fragment's part
        return out

    def put(self, tree: dict, p: int, values: dict[str, Any], lead: int = 0) -> dict:
        """`tree` with fragment p's part replaced by `values` (a view as :meth:`take` returns)."""
        flat = flatten_dict(tree)
        for path in self.keys[p]:
            v = values[self.name(path)]
            flat[path] = flat[path].at[self._index(path, p, lead)].set(v) if self.owner[path] is None else v
        return unflatten_dict(flat)

    def assemble(self, like: dict, views: list[dict[str, np.ndarray]]) -> dict:
        """The inverse of :meth:`take` over every fragment, on the host: numpy arrays shaped like `like` (a tree of
        arrays or ShapeDtypeStructs, no leading dims) whose fragment p is ``views[p]``."""
        out = {}
        for path, x in flatten_dict(like).items():
            a = np.empty(x.shape, x.dtype)
            for p in range(self.count):
                if path in self.keys[p]:
                    v = np.asarray(views[p][self.name(path)])
                    part = self._index(path, p, 0) if self.owner[path] is None else ...
                    a[part] = v.reshape(a[part].shape)
            out[path] = a
        return unflatten_dict(out)

    def size(self, p: int, params: dict) -> int:
        """Parameters in fragment p."""
        return sum(int(x.size) for x in jax.tree.leaves(self.take(params, p)))


def init_outer_states(frags: Fragments, outer: optax.GradientTransformation, global_params: dict) -> tuple:
    """One outer optimizer state per fragment, each over that fragment's view."""
    return tuple(outer.init(frags.take(global_params, p)) for p in range(frags.count))


def reduce_fragment(state: diloco.DilocoState, frags: Fragments, p: int, reduce_mean: ReduceMean,
                    max_norm_ratio: float = 0.0,
                    ) -> tuple[diloco.DilocoState, dict[str, jax.Array], dict[str, jax.Array]]:
    """The sync of fragment p: (state with its error-feedback residuals updated, the mean delta, metrics).

    Islands whose fragment pseudo-gradient is not finite or an outlier are left out (diloco.guard)."""
    g = frags.take(state.global_params, p)
    x = frags.take(state.inner.params, p, lead=1)
    pseudo = {k: g[k][None].astype(jnp.float32) - x[k].astype(jnp.float32) for k in g}
    if state.residual is not None:
        r = frags.take(state.residual, p, lead=1)
        pseudo = {k: pseudo[k] + r[k] for k in pseudo}
    masked, included, norms = diloco.guard(pseudo, max_norm_ratio)
    if state.residual is not None:
        delta, sent = reduce_mean(masked)
        delta = diloco.rescale(delta, included)
        bad = _nonfinite(delta)
        inc = lambda v: included.reshape((-1,) + (1,) * (v.ndim - 1))  # noqa: E731
        new_r = {k: jnp.where(bad | ~inc(r[k]), r[k], pseudo[k] - sent[k]) for k in pseudo}
        state = state._replace(residual=frags.put(state.residual, p, new_r, lead=1))
    else:
        delta = diloco.rescale(reduce_mean(masked), included)
    metrics = {"pseudo_grad_norm": norms, "delta_norm": optax.tree.norm(delta),  # [islands], scalar
               "excluded_islands": jnp.sum(~included).astype(jnp.float32)}
    return state, delta, metrics


def apply_fragment(state: diloco.DilocoState, frags: Fragments, p: int, delta: dict[str, jax.Array],
                   outer: optax.GradientTransformation, alpha: float) -> tuple[diloco.DilocoState, dict[str, Any]]:
    """Applies fragment p's mean `delta` with its outer optimizer and merges the result into every island."""
    g = frags.take(state.global_params, p)
    bad = _nonfinite(delta)
    safe = jax.tree.map(lambda d: jnp.where(bad, jnp.zeros_like(d), d), delta)
    updates, opt_p = outer.update(safe, state.outer_opt_state[p], g)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(bad, b, a), new, old)  # noqa: E731
    g_new = keep(optax.apply_updates(g, updates), g)
    opt_p = keep(opt_p, state.outer_opt_state[p])
    x = frags.take(state.inner.params, p, lead=1)
    if alpha == 0.0:
        merged = {k: jnp.broadcast_to(g_new[k][None], x[k].shape).astype(x[k].dtype) for k in x}
    else:
        merged = {k: (alpha * x[k].astype(jnp.float32) + (1.0 - alpha) * g_new[k][None].astype(jnp.float32)
                      ).astype(x[k].dtype) for k in x}
    inner = state.inner._replace(params=frags.put(state.inner.params, p, merged, lead=1))
    opt_states = tuple(opt_p if i == p else s for i, s in enumerate(state.outer_opt_state))
    metrics = {"outer_update_norm": jnp.where(bad, 0.0, optax.tree.norm(updates)),
               "skipped_nonfinite": bad.astype(jnp.float32)}
    return diloco.DilocoState(inner, frags.put(state.global_params, p, g_new), opt_states, state.outer_step + 1,
                              state.residual), metrics


def sync_fragment(state: diloco.DilocoState, frags: Fragments, p: int, reduce_mean: ReduceMean,
                  outer: optax.GradientTransformation, alpha: float,
                  max_norm_ratio: float = 0.0) -> tuple[diloco.DilocoState, dict[str, Any]]:
    """tau = 0: fragment p's reduce and its application in one program."""
    state, delta, metrics = reduce_fragment(state, frags, p, reduce_mean, max_norm_ratio)
    state, applied = apply_fragment(state, frags, p, delta, outer, alpha)
    return state, metrics | applied


def _nonfinite(tree) -> jax.Array:
    return jnp.any(jnp.stack([quant.has_nonfinite(x) for x in jax.tree.leaves(tree)]))
