"""Orbax checkpoints of a whole run: training state, data-iterator state, resolved config, run metadata.

One ``CheckpointManager`` per run directory (``<run dir>/checkpoints/<inner step>/``), asynchronous saves (the next
inner steps overlap the write), ``max_to_keep``. Orbax writes each step into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoint intact; the next start reports the
unfinished ``<step>.orbax-checkpoint-tmp-*`` directory it left and (when writing) removes it.

Items of a checkpoint:
  ``train``  one island: the TrainState (params, AdamW state, step)
  ``inner``  DiLoCo: every island's TrainState (leading island dim)
  ``outer``  DiLoCo: {global_params, outer_opt_state, outer_step}
  ``data``   the data loader's position: Grain's Orbax handler writes one ``process_<i>-of-<n>.json`` per process
             (each process holds only its (island, row) slots); restoring reads them all and merges them, so a
             checkpoint restores onto any process layout of the same run
  ``meta``   {step, outer_step, islands, mesh, ...} (JSON)
  ``config`` the resolved config (JSON)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from intellect_jax import data as datalib
from intellect_jax.config import CheckpointConfig

log = logging.getLogger(__name__)
# Orbax warns on every read-only open and partial restore; our own log lines say what happens.
logging.getLogger("absl").setLevel(logging.ERROR)

ARRAY_ITEMS = ("train", "inner", "outer")
JSON_ITEMS = ("meta", "config")
DATA_ITEM = "data"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


class DataCheckpointHandler(grain.checkpoint.CheckpointHandler):
    """Grain's Orbax handler (it saves one ``process_<i>-of-<n>.json`` per process), restoring from all of them.

    Grain's own restore reads only ``process_<this>-of-<count>.json``, so it needs the same process layout. The
    loader's slots are independent of the layout, so we merge every saved process's slots
    (:func:`intellect_jax.data.merge_states`) and let the loader take the ones it reads.
    """

    def restore(self, directory: Any, item: Any = None, args: Any = None) -> Any:
        item = item or args.item
        files = sorted(Path(directory).glob("process_*-of-*.json"))
        if not files:
            raise CheckpointError(
                f"{directory} holds no Grain data-loader state (process_*-of-*.json); the checkpoint was written by "
                "an older intellect-jax (a JSON data state) or without a loader: resume without restoring the data "
                "position (the streams restart), or from a checkpoint this version wrote")
        counts = {int(m.group(1)) for f in files if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name))}
        if len(counts) != 1 or len(files) != counts.pop():
            raise CheckpointError(f"{directory} holds data-loader states {[f.name for f in files]}, not one per "
                                  "process of the saving run; the checkpoint is incomplete, restore an earlier step")
        item.set_state(datalib.merge_states([json.loads(f.read_text()) for f in files]))
        return item


# Our own args types: Orbax binds an item name to one handler per manager, and save and restore must agree.
@ocp.args.register_with_handler(DataCheckpointHandler, for_save=True)
@dataclasses.dataclass
class DataSave(grain.checkpoint.CheckpointSave):
    pass


@ocp.args.register_with_handler(DataCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().absolute() / "checkpoints"


def incomplete_saves(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the unfinished saves in a checkpoint directory: Orbax writes ``<step>.orbax-checkpoint-tmp-*``
    and renames it to ``<step>`` when complete, so one left behind is a save that was killed (or is in flight)."""
    if not directory.is_dir():
        return []
    found = [(m, p) for p in directory.iterdir() if (m := re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", p.name))]
    return sorted((int(m.group(1)), p) for m, p in found)


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        self.dir = checkpoint_dir(run_dir)
        if read_only and not self.dir.is_dir():
            raise CheckpointError(f"no checkpoints in {self.dir}; train first or pass the right --run-dir")
        incomplete = [] if read_only else incomplete_saves(self.dir)  # a reader must not remove a save in flight
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep,
                                               enable_async_checkpointing=cfg.async_save,
                                               read_only=read_only, create=not read_only,
                                               cleanup_tmp_directories=bool(incomplete))
        self.manager = ocp.CheckpointManager(self.dir, options=options)
        self.report_incomplete(incomplete, "now removed")

    def report_incomplete(self, incomplete: list[tuple[int, Path]], what: str) -> None:
        latest = self.latest_step()
        for step, path in incomplete:  # e.g. a second Ctrl-C during the final save
            log.warning("ignoring an incomplete checkpoint at step %d (%s: a save that was interrupted, %s); %s",
                        step, path.name, what, "there is no complete checkpoint" if latest is None
                        else f"the latest complete checkpoint is step {latest}")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays: dict[str, Any], json_items: dict[str, Any],
             data: datalib.BatchIterator | None = None) -> None:
        """Starts an (async) save of `arrays` (pytrees of jax arrays), JSON items and the loader's position at `step`.

        Every process must call this (as for the arrays); each writes its own loader's state. The state is taken
        now, before this returns, so the loader may run on while the arrays are written.
        """
        args = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
        args.update({k: ocp.args.JsonSave(v) for k, v in json_items.items()})
        if data is not None:
            args[DATA_ITEM] = DataSave(_Frozen(data.get_state()))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore_data(self, step: int, loader: datalib.BatchIterator) -> None:
        """Moves `loader` to the position saved at `step` (by any process layout of the same run and data config).

        Raises CheckpointError if the step has no loader state, DataError if it belongs to another data config or
        island count.
        """
        if step not in self.manager.all_steps():
            raise CheckpointError(f"checkpoint step {step} not found in {self.dir}; available: {self.steps()}")
        if DATA_ITEM not in self.item_names(step):
            raise CheckpointError(f"checkpoint step {step} in {self.dir} has no {DATA_ITEM!r} item (saved without a "
                                  "loader); resume without restoring the data position (the streams restart)")
        self.manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: DataRestore(loader)}))

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


class _Frozen(grain.DatasetIterator):
    """A loader state taken at save time, handed to Grain's handler (which calls get_state() when it writes)."""

    def __init__(self, state: dict[str, Any]):
        super().__init__()
        self._state = state

    def __next__(self) -> Any:
        raise TypeError("a saved loader state is not iterable")

    def get_state(self) -> dict[str, Any]:
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        raise TypeError("a saved loader state is read-only")


def load_global_params(run_dir: str | Path, step: int | None = None) -> tuple[dict, dict, int]:
    """(resolved config dict, global params as numpy, step) from a run's checkpoint — for export-hf."""
    ckpt = Checkpointer(run_dir, CheckpointConfig(), read_only=True)
    try:
        ckpt.report_incomplete(incomplete_saves(ckpt.dir), "or one still running")
        if not ckpt.steps():
            raise CheckpointError(f"no complete checkpoint in {ckpt.dir}; train (and let a save finish) first")
        step = ckpt.latest_step() if step is None else step
        if step not in ckpt.steps():
            raise CheckpointError(f"there is no checkpoint step {step} in {ckpt.dir}; its steps are "
                                  f"{', '.join(map(str, ckpt.steps()))} (omit --step for the latest)")
        config = ckpt.read_json(step, "config")
        names = ckpt.item_names(step)
        if "outer" in names:
            params = ckpt.restore_numpy(step, "outer")["global_params"]
        else:
            params = ckpt.restore_numpy(step, "train")["params"]
        return config, params, step
    finally:
        ckpt.close()
