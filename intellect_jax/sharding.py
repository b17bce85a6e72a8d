"""Device mesh and the logical -> mesh axis rules.

Mesh axes: ``island`` (DiLoCo islands inside one program), ``data`` (pure data parallel), ``fsdp`` (data parallel
with parameters and optimizer state sharded), ``tensor`` (Megatron-style tensor parallel). Parameters carry logical
axis names (model.py); :data:`RULES` is the only place that says where each goes.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from intellect_jax.config import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("island", "data", "fsdp", "tensor")
ISLAND = "island"
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a if a != "island" else "islands"] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - topology-unaware fallback (e.g. odd CPU device counts)
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def island_count(mesh: Mesh) -> int:
    return mesh.shape[ISLAND]


def logical_to_mesh(logical: PartitionSpec | tuple, shape: tuple[int, ...] | None, mesh: Mesh) -> PartitionSpec:
    """Maps a spec of logical names to mesh axes; a dimension that the mesh axes do not divide stays replicated."""
    out = []
    used: set[str] = set()
    for i, name in enumerate(tuple(logical)):
        target = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES and name not in MESH_AXES:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
        if name in MESH_AXES:
            target = name
        axes = tuple(a for a in ((target,) if isinstance(target, str) else (target or ()))
                     if mesh.shape[a] > 1 and a not in used)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and shape is not None and shape[i] % size:
            log.debug("dimension %d (%s=%d) not divisible by %s; replicated", i, name, shape[i], axes)
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def param_specs(axes_tree: Any, shapes_tree: Any, mesh: Mesh, *, per_island: bool = False) -> Any:
    """PartitionSpec tree for params; with per_island, a leading island dimension is added."""

    def one(axes: PartitionSpec, shape) -> PartitionSpec:
        spec = logical_to_mesh(axes, tuple(shape.shape), mesh)
        return PartitionSpec(ISLAND, *spec) if per_island else spec

    return jax.tree.map(one, axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(per_island: bool = False) -> PartitionSpec:
    """Batches are [B, L] (or [islands, B, L]) with the batch dimension split over data x fsdp."""
    return PartitionSpec(ISLAND, BATCH_AXES, None) if per_island else PartitionSpec(BATCH_AXES, None)


def activation_constraint(mesh: Mesh):
    """The `constrain(x, logical_axes)` hook the model calls on its activations."""

    def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
        spec = logical_to_mesh(logical, x.shape, mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    constrain.mesh = mesh  # attention.py runs kernels that XLA cannot partition once per shard of this mesh
    return constrain
