"""Sharded initialisation of the training state: eval_shape -> shardings -> jit(init, out_shardings).

Nothing is ever materialised unsharded: a 10B model initialises straight into its shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import optax
from jax.sharding import Mesh, PartitionSpec

from intellect_jax import model as model_lib
from intellect_jax import sharding as sh
from intellect_jax.config import ModelConfig, OptimConfig
from intellect_jax.train_step import TrainState, init_state, make_optimizer


@dataclass(frozen=True)
class ModelSetup:
    """Everything static about the model + inner optimizer: built once, without allocating parameters."""

    graphdef: Any
    shapes: Any  # ShapeDtypeStruct tree of the params
    axes: Any  # logical-axes tree (PartitionSpec of logical names per leaf)
    optimizer: optax.GradientTransformation

    @classmethod
    def build(cls, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> "ModelSetup":
        graphdef, shapes, axes = model_lib.abstract_params(model_cfg)
        return cls(graphdef, shapes, axes, make_optimizer(optim_cfg, axes))


def opt_state_specs(optimizer: optax.GradientTransformation, abstract_opt_state: Any, param_specs: Any, *,
                    per_island: bool = False) -> Any:
    """PartitionSpecs for an optax state: param-shaped leaves follow their params, everything else is replicated
    (over the island axis too when `per_island`, where every leaf has a leading island dimension)."""

    def non_param(x):
        return PartitionSpec(*([sh.ISLAND] if per_island else []), *([None] * (x.ndim - int(per_island))))

    return optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state, param_specs,
                                 transform_non_params=non_param, is_leaf=lambda x: isinstance(x, PartitionSpec))


def train_state_specs(setup: ModelSetup, mesh: Mesh, abstract_state: TrainState, *, per_island: bool = False):
    """PartitionSpecs for a TrainState: optimizer moments follow their parameters, scalars are replicated."""
    pspecs = sh.param_specs(setup.axes, setup.shapes, mesh, per_island=per_island)
    scalar = PartitionSpec(sh.ISLAND) if per_island else PartitionSpec()
    opt_specs = opt_state_specs(setup.optimizer, abstract_state.opt_state, pspecs, per_island=per_island)
    return TrainState(params=pspecs, opt_state=opt_specs, step=scalar)


def init_train_state(setup: ModelSetup, model_cfg: ModelConfig, mesh: Mesh, seed: int,
                     params: Any = None) -> tuple[TrainState, Any]:
    """A single-island TrainState initialised directly into its shards; returns (state, shardings).

    With `params` (e.g. imported from Hugging Face, host or device arrays) those are used instead of a random init.
    """

    def init(p=None) -> TrainState:
        if p is None:
            _, p = model_lib.create(model_cfg, seed)
        return init_state(p, setup.optimizer)

    abstract = jax.eval_shape(init)
    specs = train_state_specs(setup, mesh, abstract)
    shardings = sh.named(mesh, specs)
    if params is None:
        return jax.jit(init, out_shardings=shardings)(), shardings
    params = jax.device_put(params, shardings.params)
    return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(params), shardings


def init_params(setup: ModelSetup, model_cfg: ModelConfig, mesh: Mesh, seed: int,
                params: Any = None) -> tuple[Any, Any]:
    """Only the parameters (e.g. DiLoCo's global params), directly into their shards (or `params` placed there)."""
    shardings = sh.named(mesh, sh.param_specs(setup.axes, setup.shapes, mesh))
    if params is not None:
        return jax.device_put(params, shardings), shardings
    params = jax.jit(lambda: model_lib.create(model_cfg, seed)[1], out_shardings=shardings)()
    return params, shardings
