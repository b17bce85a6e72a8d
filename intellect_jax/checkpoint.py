"""Orbax checkpoints of a whole run: training state, data-iterator state, resolved config, run metadata.

One ``CheckpointManager`` per run directory (``<run dir>/checkpoints/<inner step>/``), asynchronous saves (the next
inner steps overlap the write), ``max_to_keep``. Orbax writes each step into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoint intact.

Items of a checkpoint:
  ``train``  one island: the TrainState (params, AdamW state, step)
  ``inner``  DiLoCo: every island's TrainState (leading island dim)
  ``outer``  DiLoCo: {global_params, outer_opt_state, outer_step}
  ``data``   the data iterator's state (JSON)
  ``meta``   {step, outer_step, islands, mesh, ...} (JSON)
  ``config`` the resolved config (JSON)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from intellect_jax.config import CheckpointConfig

log = logging.getLogger(__name__)
# Orbax warns on every read-only open and partial restore; our own log lines say what happens.
logging.getLogger("absl").setLevel(logging.ERROR)

ARRAY_ITEMS = ("train", "inner", "outer")
JSON_ITEMS = ("data", "meta", "config")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().absolute() / "checkpoints"


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        self.dir = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep,
                                               enable_async_checkpointing=cfg.async_save,
                                               read_only=read_only, create=not read_only)
        if read_only and not self.dir.is_dir():
            raise CheckpointError(f"no checkpoints in {self.dir}; train first or pass the right --run-dir")
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays: dict[str, Any], json_items: dict[str, Any]) -> None:
        """Starts an (async) save of `arrays` (pytrees of jax arrays) and JSON items at `step`."""
        args = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
        args.update({k: ocp.args.JsonSave(v) for k, v in json_items.items()})
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, targets: dict[str, Any], json_names: tuple[str, ...] = JSON_ITEMS) -> dict:
        """Restores the array items in `targets` (abstract pytrees with shardings) and the named JSON items."""
        if step not in self.manager.all_steps():
            raise CheckpointError(f"checkpoint step {step} not found in {self.dir}; available: {self.steps()}")
        args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
        args.update({k: ocp.args.JsonRestore() for k in json_names})
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {k: restored[k] for k in args}

    def read_json(self, step: int, name: str) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

    def item_names(self, step: int) -> set[str]:
        return {p.name for p in (self.dir / str(step)).iterdir() if p.is_dir()}

    def restore_numpy(self, step: int, name: str) -> Any:
        """An array item as host numpy arrays (no device, no target needed): for export and inspection."""
        path = self.dir / str(step) / name
        if not path.is_dir():
            raise CheckpointError(f"checkpoint step {step} in {self.dir} has no {name!r} item")
        checkpointer = ocp.PyTreeCheckpointer()
        meta = checkpointer.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_global_params(run_dir: str | Path, step: int | None = None) -> tuple[dict, dict, int]:
    """(resolved config dict, global params as numpy, step) from a run's checkpoint — for export-hf."""
    ckpt = Checkpointer(run_dir, CheckpointConfig(), read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {ckpt.dir}; train (and let a save finish) first")
        if step not in ckpt.steps():
            raise CheckpointError(f"checkpoint step {step} not found in {ckpt.dir}; available: {ckpt.steps()}")
        config = ckpt.read_json(step, "config")
        names = ckpt.item_names(step)
        if "outer" in names:
            params = ckpt.restore_numpy(step, "outer")["global_params"]
        else:
            params = ckpt.restore_numpy(step, "train")["params"]
        return config, params, step
    finally:
        ckpt.close()
