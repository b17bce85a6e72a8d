"""Orbax checkpoints: bit-exact resume, elastic resize at restore, a killed async save."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from intellect_jax.checkpoint import Checkpointer, load_global_params
from intellect_jax.config import CheckpointConfig
from intellect_jax.metrics import read_metrics
from intellect_jax.trainer import RunCheckpointer, Trainer, make_loader, train
from tests.helpers import tiny_run_config


def _cfg(run_dir, steps, **sections):
    return tiny_run_config(run_dir, steps, **sections)


def _losses(run_dir):
    return [(m["step"], m["loss"]) for m in read_metrics(Path(run_dir) / "metrics.jsonl") if m["kind"] == "inner"]


def _arrays(run_dir, step, names=("inner", "outer")):
    ckpt = Checkpointer(run_dir, CheckpointConfig(), read_only=True)
    try:
        return {name: ckpt.restore_numpy(step, name) for name in names}
    finally:
        ckpt.close()


def _by_path(tree) -> dict[tuple[str, ...], tuple[str, tuple[int, ...], bytes]]:
    """Leaf path (attribute, key or index names: a restored tree has dicts where the state has named tuples) ->
    (dtype, shape, bytes), to compare two trees bit for bit."""
    def name(k):
        return str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(name(k) for k in path): (np.asarray(x).dtype.str, np.shape(x), np.asarray(x).tobytes())
            for path, x in leaves}


@pytest.mark.parametrize("diloco", [{}, dict(compression="int4", error_feedback=True)], ids=["int8", "int4-ef"])
def test_resume_is_bit_exact(tmp_path, diloco):
    train(_cfg(tmp_path / "a", 12, diloco=diloco))
    train(_cfg(tmp_path / "b", 6, diloco=diloco))
    assert Checkpointer(tmp_path / "b", CheckpointConfig(), read_only=True).latest_step() == 6
    train(_cfg(tmp_path / "b", 12, diloco=diloco))  # same run dir: resumes from step 6
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in lb] == list(range(1, 13))
    assert la == lb  # losses identical, bitwise (floats compare exactly)
    names = ("inner", "outer", "residual") if diloco else ("inner", "outer")
    a, b = _arrays(tmp_path / "a", 12, names), _arrays(tmp_path / "b", 12, names)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert int(b["outer"]["outer_step"]) == 4
    if diloco:  # the residual is real state: nonzero, per island, and restored (else the resumed run would differ)
        r = jax.tree.leaves(b["residual"])
        assert all(x.shape[0] == 2 for x in r) and max(float(np.abs(x).max()) for x in r) > 0


@pytest.mark.parametrize("mesh", [dict(islands=4, fsdp=2), dict(islands=2, fsdp=2, tensor=2)])
def test_restore_onto_other_islands_and_inner_mesh(tmp_path, mesh):
    run = tmp_path / "run"
    train(_cfg(run, 6, mesh=dict(islands=2, fsdp=4)))
    saved = _arrays(run, 6)
    before = saved["outer"]["global_params"]
    # the restore itself: the global params and outer optimizer state (and, same island count, every island's inner
    # state) are the saved ones bit for bit; another island count restarts every island from the global params
    trainer = Trainer(_cfg(run, 9, mesh=mesh))
    with contextlib.closing(trainer.sync), contextlib.closing(make_loader(trainer.cfg, trainer)) as loader, \
            contextlib.closing(RunCheckpointer(run, trainer.cfg, trainer, loader)) as checkpointer:
        assert checkpointer.restore_latest() == 6
        got = jax.device_get(trainer.sync.checkpoint_arrays())
    assert len(_by_path(saved["outer"])) > len(jax.tree.leaves(before))  # params, outer state, step
    assert _by_path(got["outer"]) == _by_path(saved["outer"])
    if mesh["islands"] == 2:
        assert _by_path(got["inner"]) == _by_path(saved["inner"])
    for x, y in zip(jax.tree.leaves(got["inner"].params), jax.tree.leaves(before), strict=True):
        assert x.shape[0] == mesh["islands"]
        if mesh["islands"] != 2:
            assert all(np.asarray(row).tobytes() == np.asarray(y).tobytes() for row in x)
    train(_cfg(run, 9, mesh=mesh))
    log = (run / "train.log").read_text()
    if mesh["islands"] != 2:
        assert "re-initialised from the global params" in log
    assert "resumed from checkpoint step 6" in log
    losses = _losses(run)
    assert [s for s, _ in losses][-3:] == [7, 8, 9]
    assert all(np.isfinite(l) for _, l in losses)
    after = _arrays(run, 9)
    assert int(after["outer"]["outer_step"]) == 3
    assert after["inner"]["params"]["embed_tokens"].shape[0] == mesh["islands"]
    # training continued from the restored global params (they moved, but not far)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(after["outer"]["global_params"]),
                                                  jax.tree.leaves(before))]
    assert 0 < max(moved) < 1.0
    config, params, step = load_global_params(run)
    assert step == 9 and config["mesh"]["islands"] == mesh["islands"]


def test_changed_model_is_refused(tmp_path):
    from intellect_jax.checkpoint import CheckpointError
    run = tmp_path / "run"
    train(_cfg(run, 3))
    with pytest.raises(CheckpointError, match="model.hidden_size=64 but the config says 128"):
        train(_cfg(run, 6, model=dict(hidden_size=128)))


@pytest.mark.slow
def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
    """A model big enough that a save takes a while; kill -9 as soon as the second save's temp dir appears."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "intellect_jax", "train", "--config", "configs/debug.toml", "--data.kind=synthetic",
            "--data.seq_len=16", "--data.batch_size=2", "--model.vocab_size=32768", "--model.hidden_size=512",
            "--model.intermediate_size=1024", "--model.num_hidden_layers=2", "--model.num_attention_heads=8",
            "--model.num_key_value_heads=4", "--mesh.islands=2", "--mesh.fsdp=1", "--run.host_devices=2",
            "--diloco.inner_steps=1", "--checkpoint.every_outer_steps=1", "--run.steps=50", f"--run.dir={run}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = run / "checkpoints"
    deadline = time.time() + 300
    killed_during = None
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir():
            done = [p for p in ckpts.iterdir() if p.name.isdigit()]
            tmp = [p for p in ckpts.iterdir() if "tmp" in p.name]
            if done and tmp:
                proc.send_signal(signal.SIGKILL)
                killed_during = tmp[0].name
                break
        time.sleep(0.002)
    proc.wait()
    assert killed_during is not None, "never caught a save in progress"
    complete = Checkpointer(run, CheckpointConfig(), read_only=True).latest_step()
    assert complete is not None and complete < int(killed_during.split(".")[0])
    config, params, step = load_global_params(run)
    assert step == complete and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    # and training resumes from it
    r = subprocess.run(args[:-2] + [f"--run.steps={complete + 1}", f"--run.dir={run}"], cwd=args and
                       Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resumed from checkpoint step {complete}" in r.stderr, r.stderr[-2000:]
