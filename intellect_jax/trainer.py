"""The training loop. ``train(cfg)`` is what ``intellect-jax train`` calls.

    build (mesh, model, sync, data, checkpointer) -> restore -> compile -> sync.start (elastic: join)
    for each step: batch -> inner step -> logger.maybe_flush -> sync.maybe -> evaluator.maybe -> a checkpoint when due

The loop never asks which mode it runs in: the Sync chosen at build time (sync.py: one island, DiLoCo over the
mesh's island axis, or elastic islands over TCP) owns the state layout and the outer-step schedule, the
checkpointer owns the save cadence, the StepLogger (metrics.py) the metric cadence and step timing. Step N+1 is
dispatched before step N's metrics are pulled to the host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from intellect_jax import data
from intellect_jax import sharding as sh
from intellect_jax.checkpoint import Checkpointer, CheckpointError, checkpoint_dir
from intellect_jax.config import Config, ConfigError, RunConfig
from intellect_jax.evaluate import Evaluator
from intellect_jax.info import count_params, flops_per_token
from intellect_jax.metrics import StepLogger, device_peak_flops
from intellect_jax.state import ModelSetup
from intellect_jax.sync import make_sync
from intellect_jax.train_step import make_train_step

log = logging.getLogger("intellect_jax")


def setup_logging(run_dir, primary: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger("intellect_jax")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    log_file = run_dir / ("train.log" if primary else f"train.process{jax.process_index()}.log")
    for handler in (logging.StreamHandler(), logging.FileHandler(log_file)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The (island, row) block of a [islands, B, L] batch that this process's devices hold."""
    idx = list(sharding.addressable_devices_indices_map(shape).values())
    isl = [i[0].indices(shape[0]) for i in idx]
    rows = [i[1].indices(shape[1]) for i in idx]
    return (slice(min(s for s, _, _ in isl), max(e for _, e, _ in isl)),
            slice(min(s for s, _, _ in rows), max(e for _, e, _ in rows)))


class Trainer:
    """The mesh, the model and the Sync of one run. The live state is ``trainer.sync.state``."""

    def __init__(self, cfg: Config, mesh: Mesh | None = None):
        self.cfg = cfg
        self.mesh = mesh or sh.make_mesh(cfg.mesh)
        self.num_islands = sh.island_count(self.mesh)
        self.setup = ModelSetup.build(cfg.model, cfg.optim)
        step = make_train_step(self.setup.graphdef, cfg.optim, self.setup.optimizer,
                               sh.activation_constraint(self.mesh))
        self.batch_sharding = NamedSharding(self.mesh, sh.batch_spec(per_island=True))
        self.sync = make_sync(cfg, self.mesh, self.setup, step, self.batch_sharding, self._imported_params())

    @property
    def state(self):
        return self.sync.state

    def _imported_params(self):
        """Parameters of the Hugging Face checkpoint named by run.init_from_hf (None: random init)."""
        if not self.cfg.run.init_from_hf:
            return None
        from intellect_jax import hf

        params, hf_model = hf.load_hf(self.cfg.run.init_from_hf, base=self.cfg.model)
        if hf_model != self.cfg.model:
            diff = [f"model.{k}: config {getattr(self.cfg.model, k)!r} vs checkpoint {getattr(hf_model, k)!r}"
                    for k in self.cfg.model.__dataclass_fields__
                    if getattr(self.cfg.model, k) != getattr(hf_model, k)]
            raise ConfigError(f"run.init_from_hf={self.cfg.run.init_from_hf!r} does not match the model config ("
                              + "; ".join(diff) + "); set those model.* keys to the checkpoint's values")
        log.info("initialised the parameters from the Hugging Face checkpoint %s", self.cfg.run.init_from_hf)
        return params

    def compile(self) -> None:
        """Compiles the loop's programs ahead of time, so the first step is not a stall."""
        t0 = time.perf_counter()
        shape = (self.num_islands, self.cfg.data.batch_size, self.cfg.data.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_mask" else np.int32,
                                         sharding=self.batch_sharding) for k in data.BATCH_KEYS}
        self.sync.compile(batch)
        log.info("compiled the training step in %.1fs", time.perf_counter() - t0)

    def inner_step(self, batch) -> dict:
        return self.sync.inner_step(batch)

    def make_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        shape = (self.num_islands, self.cfg.data.batch_size, self.cfg.data.seq_len)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, shape)
                for k, v in host_batch.items()}

    def global_params(self):
        return self.sync.global_params()


class RunCheckpointer:
    """What a run saves and when: every ``checkpoint.every_outer_steps`` x H inner steps (one island: the same count
    of steps) and at the run's last step, whether it ends or stops on a signal. Mid-outer-step is fine: a DiLoCo
    checkpoint holds every island's inner state, and resuming from it is exact."""

    def __init__(self, run_dir, cfg: Config, trainer: Trainer, loader):
        self.cfg, self.trainer, self.loader = cfg, trainer, loader
        self.run_dir = run_dir
        self.ckpt = Checkpointer(run_dir, cfg.checkpoint)
        self.every = cfg.checkpoint.every_outer_steps * cfg.diloco.inner_steps
        self.last_saved: int | None = None

    def restore_latest(self) -> int:
        """Restores checkpoint.resume_step (default: the latest); returns the step to continue from (0: fresh)."""
        step = self.cfg.checkpoint.resume_step if self.cfg.checkpoint.resume_step >= 0 else self.ckpt.latest_step()
        if step is None:
            _drop_metrics_after(self.run_dir, 0)
            return 0
        _check_compatible(self.ckpt.read_json(step, "config"), self.cfg, step)
        meta = self.ckpt.read_json(step, "meta")
        if self.trainer.sync.restore(self.ckpt, step, meta):
            try:
                self.ckpt.restore_data(step, self.loader)
            except CheckpointError as e:  # e.g. written by an older intellect-jax: keep the model, restart the data
                log.warning("the data streams restart from the beginning: %s", e)
        else:
            log.warning("the data streams restart: the checkpoint's data state is laid out for %d islands and this "
                        "run has %d", meta["islands"], self.trainer.num_islands)
        log.info("resumed from checkpoint step %d (outer step %d) in %s", meta["step"], meta["outer_step"],
                 self.ckpt.dir)
        self.last_saved = meta["step"]
        _drop_metrics_after(self.run_dir, meta["step"])
        return meta["step"]

    @staticmethod
    def finished(run_dir, cfg: Config) -> int | None:
        """The step of the checkpoint a run would resume from when it is already at the end (else None), read
        without building anything: a finished run exits before any compilation."""
        if not checkpoint_dir(run_dir).is_dir():
            return None
        with contextlib.closing(Checkpointer(run_dir, cfg.checkpoint, read_only=True)) as ckpt:
            step = cfg.checkpoint.resume_step if cfg.checkpoint.resume_step >= 0 else ckpt.latest_step()
            if step is None or step not in ckpt.steps():
                return None  # restore_latest reports a missing resume_step
            done = int(ckpt.read_json(step, "meta")["step"])
        return done if done >= cfg.total_inner_steps else None

    def save(self, step: int) -> None:
        sync = self.trainer.sync
        self.ckpt.save(step, sync.checkpoint_arrays(), {"meta": sync.meta(step), "config": self.cfg.to_dict()},
                       data=self.loader)
        self.last_saved = step
        log.info("checkpoint step %d saving (async) to %s", step, self.ckpt.dir)

    def due(self, step: int) -> bool:
        """Every `every` steps; a save the sync could not take then (an elastic reduce in flight) is taken at the
        first step after it where it can."""
        return bool(self.every) and step // self.every > (self.last_saved or 0) // self.every

    def finish(self, step: int) -> None:
        """The last save of the run, so that the same command run again has nothing to redo."""
        if step != self.last_saved:
            self.save(step)
        self.ckpt.wait()

    def close(self) -> None:
        self.ckpt.close()


class StopRequest:
    """SIGINT/SIGTERM: the first asks the loop to finish its step, checkpoint and exit 0; a second exits at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        import signal

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        if self.requested:
            log.warning("second %s: exiting now without a checkpoint", signal.Signals(signum).name)
            os._exit(128 + signum)
        self.requested = True
        log.warning("%s received: finishing this step, then saving a checkpoint (send it again to exit now)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Every process stops at the same step: a stop anywhere is a stop everywhere."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.any(flags))


def _drop_metrics_after(run_dir, step: int) -> None:
    """Drops the metrics.jsonl rows of steps after `step`, the step a run resumes from: they were written after its
    last checkpoint (a crash, a second Ctrl-C) and those steps run again, so keeping them would duplicate them."""
    path = run_dir / "metrics.jsonl"
    if jax.process_index() != 0 or not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) < len(lines):
        path.with_suffix(".tmp").write_text("".join(keep))
        os.replace(path.with_suffix(".tmp"), path)
        log.info("metrics.jsonl: dropped %d row(s) of steps after %d, written after the last checkpoint (those "
                 "steps run again)", len(lines) - len(keep), step)


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut short by a kill
        return float("inf")


class StepProfiler:
    """``run.profile_steps = "a:b"``: a jax.profiler trace of the inner steps after step a up to step b, written to
    <run dir>/profile (xprof or TensorBoard's profile plugin open it). The loop calls :meth:`at` before each step;
    a range past the run's end is cut there (the trace then includes the final checkpoint)."""

    def __init__(self, cfg: RunConfig, run_dir, sync):
        self.range, self.sync, self.active = cfg.profile_range, sync, False
        self.dir = run_dir / "profile"
        if jax.process_count() > 1:
            self.dir = self.dir / f"process{jax.process_index()}"

    def at(self, step: int) -> None:
        """`step`: the inner steps done so far."""
        if self.range is None:
            return
        start, stop = self.range
        if not self.active and start <= step < stop:
            log.info("profiling inner steps %d to %d into %s", step + 1, stop, self.dir)
            jax.profiler.start_trace(str(self.dir))
            self.active = True
        elif self.active and step >= stop:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.block_until_ready(self.sync.state)  # the traced steps' device work ends inside the trace
            jax.profiler.stop_trace()
            self.active = False
            log.info("wrote the profile to %s", self.dir)


def _check_compatible(saved: dict, cfg: Config, step: int) -> None:
    """A resumed run must train the same model; mesh, islands, steps and most hyper-parameters may change."""
    now = cfg.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "param_dtype"):
        if saved["model"][key] != now["model"][key]:
            raise CheckpointError(
                f"the checkpoint at step {step} has model.{key}={saved['model'][key]!r} but the config says "
                f"{now['model'][key]!r}; resume with the original model settings or start a new --run.dir")


def train(cfg: Config) -> dict[str, Any]:
    """Runs `cfg` to completion (resuming from the run directory's checkpoint if there is one); returns a summary.

    SIGINT/SIGTERM stop the run after the current step with a checkpoint (resumable, also mid-outer-step). A run
    whose checkpoint is already at the last step returns at once (first_loss and final_params None).
    """
    run_dir = cfg.run.resolved_dir.expanduser()
    _start_run(cfg, run_dir)
    if (done := RunCheckpointer.finished(run_dir, cfg)) is not None:
        return {"steps": done, "first_loss": None, "last_loss": None, "run_dir": str(run_dir), "stopped": False,
                "final_params": None}
    with contextlib.ExitStack() as closing:
        trainer = Trainer(cfg)
        sync = closing.enter_context(contextlib.closing(trainer.sync))
        loader = closing.enter_context(contextlib.closing(make_loader(cfg, trainer)))
        checkpointer = closing.enter_context(contextlib.closing(RunCheckpointer(run_dir, cfg, trainer, loader)))
        step = checkpointer.restore_latest()
        trainer.compile()  # before an elastic island joins: it must not fetch the state and then compile for minutes
        step = sync.start(step)
        evaluator = Evaluator(cfg, trainer, step)  # run.eval_every = 0: does nothing
        logger = closing.enter_context(contextlib.closing(_step_logger(cfg, trainer, run_dir, step)))
        profiler = closing.enter_context(contextlib.closing(StepProfiler(cfg.run, run_dir, sync)))
        stopped, total = False, cfg.total_inner_steps
        with StopRequest() as stop:
            while step < total and not (stopped := stop.agreed() and sync.checkpoint_ok()):
                profiler.at(step)
                metrics = sync.inner_step(trainer.make_batch(next(loader)))
                logger.maybe_flush(step, metrics)  # step N-1's metrics, pulled now that step N is queued
                step = sync.maybe(step + 1, report=logger.outer)  # the outer step when due (elastic: may move ahead)
                evaluator.maybe(step, report=logger.eval)  # held-out loss of the global params when due, and at the end
                if checkpointer.due(step) and sync.checkpoint_ok():
                    with logger.paused():  # the save's host time is not the next step's
                        checkpointer.save(step)
            logger.flush()
            checkpointer.finish(step)
            if not stopped and step >= total:
                sync.run_finished()
    if stopped:
        log.info("stopped by signal at step %d; resume with the same command", step)
    log.info("done: steps %d-%d, loss %s -> %s", logger.start, step, logger.first_loss, logger.last_loss)
    return logger.summary(step) | {"run_dir": str(run_dir), "stopped": stopped,
                                   "final_params": trainer.global_params()}


def _start_run(cfg: Config, run_dir) -> None:
    """Logging to the run directory, the platform line, the resolved config (config.json)."""
    setup_logging(run_dir, jax.process_index() == 0)
    devices = jax.devices()
    log.info("jax %s: %d process(es), %d %s device(s) (%s); run dir %s", jax.__version__, jax.process_count(),
             len(devices), jax.default_backend(), devices[0].device_kind, run_dir)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))


def _step_logger(cfg: Config, trainer: Trainer, run_dir, start: int) -> StepLogger:
    info = count_params(cfg.model)
    log.info("model %.2fM params; mesh %s; %s", info.total_params / 1e6,
             ", ".join(f"{k}={v}" for k, v in trainer.mesh.shape.items()), trainer.sync.describe())
    devices = jax.devices()
    peak = device_peak_flops(devices[0].device_kind)
    return StepLogger(run_dir, total_steps=cfg.total_inner_steps, start_step=start,
                      tokens_per_step=trainer.num_islands * cfg.data.batch_size * cfg.data.seq_len,
                      num_islands=trainer.num_islands, log_every=cfg.run.log_every,
                      pipelined=not trainer.sync.serialized,
                      flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len, info.total_params),
                      peak_flops=peak * len(devices) if peak else None, enabled=jax.process_index() == 0,
                      wandb_project=cfg.run.wandb_project, run_name=cfg.run.name, config=cfg.to_dict(),
                      metrics_http=cfg.run.metrics_http)


def make_loader(cfg: Config, trainer: Trainer):
    """This process's data: its (island, row) block of the global batch (an elastic island: its data shard)."""
    data.ensure_prepared(cfg.data)
    n = trainer.num_islands
    islands, rows = local_rows(trainer.batch_sharding, (n, cfg.data.batch_size, cfg.data.seq_len))
    streams, local = trainer.sync.data_islands(list(range(n))[islands])
    return data.make_iterator(cfg.data, vocab_size=cfg.model.vocab_size, num_islands=streams, islands=local,
                              row_start=rows.start, row_stop=rows.stop, hold_out=cfg.run.eval_every > 0)


def init_run_from_hf(cfg: Config) -> int:
    """`intellect-jax import-hf`: a run directory whose step-0 checkpoint holds a Hugging Face model's weights.

    `intellect-jax train` with the same config and run directory then continues pre-training from it.
    """
    run_dir = cfg.run.resolved_dir.expanduser()
    setup_logging(run_dir, jax.process_index() == 0)
    with contextlib.ExitStack() as closing:
        trainer = Trainer(cfg)
        loader = closing.enter_context(contextlib.closing(make_loader(cfg, trainer)))
        checkpointer = closing.enter_context(contextlib.closing(RunCheckpointer(run_dir, cfg, trainer, loader)))
        if checkpointer.ckpt.latest_step() is not None:
            raise CheckpointError(f"{checkpointer.ckpt.dir} already holds checkpoints (latest step "
                                  f"{checkpointer.ckpt.latest_step()}); import into a new --run.dir so nothing "
                                  "trained is overwritten")
        checkpointer.finish(0)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    log.info("imported %s into %s (checkpoint step 0)", cfg.run.init_from_hf, run_dir)
    return 0
