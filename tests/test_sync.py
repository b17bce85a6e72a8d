"""The sync strategies chosen at build time, and the loop's step timing around an outer step."""

import time

import numpy as np

from intellect_jax import diloco, train_step
from intellect_jax.metrics import StepLogger, read_metrics
from intellect_jax.sync import MeshSync, NoSync
from intellect_jax.trainer import Trainer
from tests.helpers import tiny_config


def test_one_island_allocates_no_outer_state_and_never_syncs():
    tr = Trainer(tiny_config(mesh=dict(islands=1, fsdp=8)))
    assert isinstance(tr.sync, NoSync) and isinstance(tr.state, train_step.TrainState)
    reports = []
    assert [tr.sync.maybe(s, lambda *a: reports.append(a)) for s in (1, 5, 10)] == [1, 5, 10] and not reports
    assert tr.sync.checkpoint_arrays().keys() == {"train"}


def test_several_islands_sync_on_the_schedule():
    tr = Trainer(tiny_config(mesh=dict(islands=2, fsdp=4), diloco=dict(inner_steps=3, block_size=64)))
    assert isinstance(tr.sync, MeshSync) and isinstance(tr.state, diloco.DilocoState)
    reports = []
    report = lambda record, ready_at: reports.append((record, ready_at))  # noqa: E731
    for step in (1, 2):
        assert tr.sync.maybe(step, report) == step
    assert not reports and int(tr.state.outer_step) == 0
    assert tr.sync.maybe(3, report) == 3
    (record, ready_at), = reports
    assert record["kind"] == "outer" and record["outer_step"] == 1 and record["step"] == 3
    assert ready_at <= time.perf_counter() and record["sync_seconds"] > 0
    assert int(tr.state.outer_step) == 1 and tr.sync.at_boundary(3) and not tr.sync.at_boundary(4)


class _Pending:
    """A metric value that becomes available when its step has finished on the (simulated) device."""

    def __init__(self, value, done_at):
        self.value, self.done_at = value, done_at

    def __array__(self, dtype=None, copy=None):
        time.sleep(max(self.done_at - time.perf_counter(), 0.0))
        return np.asarray(self.value, dtype)


def _run_logger(tmp_path, pipelined, step_s=0.05, sync_s=0.4, save_s=0.4):
    """Six steps of `step_s` on a simulated device, an outer step of `sync_s` after step 3 and a checkpoint save of
    `save_s` on the host after step 5, called as the training loop calls them. Pipelined: a step is queued at once and runs after the previous one; serialized: the step
    returns when it has finished."""
    logger = StepLogger(tmp_path, total_steps=6, start_step=0, tokens_per_step=64, num_islands=1, log_every=100,
                        pipelined=pipelined, tensorboard=False, progress=False)
    device_free = time.perf_counter()
    for step in range(6):
        done_at = max(device_free, time.perf_counter()) + step_s
        device_free = done_at
        if not pipelined:
            time.sleep(done_at - time.perf_counter())
        metrics = {k: _Pending(v, done_at) for k, v in
                   dict(loss=2.0, z_loss=0.0, grad_norm=1.0, lr=1e-3, tokens=64.0).items()}
        logger.maybe_flush(step, metrics)
        if step + 1 == 3:  # the sync waits for the inner steps, then takes sync_s
            time.sleep(max(done_at - time.perf_counter(), 0.0))
            ready_at = time.perf_counter()
            time.sleep(sync_s)
            logger.outer({"kind": "outer", "step": 3}, ready_at)
        if step + 1 == 5:
            with logger.paused():
                time.sleep(save_s)
    logger.flush()
    logger.close()
    return [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "inner"]


def test_step_time_never_includes_the_sync_nor_moves_between_steps(tmp_path):
    for pipelined in (False, True):
        d = tmp_path / str(pipelined)
        rows = _run_logger(d, pipelined)
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
        times = [r["step_seconds"] for r in rows]
        assert all(0.04 < t < 0.3 for t in times), (pipelined, times)
