"""The last step of a run is always checkpointed (mid-outer-step too), so a rerun has nothing to redo; resuming
from such a checkpoint is bit-exact; interrupted saves and rows written after the last checkpoint are handled."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from intellect_jax import trainer as trainer_mod
from intellect_jax.checkpoint import Checkpointer
from intellect_jax.config import CheckpointConfig, ConfigError
from intellect_jax.metrics import read_metrics
from intellect_jax.trainer import train
from tests.helpers import tiny_config, tiny_run_config


def _cfg(run_dir, steps, **sections):
    # every_outer_steps far away: the only checkpoint a run writes is its final one
    return tiny_run_config(run_dir, steps, every_outer_steps=100, **sections)


def _rows(run_dir):
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def _arrays(run_dir, step):
    ckpt = Checkpointer(run_dir, CheckpointConfig(), read_only=True)
    try:
        return {name: ckpt.restore_numpy(step, name) for name in ("inner", "outer")}
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """a: 12 steps straight (inner steps 2-3 profiled). b: 7 steps (H=3: one step into outer round 3), then what a
    second Ctrl-C during a later save would leave (Orbax's temporary directory of step 8, metrics rows of steps past
    the checkpoint, a line cut short), then resumed to 12 steps."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    train(_cfg(a, 12, run=dict(profile_steps="1:3")))
    train(_cfg(b, 7))
    assert Checkpointer(b, CheckpointConfig(), read_only=True).steps() == [7]
    (b / "checkpoints" / "8.orbax-checkpoint-tmp-1700000000" / "outer").mkdir(parents=True)
    with open(b / "metrics.jsonl", "a") as f:
        for step in (8, 9):
            f.write(json.dumps({"kind": "inner", "step": step, "loss": 1.0}) + "\n")
        f.write('{"kind": "inner", "st')
    train(_cfg(b, 12))
    return a, b


def test_mid_round_final_checkpoint_resumes_bit_exact(runs):
    a, b = runs
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in rb if r["kind"] == "inner"] == list(range(1, 13))  # once each: no duplicates
    keys = ("kind", "step", "loss", "loss_per_island", "delta_norm")
    assert [{k: r.get(k) for k in keys} for r in rb] == [{k: r.get(k) for k in keys} for r in ra]  # bitwise
    xa, xb = _arrays(a, 12), _arrays(b, 12)
    for x, y in zip(jax.tree.leaves(xa), jax.tree.leaves(xb), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_interrupted_save_is_reported_and_removed(runs):
    _, b = runs
    log = (b / "train.log").read_text()
    assert ("ignoring an incomplete checkpoint at step 8 (8.orbax-checkpoint-tmp-1700000000: a save that was "
            "interrupted, now removed); the latest complete checkpoint is step 7") in log
    assert "dropped 3 row(s) of steps after 7" in log
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["12", "7"]


def test_finished_run_exits_before_building_anything(runs, monkeypatch):
    _, b = runs
    before = _rows(b)
    monkeypatch.setattr(trainer_mod, "Trainer", lambda *a, **k: pytest.fail("a finished run built a Trainer"))
    summary = train(_cfg(b, 12))
    assert summary["first_loss"] is None and summary["steps"] == 12
    assert _rows(b) == before


def test_profile_steps(runs):
    a, _ = runs
    traces = list((a / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    log = (a / "train.log").read_text()
    assert "profiling inner steps 2 to 3 into" in log and "wrote the profile to" in log
    with pytest.raises(ConfigError, match=r"run.profile_steps='5:2' must be \"a:b\" with 0 <= a < b"):
        tiny_config(run=dict(profile_steps="5:2"))
    with pytest.raises(ConfigError, match="run.profile_steps='3'"):
        tiny_config(run=dict(profile_steps="3"))
