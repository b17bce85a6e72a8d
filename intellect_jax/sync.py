"""How a run's islands meet: one interface, three implementations, chosen once when the run is built.

    NoSync       one island: data-parallel training inside the island's mesh; no outer state is allocated.
    MeshSync     DiLoCo across the islands of this program's mesh (the ``island`` axis); the int8 mean is an XLA
                 collective inside one jitted program (collective.make_island_mean).
    ElasticSync  DiLoCo across separate programs joined over TCP (intellect_jax/elastic, through island.py).

A Sync owns what differs between the modes: the layout of the run's state (a TrainState, or a DilocoState whose
global params and outer optimizer state may live in pinned host memory), the jitted inner step over that layout,
the outer-step schedule, and the state's checkpoint items. The training loop only calls

    sync.start(step) -> step              once, before the first step (an elastic island joins the run here)
    sync.inner_step(batch) -> metrics     every step (dispatched asynchronously on accelerators)
    sync.maybe(step, report) -> step      after every inner step: runs the outer step when the schedule says so
                                          and hands its record to `report`; returns the run's position (an
                                          elastic island that re-synced from a peer ahead is moved there)
    sync.at_boundary(step) -> bool        a point where every island holds the global state (final checkpoints)
    sync.checkpoint_ok() -> bool          whether a save (or a stop) may happen now; else the loop saves later

and never asks which mode it is in. A schedule that syncs parts of the model at different steps (streaming DiLoCo
fragments, overlapped reduces) is a Sync whose ``maybe`` decides which fragment is due.
"""

from __future__ import annotations

import abc
import logging
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from intellect_jax import collective, diloco, streaming
from intellect_jax import sharding as sh
from intellect_jax.checkpoint import Checkpointer, CheckpointError
from intellect_jax.config import Config
from intellect_jax.info import count_params
from intellect_jax.metrics import summarise
from intellect_jax.schedule import Schedule
from intellect_jax.state import ModelSetup, init_params, init_train_state, opt_state_specs, train_state_specs
from intellect_jax.train_step import init_state as inner_init_state

log = logging.getLogger("intellect_jax")

Report = Callable[[dict[str, Any], float], None]  # (outer-step record, time.perf_counter() when the inner steps
#                                                   before it had finished: the sync's time starts there)


class Pending(NamedTuple):
    """In-program streaming with overlap: fragment `fragment`'s mean `delta`, to be applied after `due` steps."""
    fragment: int
    due: int
    delta: Any


class Marked(NamedTuple):
    """In-program streaming with overlap: fragment `fragment`'s reduce, synced at step `step`, runs inside the next
    inner step's program."""
    fragment: int
    step: int


class Flight(NamedTuple):
    """Elastic streaming: fragment `fragment`'s reduce running in the background (island.Reduce), its mean due
    after `due` steps; `launch_s`: what the inner steps waited at its launch (the pseudo-gradient's dispatch)."""
    fragment: int
    due: int
    reduce: Any  # island.Reduce
    launch_s: float


class Sync(abc.ABC):
    """The strategy interface; see the module docstring."""

    mode: str  # the checkpoint layout this sync writes and reads ("single" or "diloco")

    def __init__(self, cfg: Config, mesh: Mesh, setup: ModelSetup, inner_step: Callable, batch_sharding,
                 params: Any = None):
        self.cfg, self.mesh, self.setup = cfg, mesh, setup
        self.num_islands = sh.island_count(mesh)
        self.batch_sharding = batch_sharding
        # Metrics come back replicated so that every process can read them (multi-host runs).
        self.replicated = NamedSharding(mesh, PartitionSpec())
        # Simulated CPU devices: two programs with collectives in flight at once can deadlock XLA:CPU's rendezvous
        # (seen intermittently on a loaded 2-core machine), so CPU runs execute one program at a time.
        # Accelerators keep asynchronous dispatch (step N+1 is queued before step N's metrics are read).
        self.serialized = jax.default_backend() == "cpu" and mesh.devices.size > 1
        self.state: Any = None

    # -- the training loop's interface -------------------------------------------------------------------------------

    def start(self, step: int) -> int:
        return step

    @abc.abstractmethod
    def inner_step(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        ...

    def maybe(self, step: int, report: Report) -> int:
        return step

    def at_boundary(self, step: int) -> bool:
        return True

    def checkpoint_ok(self) -> bool:
        """Whether the state can be saved (or the run stopped) now (ElasticSync: not while a reduce is in flight)."""
        return True

    def run_finished(self) -> None:
        """The run reached its last step (it was not stopped); called before `close`."""

    def close(self) -> None:
        pass

    # -- build-time facts --------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def describe(self) -> str:
        """One log line: what this run's islands are and how they meet."""

    def data_islands(self, local: list[int]) -> tuple[int, list[int]]:
        """(streams in the run, this process's streams) for the data loader, given its local island rows."""
        return self.num_islands, local

    @abc.abstractmethod
    def compile(self, batch: dict[str, jax.ShapeDtypeStruct]) -> None:
        """Compiles the programs of the loop ahead of time."""

    # -- state -------------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def global_params(self) -> Any:
        ...

    @abc.abstractmethod
    def checkpoint_arrays(self) -> dict[str, Any]:
        ...

    @abc.abstractmethod
    def restore(self, ckpt: Checkpointer, step: int, meta: dict[str, Any]) -> bool:
        """Loads checkpoint `step`'s arrays; returns whether its data-iterator state applies to this run."""

    def outer_step(self) -> int:
        return 0

    def meta(self, step: int) -> dict[str, Any]:
        return {"step": step, "islands": self.num_islands, "mesh": dict(self.mesh.shape),
                "outer_step": self.outer_step(), "mode": self.mode}

    def _check_mode(self, step: int, meta: dict[str, Any]) -> None:
        if meta["mode"] != self.mode:
            raise CheckpointError(
                f"checkpoint step {step} was written by a {meta['mode']} run ({meta['islands']} island(s)) and this "
                f"run is {self.mode} ({self.num_islands} island(s)); resume with mesh.islands "
                f"{'> 1' if meta['mode'] == 'diloco' else '= 1'} or start a new --run.dir")

    def _abstract(self, arrays: Any, shardings: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), arrays, shardings)

    def _block(self, out):
        if self.serialized:
            jax.block_until_ready((self.state, out))
        return out


class NoSync(Sync):
    """One island: the state is a TrainState of the island's mesh; there is no outer step."""

    mode = "single"

    def __init__(self, cfg, mesh, setup, inner_step, batch_sharding, params=None):
        super().__init__(cfg, mesh, setup, inner_step, batch_sharding)
        self.state, self.shardings = init_train_state(setup, cfg.model, mesh, cfg.run.seed, params)
        squeeze = lambda b: jax.tree.map(lambda x: x[0], b)  # noqa: E731 - the island dim is 1
        self._inner = jax.jit(lambda s, b: inner_step(s, squeeze(b)),
                              in_shardings=(self.shardings, batch_sharding),
                              out_shardings=(self.shardings, self.replicated), donate_argnums=0)

    def describe(self) -> str:
        return "one island"

    def compile(self, batch) -> None:
        self._inner = self._inner.lower(self.state, batch).compile()

    def inner_step(self, batch):
        self.state, metrics = self._inner(self.state, batch)
        return self._block(metrics)

    def global_params(self):
        return self.state.params

    def checkpoint_arrays(self):
        return {"train": self.state}

    def restore(self, ckpt, step, meta) -> bool:
        self._check_mode(step, meta)
        self.state = ckpt.restore(step, {"train": self._abstract(self.state, self.shardings)}, ())["train"]
        return True


class DilocoSync(Sync):
    """DiLoCo state and schedule shared by both transports: H inner steps per island, then an outer step.

    Subclasses say how the mean pseudo-gradient is formed (`_outer`).
    """

    mode = "diloco"

    def __init__(self, cfg, mesh, setup, inner_step, batch_sharding, params=None, *, wire_islands: int):
        super().__init__(cfg, mesh, setup, inner_step, batch_sharding)
        n = self.num_islands
        self.H = cfg.diloco.inner_steps
        self.outer = diloco.make_outer_optimizer(cfg.diloco)
        global_params, _ = init_params(setup, cfg.model, mesh, cfg.run.seed, params)
        self._inner_init = lambda p, step=0: inner_init_state(p, setup.optimizer, step)  # noqa: E731
        abstract_inner = jax.eval_shape(jax.vmap(self._inner_init, axis_size=n),
                                        jax.eval_shape(lambda g: diloco.broadcast_islands(g, n), global_params))
        inner_specs = train_state_specs(setup, mesh, abstract_inner, per_island=True)
        gspecs = sh.param_specs(setup.axes, setup.shapes, mesh)
        c = cfg.diloco
        # Streaming DiLoCo (streaming.py): fragments, overlap or merging. Off: the plain outer step below, unchanged.
        self.frags = (streaming.Fragments(global_params, cfg.model.num_hidden_layers, c.fragments)
                      if c.fragments > 1 or c.overlap_steps or c.merge_alpha else None)
        if self.frags is None:
            outer_specs = opt_state_specs(self.outer, jax.eval_shape(self.outer.init, global_params), gspecs)
        else:  # one outer optimizer state per fragment, over its view
            outer_specs = tuple(
                opt_state_specs(self.outer, jax.eval_shape(lambda g, p=p: self.outer.init(self.frags.take(g, p)),
                                                           global_params), self.frags.take(gspecs, p))
                for p in range(self.frags.count))
        self.schedule = Schedule(self.H, c.fragments if self.frags is not None else 1,
                                 c.overlap_steps if self.frags is not None else 0)
        self.inner_specs = inner_specs
        self.error_feedback = cfg.diloco.error_feedback
        self.device_shardings = sh.named(mesh, diloco.DilocoState(
            inner_specs, gspecs, outer_specs, PartitionSpec(), inner_specs.params if self.error_feedback else None))
        # Global params + outer optimizer state (+ the error-feedback residual) live in pinned host memory between
        # syncs where the backend has memory kinds (as PRIME kept them on the CPU); every jitted function moves them
        # in (`_on_device`) and out.
        self.host_offload = cfg.diloco.outer_state_on_host and _has_pinned_host()
        d = self.device_shardings
        if self.host_offload:
            host = lambda t: jax.tree.map(lambda x: x.with_memory_kind("pinned_host"), t)  # noqa: E731
            self.shardings = d._replace(global_params=host(d.global_params), outer_opt_state=host(d.outer_opt_state),
                                        residual=host(d.residual))
            log.info("global params and outer optimizer state are kept in pinned host memory between syncs")
        else:
            self.shardings = d
            if cfg.diloco.outer_state_on_host:
                log.info("the %s backend has no pinned_host memory: the outer state stays in device memory",
                         jax.default_backend())
        # Parameters each outer row syncs (the whole model, or each fragment's view): its data-parallel comparison.
        self.row_elements = ([nparams_of(global_params)] if self.frags is None else
                             [self.frags.size(p, global_params) for p in range(self.frags.count)])
        self.state = jax.jit(self._init_state, out_shardings=self.shardings)(global_params)
        del global_params  # now inside the state
        self._island_step = diloco.island_inner_step(inner_step)
        self._inner = jax.jit(self._island_step, in_shardings=(self.shardings.inner, batch_sharding),
                              out_shardings=(self.shardings.inner, self.replicated), donate_argnums=0)
        self._install = jax.jit(self._fresh_islands, in_shardings=(d.global_params, d.outer_opt_state, None, None),
                                out_shardings=self.shardings)
        nparams = count_params(cfg.model).total_params
        self.wire_bytes = collective.wire_bytes_per_island(nparams, wire_islands, cfg.diloco.compression,
                                                           cfg.diloco.block_size)
        self.wire_ratio_vs_ddp = ddp_ratio(nparams, wire_islands, self.H, self.wire_bytes)
        self._t_outer = time.perf_counter()
        # Streaming with overlap: a fragment's mean between its sync and the step it is applied at; `_marked`: a
        # reduce that runs inside the next inner step's program.
        self._pending: Pending | None = None
        self._marked: Marked | None = None

    def _init_state(self, global_params) -> diloco.DilocoState:
        state = diloco.init_state(global_params, self._inner_init, self.outer, self.num_islands, self.error_feedback)
        if self.frags is not None:
            state = state._replace(outer_opt_state=streaming.init_outer_states(self.frags, self.outer, global_params))
        return state

    def _fresh_islands(self, global_params, outer_opt_state, outer_step, step) -> diloco.DilocoState:
        """Every island restarts from the global params: fresh inner optimizer state at `step`, zero residual."""
        inner = jax.vmap(lambda p: self._inner_init(p, step), axis_size=self.num_islands)(
            diloco.broadcast_islands(global_params, self.num_islands))
        return diloco.DilocoState(inner, global_params, outer_opt_state, outer_step,
                                  diloco.zero_residual(inner.params) if self.error_feedback else None)

    def _on_device(self, s: diloco.DilocoState) -> diloco.DilocoState:
        """Inside jit: the outer state moved from pinned host memory to the devices (no-op without offload)."""
        if not self.host_offload:
            return s
        d = self.device_shardings
        return s._replace(global_params=jax.device_put(s.global_params, d.global_params),
                          outer_opt_state=jax.device_put(s.outer_opt_state, d.outer_opt_state),
                          residual=jax.device_put(s.residual, d.residual))

    # -- the loop ----------------------------------------------------------------------------------------------------

    def start(self, step):
        self._t_outer = time.perf_counter()
        return step

    def inner_step(self, batch):
        inner, metrics = self._inner(self.state.inner, batch)
        self.state = self.state._replace(inner=inner)
        return self._block(metrics)

    def at_boundary(self, step: int) -> bool:
        return self.schedule.at_boundary(step)

    def maybe(self, step: int, report: Report) -> int:
        if not self.at_boundary(step):
            return step
        jax.block_until_ready(self.state.inner)  # the sync's time starts when the inner steps are done
        ready_at = time.perf_counter()
        metrics, extra = self._outer()
        metrics = jax.device_get(metrics)
        sync_s = time.perf_counter() - ready_at
        report(self._record(step, metrics, sync_s, self.wire_bytes, extra), ready_at)
        return step

    def _record(self, step: int, metrics: dict[str, Any], wait_s: float, wire_bytes: int,
                extra: dict[str, Any], sync_s: float | None = None) -> dict[str, Any]:
        """An outer step's metrics row (and its log lines); `wait_s`: the time the inner steps waited for it;
        `sync_s`: how long the sync itself took (default `wait_s`: nothing of it was hidden). `extra` may replace
        the bytes sent and the island count with what the reduce measured (elastic); the row's ratio to
        data-parallel uses those."""
        wall, self._t_outer = time.perf_counter() - self._t_outer, time.perf_counter()
        outer = self.outer_step()
        sync_s = wait_s if sync_s is None else sync_s
        record = {"kind": "outer", "outer_step": outer, "step": step, "sync_seconds": sync_s,
                  "wait_seconds": wait_s, "hidden_seconds": max(0.0, sync_s - wait_s), "outer_wall_seconds": wall,
                  "compute_utilization": (wall - wait_s) / wall if wall > 0 else 1.0,
                  "bytes_sent_per_island": wire_bytes, "islands": self.num_islands,
                  **summarise(metrics, self.num_islands), **extra}
        record["wire_ratio_vs_ddp"] = ddp_ratio(self.row_elements[extra.get("fragment", 0)], record["islands"],
                                                self.H, record["bytes_sent_per_island"])
        what = f"fragment {extra['fragment']}" if "fragment" in extra else f"{record['islands']} islands"
        log.info("outer step %d: synced %s in %.2fs, |delta| %.4g%s", outer, what, wait_s,
                 float(np.asarray(metrics.get("delta_norm", 0.0))),
                 f", global hash {extra['params_hash'][:12]}" if "params_hash" in extra else "")
        if record.get("excluded_islands"):
            log.warning("outer step %d: %d island(s) left out of the mean (pseudo-gradient not finite, or its norm "
                        "above diloco.max_norm_ratio=%g x the median); they restart from the new global params",
                        outer, int(record["excluded_islands"]), self.cfg.diloco.max_norm_ratio)
        if record.get("skipped_nonfinite"):
            log.warning("outer step %d: the mean pseudo-gradient is not finite (an island diverged or sent a bad "
                        "contribution); the global params were kept and every island restarts from them", outer)
        return record

    @abc.abstractmethod
    def _outer(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Runs one outer step on self.state; returns (metrics, extra fields for the outer record)."""

    def outer_now(self) -> dict[str, Any]:
        """Runs the outer step now, outside the schedule (tests and benchmarks); returns its metrics."""
        return self._outer()[0]

    # -- state -------------------------------------------------------------------------------------------------------

    def outer_step(self) -> int:
        return int(self.state.outer_step)

    def global_params(self):
        return self.state.global_params

    def install_global(self, global_params, outer_opt_state, outer_step: int, step: int) -> None:
        """Every island restarts from these global params (fresh inner optimizer state) at `step`."""
        self.state = self._install(global_params, outer_opt_state, jax.numpy.int32(outer_step), jax.numpy.int32(step))

    def checkpoint_arrays(self):
        self._run_marked_reduce()  # a reduce due inside the next step's program runs now, so the state is whole
        s = self.state
        items = {"inner": s.inner, "outer": {"global_params": s.global_params, "outer_opt_state": s.outer_opt_state,
                                             "outer_step": s.outer_step}}
        if s.residual is not None:
            items["residual"] = s.residual
        if self._pending is not None:
            items["pending"] = self._pending.delta
        return items

    def meta(self, step: int) -> dict[str, Any]:
        out = super().meta(step) | {"error_feedback": self.error_feedback}
        if self.frags is not None:
            out["streaming"] = {"fragments": self.frags.count,
                                "pending": None if self._pending is None else [self._pending.fragment,
                                                                               self._pending.due]}
        return out

    def _check_streaming(self, step: int, meta: dict[str, Any]) -> tuple[int, int] | None:
        """The checkpoint's fragment layout must be this run's (the outer optimizer state is one per fragment);
        returns its pending (fragment, due step), if any."""
        then = meta.get("streaming")
        saved, ours = (then["fragments"] if then else 1), (self.frags.count if self.frags is not None else 1)
        if saved != ours or bool(then) != (self.frags is not None):
            raise CheckpointError(
                f"checkpoint step {step} was written with diloco.fragments={saved}{' (streaming)' if then else ''} "
                f"and this run has diloco.fragments={ours}{' (streaming)' if self.frags is not None else ''}: the "
                "outer optimizer state is kept per fragment; resume with the checkpoint's diloco.fragments, "
                "overlap_steps and merge_alpha (or start a new --run.dir)")
        pending = then.get("pending") if then else None
        return None if pending is None else (int(pending[0]), int(pending[1]))

    def _run_marked_reduce(self) -> None:
        """Overridden by the transport that marks reduces (MeshSync)."""

    def _pending_abstract(self, p: int) -> dict[str, jax.ShapeDtypeStruct]:
        shapes = self.frags.take(jax.eval_shape(lambda s: s.global_params, self.state), p)
        shards = self.frags.take(self.device_shardings.global_params, p)
        return {k: jax.ShapeDtypeStruct(v.shape, jax.numpy.float32, sharding=shards[k]) for k, v in shapes.items()}

    def restore(self, ckpt, step, meta) -> bool:
        """The same island count restores everything (resharded onto the current inner mesh if it changed).

        Another island count keeps the global params and the outer optimizer state and re-initialises every
        island's inner state from the global params (logged); the data streams then restart.
        """
        self._check_mode(step, meta)
        pending = self._check_streaming(step, meta)
        self._pending, self._marked = None, None
        d = self.device_shardings  # restored into device memory, then placed
        abstract = self._abstract(self.checkpoint_arrays(), {
            "inner": d.inner, "outer": {"global_params": d.global_params, "outer_opt_state": d.outer_opt_state,
                                        "outer_step": d.outer_step}, **({"residual": d.residual} if d.residual is not None else {})})
        if pending is not None:
            abstract["pending"] = self._pending_abstract(pending[0])
        if meta.get("error_feedback", False) != self.error_feedback:
            log.info("checkpoint step %d was written with diloco.error_feedback=%s and this run has %s: %s", step,
                     meta.get("error_feedback", False), self.error_feedback,
                     "every island's residual starts at zero" if self.error_feedback else "its residuals are dropped")
            abstract.pop("residual", None)
        if meta["islands"] != self.num_islands:
            got = ckpt.restore(step, {k: abstract[k] for k in ("outer", "pending") if k in abstract}, ())
            o = got["outer"]
            if pending is not None:  # the old islands' mean, due later: still applied to the global params
                self._pending = Pending(*pending, got["pending"])
            log.info("checkpoint step %d has %d islands and this run has %d: restored the global params and outer "
                     "optimizer state; every island's inner state (AdamW moments) is re-initialised from the global "
                     "params", step, meta["islands"], self.num_islands)
            self.install_global(o["global_params"], o["outer_opt_state"], int(o["outer_step"]), meta["step"])
            return False
        out = ckpt.restore(step, abstract, ())
        o = out["outer"]
        if pending is not None:
            self._pending = Pending(*pending, out["pending"])
        residual = out.get("residual")
        if self.error_feedback and residual is None:
            residual = diloco.zero_residual(out["inner"].params)
        self.state = jax.device_put(diloco.DilocoState(out["inner"], o["global_params"], o["outer_opt_state"],
                                                       o["outer_step"], residual), self.shardings)
        return True


class MeshSync(DilocoSync):
    """DiLoCo over the island axis of this program's mesh: pseudo-gradients -> compressed island mean -> outer
    optimizer, all in one jitted program (only int8 codes and their scales cross the island axis)."""

    def __init__(self, cfg, mesh, setup, inner_step, batch_sharding, params=None):
        super().__init__(cfg, mesh, setup, inner_step, batch_sharding, params, wire_islands=sh.island_count(mesh))
        reduce_mean = collective.make_island_mean(mesh, self.inner_specs.params, compression=cfg.diloco.compression,
                                                  block_size=cfg.diloco.block_size, return_sent=self.error_feedback)
        ratio = cfg.diloco.max_norm_ratio
        self._sync = jax.jit(lambda s: diloco.outer_update(self._on_device(s), reduce_mean, self.outer, ratio),
                             in_shardings=(self.shardings,), out_shardings=(self.shardings, self.replicated),
                             donate_argnums=0)
        if self.frags is not None:
            self._build_fragment_programs(cfg, mesh)

    def _build_fragment_programs(self, cfg, mesh) -> None:
        """Per fragment (static shapes): tau = 0 one program (reduce + outer step + merge); tau > 0 a reduce at the
        sync step and an apply (outer step + merge) tau steps later."""
        c, frags = cfg.diloco, self.frags
        self.tau, self.alpha = c.overlap_steps, c.merge_alpha
        self._frag_sync, self._frag_reduce, self._frag_apply, self.fragment_wire_bytes = [], [], [], []
        self._frag_step_reduce = []
        self._reduce_metrics, self._reduce_wait = {}, 0.0
        abstract_global = jax.eval_shape(lambda s: s.global_params, self.state)
        for p in range(frags.count):
            reduce_p = collective.make_island_mean(mesh, frags.take(self.inner_specs.params, p),
                                                   compression=c.compression, block_size=c.block_size,
                                                   return_sent=self.error_feedback)
            delta_sh = frags.take(self.device_shardings.global_params, p)
            self._frag_sync.append(jax.jit(
                lambda s, p=p, r=reduce_p: streaming.sync_fragment(self._on_device(s), frags, p, r, self.outer,
                                                                   self.alpha, c.max_norm_ratio),
                in_shardings=(self.shardings,), out_shardings=(self.shardings, self.replicated), donate_argnums=0))
            self._frag_reduce.append(jax.jit(
                lambda s, p=p, r=reduce_p: streaming.reduce_fragment(self._on_device(s), frags, p, r,
                                                                     c.max_norm_ratio),
                in_shardings=(self.shardings,), out_shardings=(self.shardings, delta_sh, self.replicated),
                donate_argnums=0))
            self._frag_apply.append(jax.jit(
                lambda s, d, p=p: streaming.apply_fragment(self._on_device(s), frags, p, d, self.outer, self.alpha),
                in_shardings=(self.shardings, delta_sh), out_shardings=(self.shardings, self.replicated),
                donate_argnums=0))
            self._frag_step_reduce.append(jax.jit(
                lambda s, b, p=p, r=reduce_p: self._step_and_reduce(s, b, p, r, c.max_norm_ratio),
                in_shardings=(self.shardings, self.batch_sharding),
                out_shardings=(self.shardings, delta_sh, self.replicated, self.replicated), donate_argnums=0))
            size = sum(x.size for x in jax.tree.leaves(frags.take(abstract_global, p)))
            self.fragment_wire_bytes.append(collective.wire_bytes_per_island(size, self.num_islands, c.compression,
                                                                             c.block_size))

    def _step_and_reduce(self, s, batch, p, reduce_p, ratio):
        """One program: fragment p's reduce, from the params as they are after its sync step, and the next inner
        step. Neither reads the other's output, so XLA may run the island-axis collectives of the reduce while the
        step computes (on GPUs its latency-hiding scheduler overlaps them; XLA:CPU runs them one after another)."""
        s, delta, reduce_metrics = streaming.reduce_fragment(self._on_device(s), self.frags, p, reduce_p, ratio)
        inner, metrics = self._island_step(s.inner, batch)
        return s._replace(inner=inner), delta, reduce_metrics, metrics

    def inner_step(self, batch):
        if self._marked is None:
            return super().inner_step(batch)
        p, at = self._marked
        self._marked = None
        self.state, delta, self._reduce_metrics, metrics = self._frag_step_reduce[p](self.state, batch)
        self._pending, self._reduce_wait = Pending(p, at + self.tau, delta), 0.0
        return self._block(metrics)

    def _run_marked_reduce(self) -> None:
        if self._marked is None:
            return
        p, at = self._marked
        self._marked = None
        t0 = time.perf_counter()
        self.state, delta, self._reduce_metrics = self._frag_reduce[p](self.state)
        self._pending = Pending(p, at + self.tau, self._block(delta))
        self._reduce_wait = time.perf_counter() - t0

    def describe(self) -> str:
        c = self.cfg.diloco
        if self.frags is not None:
            return (f"streaming DiLoCo over {self.num_islands} islands, H={c.inner_steps}, {self.frags.count} "
                    f"fragments (at most {max(self.fragment_wire_bytes) / 1e6:.2f} MB per island on the wire at a "
                    f"time), overlap {c.overlap_steps} steps, merge alpha {c.merge_alpha}, {c.compression} reduce")
        return (f"DiLoCo over {self.num_islands} islands, H={c.inner_steps}, {c.compression} reduce, "
                f"{self.wire_bytes / 1e6:.2f} MB sent per island per outer step "
                f"({self.wire_ratio_vs_ddp:.0f}x less than data-parallel fp32)")

    def compile(self, batch) -> None:
        self._inner = self._inner.lower(self.state.inner, batch).compile()
        if self.frags is None:
            self._sync = self._sync.lower(self.state).compile()
            return
        for p in range(self.frags.count):  # the first sync of each fragment must not stall on compilation
            if self.tau == 0:
                self._frag_sync[p] = self._frag_sync[p].lower(self.state).compile()
            else:
                self._frag_reduce[p] = self._frag_reduce[p].lower(self.state).compile()
                self._frag_apply[p] = self._frag_apply[p].lower(self.state, self._pending_abstract(p)).compile()
                self._frag_step_reduce[p] = self._frag_step_reduce[p].lower(self.state, batch).compile()

    def maybe(self, step: int, report: Report) -> int:
        """Streaming: the pending fragment's mean is applied when due, then a fragment's sync when due (see
        streaming.py for the schedule); each applied fragment writes one outer row."""
        if self.frags is None:
            return super().maybe(step, report)
        if self._pending is not None and self._pending.due == step:
            p, _, delta = self._pending
            jax.block_until_ready(self.state.inner)
            ready_at = time.perf_counter()
            self.state, applied = self._frag_apply[p](self.state, delta)
            self._pending = None
            metrics = jax.device_get(self._block(self._reduce_metrics | applied))
            report(self._record(step, metrics, time.perf_counter() - ready_at + self._reduce_wait,
                                self.fragment_wire_bytes[p], {"fragment": p, "overlap_steps": self.tau}), ready_at)
        p = self.schedule.due(step)
        if p is None:
            return step
        if self.tau == 0:
            jax.block_until_ready(self.state.inner)  # the sync's time starts when the inner steps are done
            ready_at = time.perf_counter()
            self.state, metrics = self._frag_sync[p](self.state)
            metrics = jax.device_get(self._block(metrics))
            report(self._record(step, metrics, time.perf_counter() - ready_at, self.fragment_wire_bytes[p],
                                {"fragment": p, "overlap_steps": 0}), ready_at)
            return step
        # tau > 0: the reduce runs inside the next inner step's program (inner_step), the islands go on, and its
        # mean is applied at step + tau
        self._marked = Marked(p, step)
        return step

    def _outer(self):
        self.state, metrics = self._sync(self.state)
        return self._block(metrics), {}


class ElasticSync(DilocoSync):
    """DiLoCo across separate island programs: the pseudo-gradient leaves the device as one flat vector (int8/int4
    codes + scales packed here, or fp32 with ``elastic.device_codes`` off or no compression), the TCP ring
    (island.ElasticIsland) returns the mean the same way on every island, it is decoded and the outer step applied
    here; then the islands vote on a hash of the new global state."""

    def __init__(self, cfg, mesh, setup, inner_step, batch_sharding, params=None):
        if sh.island_count(mesh) != 1:
            from intellect_jax.config import ConfigError

            raise ConfigError(f"elastic.coordinator is set and mesh.islands={sh.island_count(mesh)}; an elastic "
                              "island is one island per program: set mesh.islands=1 (islands join over TCP)")
        super().__init__(cfg, mesh, setup, inner_step, batch_sharding, params, wire_islands=2)
        from intellect_jax.codecs import make_codec

        full, rep = self.shardings, self.replicated
        # int8/int4: the codes are made here on the devices (Codec.pack, the jnp twin of the ring's codec) and only
        # they cross to the host; the ring's mean comes back as codes and is decoded here too.
        mode = cfg.elastic.device_codes
        self.device_codes = cfg.diloco.compression != "none" and (
            mode == "on" or (mode == "auto" and jax.default_backend() != "cpu"))
        self._codec = make_codec(cfg.diloco.compression, cfg.diloco.block_size)
        if self.device_codes:
            self._pseudo = jax.jit(lambda s: self._pack_on_device(self._flat_pseudo(s)), in_shardings=(full,),
                                   out_shardings=rep)
            self._apply_delta = jax.jit(lambda s, c, sc, r: self._apply_flat(s, self._decode_on_device(s, c, sc), r),
                                        in_shardings=(full, rep, rep, rep), out_shardings=(full, rep),
                                        donate_argnums=0)
        else:
            self._pseudo = jax.jit(self._flat_pseudo, in_shardings=(full,), out_shardings=rep)
            self._apply_delta = jax.jit(self._apply_flat, in_shardings=(full, rep, rep),
                                        out_shardings=(full, rep), donate_argnums=0)
        self.island = None
        self.resumed_epoch = None  # the epoch that committed the restored checkpoint's state (its meta says)
        # streaming: the reduce in flight (Flight)
        self._flight = None
        self._row = None  # streaming: (outer row, report) held back until its vote thread has hashed the state
        if self.frags is not None:
            self._build_fragment_programs(cfg)

    def _build_fragment_programs(self, cfg) -> None:
        """Per fragment: its pseudo-gradient as one flat fp32 vector (what the ring carries), the residual update at
        the sync (error feedback), and the apply of the ring's mean (outer step + merge, streaming.apply_fragment)."""
        c, frags, full, rep = cfg.diloco, self.frags, self.shardings, self.replicated
        self.tau, self.alpha = c.overlap_steps, c.merge_alpha
        self._frag_vec, self._frag_residual, self._frag_apply, self.fragment_wire_bytes = [], [], [], []
        abstract_global = jax.eval_shape(lambda s: s.global_params, self.state)
        for p in range(frags.count):
            size = sum(x.size for x in jax.tree.leaves(frags.take(abstract_global, p)))
            self.fragment_wire_bytes.append(collective.wire_bytes_per_island(size, 2, c.compression, c.block_size))
            if self.device_codes:  # packed on the devices, the residual kept there at the sync, the mean decoded there
                self._frag_vec.append(jax.jit(lambda s, p=p: self._fragment_packed(s, p), in_shardings=(full,),
                                              out_shardings=(full, rep, rep, rep), donate_argnums=0))
                self._frag_apply.append(jax.jit(
                    lambda s, c, sc, p=p: self._apply_fragment_vector(s, self._decode_on_device(s, c, sc, p), p),
                    in_shardings=(full, rep, rep), out_shardings=(full, rep), donate_argnums=0))
                continue
            self._frag_vec.append(jax.jit(lambda s, p=p: self._fragment_vector(s, p), in_shardings=(full,),
                                          out_shardings=rep))
            self._frag_residual.append(jax.jit(lambda s, r, p=p: self._put_residual(s, r, p),
                                               in_shardings=(full, rep), out_shardings=full, donate_argnums=0))
            self._frag_apply.append(jax.jit(lambda s, d, p=p: self._apply_fragment_vector(s, d, p),
                                            in_shardings=(full, rep), out_shardings=(full, rep), donate_argnums=0))
        # The global state's part of each fragment (its view of the global params + its outer optimizer state): a
        # fragment sync changes only that part, so only it is copied to the host and hashed (`snapshot_arrays`). The
        # copy lands in pinned host memory where the backend has it: it may wait there for the vote thread while the
        # next inner steps run, and must not hold 1/P of the outer state in device memory meanwhile.
        d = self.device_shardings
        pinned = (lambda t: jax.tree.map(lambda x: x.with_memory_kind("pinned_host"), t)) if _has_pinned_host() \
            else (lambda t: t)
        self._frag_global = [jax.jit(lambda s, p=p: self._global_part(s, p), in_shardings=(full,),
                                     out_shardings=pinned((frags.take(d.global_params, p), d.outer_opt_state[p])))
                             for p in range(frags.count)]

    def _global_part(self, s, p: int):
        """Fragment p's part of the global state, as new buffers (a copy, never the state's own: those are donated
        by the next sync's programs while `snapshot_later`'s fetch may still be reading these)."""
        s = self._on_device(s)
        return jax.tree.map(jax.numpy.copy, (self.frags.take(s.global_params, p), s.outer_opt_state[p]))

    def snapshot_arrays(self, fragment: int | None = None) -> dict[str, np.ndarray]:
        """The global state (global params + outer optimizer state) as named host arrays: what the islands hash and
        vote on and what a joiner fetches. Streaming names it per fragment ("fragment 2/global_params/layers/q_proj",
        "fragment 2/outer_opt_state[0].trace['embed_tokens']", ...) so that after a fragment's sync only its part,
        1/P of the state, is copied and hashed again: with `fragment` given, only that part's arrays."""
        return self.snapshot_later(fragment)()

    def snapshot_later(self, fragment: int | None = None) -> Callable[[], dict[str, np.ndarray]]:
        """`snapshot_arrays` in two halves: the device copies are dispatched now (the state as it is now); the
        returned function brings them to the host and names them, and may run in another thread while the training
        thread goes on (streaming: the hash vote's thread), until the next fragment sync. Without fragments the
        state's own arrays are fetched: call the function before the state changes."""
        s = self.state
        if self.frags is None:
            tree = {"global_params": s.global_params, "outer_opt_state": s.outer_opt_state}
            return lambda: _host_named(tree)
        parts = [(q, self._frag_global[q](s)) for q in (range(self.frags.count) if fragment is None else (fragment,))]

        def fetch() -> dict[str, np.ndarray]:
            out: dict[str, np.ndarray] = {}
            for q, part in parts:
                g, opt = jax.device_get(part)
                out |= {f"fragment {q}/global_params/{k}": np.asarray(v) for k, v in g.items()}
                out |= {f"fragment {q}/outer_opt_state{k}": v for k, v in _host_named(opt).items()}
            return out

        return fetch

    def global_from_snapshot(self, arrays: dict[str, np.ndarray]) -> tuple[Any, Any]:
        """(global params, outer optimizer state) as host trees shaped like this island's, from a peer's
        `snapshot_arrays()`; a RuntimeError names what the peer's state lacks."""
        s = self.state
        if self.frags is None:
            new = _from_named({"global_params": s.global_params, "outer_opt_state": s.outer_opt_state}, arrays)
            return new["global_params"], new["outer_opt_state"]
        P = self.frags.count
        like = jax.eval_shape(lambda s: s.global_params, s)
        views = [{k: f"fragment {q}/global_params/{k}" for k in self.frags.take(like, q)} for q in range(P)]
        _check_names([n for v in views for n in v.values()], arrays)
        opt = tuple(_from_named(s.outer_opt_state[q], arrays, f"fragment {q}/outer_opt_state") for q in range(P))
        params = self.frags.assemble(like, [{k: arrays[n] for k, n in v.items()} for v in views])
        return params, opt

    def _fragment_vector(self, s, p: int):
        """Fragment p's pseudo-gradient of this island (+ its residual), flat, in ravel_pytree order of the view."""
        s = self._on_device(s)
        g = self.frags.take(s.global_params, p)
        x = self.frags.take(s.inner.params, p, lead=1)
        pseudo = {k: g[k].astype(jax.numpy.float32) - x[k][0].astype(jax.numpy.float32) for k in g}
        if s.residual is not None:
            r = self.frags.take(s.residual, p, lead=1)
            pseudo = {k: pseudo[k] + r[k][0] for k in pseudo}
        return jax.flatten_util.ravel_pytree(pseudo)[0]

    def _pack_on_device(self, v):
        """A flat fp32 vector -> the ring's Packed form made here (blocks from element 0, the tail zero-padded), its
        norm (for the coordinator's guard), and with error feedback the new residual: what the codes drop of v."""
        codes, scales = self._codec.pack(v)
        residual = None
        if self.error_feedback:
            residual = v - self._codec.unpack(codes, scales, v.shape[0])
        return codes, scales, jax.numpy.linalg.norm(v), residual

    def _decode_on_device(self, s, codes, scales, p: int | None = None):
        """The ring's mean (Packed codes + scales) -> flat fp32 of the whole state's (or fragment p's) length."""
        tree = s.global_params if p is None else self.frags.take(s.global_params, p)
        n = sum(x.size for x in jax.tree.leaves(tree))
        return self._codec.unpack(codes, scales, n)

    def _fragment_packed(self, s, p: int):
        codes, scales, norm, residual = self._pack_on_device(self._fragment_vector(s, p))
        if residual is not None:
            s = self._put_residual(s, residual, p)
        return s, codes, scales, norm

    def _put_residual(self, s, residual, p: int):
        s = self._on_device(s)
        r = self.frags.take(s.residual, p, lead=1)
        new = _unravel_like({k: v[0] for k, v in r.items()}, residual)
        return s._replace(residual=self.frags.put(s.residual, p, {k: v[None] for k, v in new.items()}, lead=1))

    def _apply_fragment_vector(self, s, delta, p: int):
        s = self._on_device(s)
        g = self.frags.take(s.global_params, p)
        d = _unravel_like({k: v.astype(jax.numpy.float32) for k, v in g.items()}, delta)
        s, metrics = streaming.apply_fragment(s, self.frags, p, d, self.outer, self.alpha)
        return s, metrics | {"delta_norm": jax.numpy.linalg.norm(delta)}

    def _flat_pseudo(self, s):
        """This island's pseudo-gradient (+ its residual) as one flat fp32 vector, in ravel_pytree order."""
        s = self._on_device(s)
        pseudo = diloco.pseudo_gradients(s.global_params, s.inner.params)
        if s.residual is not None:
            pseudo = jax.tree.map(jax.numpy.add, pseudo, s.residual)
        return jax.flatten_util.ravel_pytree(jax.tree.map(lambda x: x[0], pseudo))[0]

    def _apply_flat(self, s, delta, residual):
        s = self._on_device(s)
        if residual is not None:
            residual = jax.tree.map(lambda x: x[None], _unravel_like(jax.tree.map(lambda x: x[0], s.residual), residual))
        return diloco.apply_outer(s, _unravel_like(s.global_params, delta), self.outer, residual)

    def describe(self) -> str:
        c = self.cfg
        return (f"elastic island {c.elastic.data_shard} of a run coordinated at {c.elastic.coordinator}, "
                f"H={c.diloco.inner_steps}, {c.diloco.compression} ring all-reduce over TCP"
                + (" (codes made on the devices)" if self.device_codes else ""))

    def data_islands(self, local):
        return self.cfg.elastic.data_shards, [self.cfg.elastic.data_shard]

    def compile(self, batch) -> None:
        self._inner = self._inner.lower(self.state.inner, batch).compile()
        if self.frags is None:
            return
        for p in range(self.frags.count):  # the first sync of each fragment must not stall on compilation
            self._frag_vec[p] = self._frag_vec[p].lower(self.state).compile()
            self._frag_global[p] = self._frag_global[p].lower(self.state).compile()
            v = self._vector_abstract(p)
            if self.device_codes:
                packed = self._packed_abstract(v.shape[0])
                self._frag_apply[p] = self._frag_apply[p].lower(self.state, *packed).compile()
                continue
            self._frag_apply[p] = self._frag_apply[p].lower(self.state, v).compile()
            if self.error_feedback:
                self._frag_residual[p] = self._frag_residual[p].lower(self.state, v).compile()

    def meta(self, step: int) -> dict[str, Any]:
        """Also the epoch (id, outer step, members) that committed the saved state, when the island knows it: a run
        restarted whole (a new coordinator, every island from its checkpoint) then waits for exactly those islands
        instead of a fixed recovery grace."""
        out = super().meta(step)
        ep = self.island.client.last_epoch if self.island is not None else None
        if ep is not None and int(ep["step"]) + 1 == out["outer_step"]:
            out["elastic_epoch"] = dict(ep)
        return out

    def restore(self, ckpt, step, meta) -> bool:
        self.resumed_epoch = meta.get("elastic_epoch")
        return super().restore(ckpt, step, meta)

    def start(self, step):
        """Joins the run (after compiling: a joiner must not fetch the state and then compile for minutes)."""
        from intellect_jax.island import ElasticIsland

        c = self.cfg
        self.island = ElasticIsland(self, c.elastic, c.elastic.run_id or c.run.name, c.diloco.compression,
                                    c.diloco.block_size)
        self.island.join()
        step = super().start(self._resume_step(step))  # a peer's state may be ahead
        if self.frags is not None and self._launch_due(step):  # resumed where a fragment's sync starts
            self._launch(step)
        return step

    def _launch_due(self, step: int) -> bool:
        """Streaming: the next outer step starts at this step (or started earlier: an island that re-synced from a
        peer after its sync step joins that sync at once), unless its mean would be due after the run's last step
        (it could not be applied in this run; a run resumed from there, or prolonged, launches it as it starts)."""
        r = self.outer_step()
        return (self._flight is None and self.schedule.launch(r) <= step
                and self.schedule.land(r) <= self.cfg.total_inner_steps)

    def checkpoint_ok(self) -> bool:
        """Streaming: nothing is saved (and the run does not stop) while a reduce is in flight, so that a checkpoint
        never holds half an outer step: the loop goes on to the step where its mean is applied. Before a save the
        last hash vote's verdict is taken (a minority state is never saved: it is replaced by a peer's first)."""
        if self._flight is not None:
            return False
        if self.island is not None:
            self._settle_vote(time.perf_counter())
        return True

    def _resume_step(self, step: int) -> int:
        """Where this island continues after installing a peer's state (the peer's step), else `step`."""
        if self.frags is None:
            return max(step, self.outer_step() * self.H)
        return max(step, int(self.state.inner.step[0]))

    def maybe(self, step: int, report: Report) -> int:
        if self.frags is None:
            step = super().maybe(step, report)
            return self._resume_step(step)  # re-synced from a peer that was ahead: continue from there
        # Streaming: the mean in flight lands when due; the next outer step (fragment r mod P) starts at its step.
        # The fragment follows from the outer step, not from `step` alone: after a re-sync at a peer's sync step
        # the fragment due there has already been applied.
        # A reduce whose thread found this island in the last hash vote's minority lands at once (it sent nothing):
        # the island re-syncs from a peer and joins the sync it missed.
        if self._flight is not None and (self._flight.due <= step or self._flight.reduce.aborted):
            step = self._land(step, report)
        if self._launch_due(step):
            self._launch(step)
        if self._flight is not None and self._flight.due <= step:  # tau = 0, or a late launch after a re-sync
            step = self._land(step, report)
        if step >= self.cfg.total_inner_steps:
            self._settle_vote(time.perf_counter())  # the run's last vote: its verdict before the final save
        return step

    def _settle_vote(self, ready_at: float, verdict=None) -> bool:
        """The verdict of the last fragment sync's hash vote (running in the background since its mean was applied;
        or `verdict`, as a reduce thread took it) and its outer row, held back for the hash until now; True: this
        island was in the minority and now holds a peer's state. `ready_at`: when the inner steps before this point
        had finished (for the metrics logger)."""
        lost, h = self.island.settle_pending(verdict)
        if self._row is not None:
            (row, report), self._row = self._row, None
            row["params_hash"] = h
            report(row, ready_at)
        return lost

    def _launch(self, step: int) -> None:
        """Fragment p's pseudo-gradient is made and its ring reduce starts in the background. The last fragment
        sync's hash vote, if still running, goes with it: the reduce thread takes its verdict before anything is sent
        (`_land` reads it), so the inner steps do not wait for it here. The mean is due `tau` steps after the sync's
        scheduled step (the same step on every island)."""
        t1 = time.perf_counter()
        r = self.outer_step()
        p, start = self.schedule.fragment(r), self.schedule.launch(r)
        if step > start:
            log.info("joining outer step %d's sync %d inner step(s) after its start (re-synced from a peer)", r,
                     step - start)
        # The fragment's program is dispatched here; its result reaches the host in the reduce thread (the inner
        # steps do not wait for the copy), except with error feedback on the host codec, whose residual (from the
        # host payload) goes into the state here.
        if self.device_codes:  # the residual (error feedback) is kept on the devices inside the same program
            self.state, codes, scales, norm = self._frag_vec[p](self.state)
            n = self._vector_abstract(p).shape[0]
            payload = lambda: self._packed(*jax.device_get((codes, scales, norm)), n)  # noqa: E731
        elif self.error_feedback:  # what the codec drops of this island's contribution, kept at the sync
            vec = np.asarray(jax.device_get(self._frag_vec[p](self.state)), np.float32)
            self.state = self._frag_residual[p](self.state, jax.device_put(vec - self._codec.roundtrip(vec),
                                                                           self.replicated))
            payload = (vec, None)
        else:
            out = self._frag_vec[p](self.state)
            payload = lambda: (np.asarray(jax.device_get(out), np.float32), None)  # noqa: E731
        self._flight = Flight(p, self.schedule.land(r), self.island.start_reduce(r, payload, self.device_codes),
                              time.perf_counter() - t1)

    def _land(self, step: int, report: Report) -> int:
        """The fragment's mean, when due: applied (outer step + merge), the hash vote, one outer row. First the
        previous sync's verdict, as the reduce thread took it: if this island lost that vote, it re-syncs from a peer
        instead (its reduce sent nothing) and the caller launches the sync again from the peer's state. The time the
        inner steps wait here (plus the copy at the launch) is the row's wait_seconds; the reduce's own duration is
        its sync_seconds (the rest of it ran hidden behind the inner steps)."""
        from intellect_jax.elastic.client import StaleStep

        jax.block_until_ready(self.state.inner)
        ready_at = time.perf_counter()
        p, _, reduce, copy_s = self._flight
        r, sync_s = reduce.outer_step, 0.0
        self._flight = None
        if self._settle_vote(ready_at, reduce.verdict()):  # the last vote lost: a peer's state now
            return self._resume_step(step)
        verdict_s = time.perf_counter() - ready_at
        reduce_s = apply_s = 0.0
        try:
            delta = reduce.result()
            sync_s = reduce.seconds
            reduce_s = time.perf_counter() - ready_at - verdict_s
            t = time.perf_counter()
            self.state, metrics = self._frag_apply[p](self.state, *self._to_device(delta))
            metrics = self._block(metrics)
            apply_s = time.perf_counter() - t
            # Hashing the state and the vote run in a background thread (the hash and the coordinator round trips
            # overlap the next inner steps); the next reduce's thread takes the verdict before this island's next
            # pseudo-gradient leaves it (island.Reduce), so a minority state never feeds a reduce.
            metrics, h = self.island.settle(r, metrics, wait=False, fragment=p)
        except StaleStep as e:
            metrics, h = self.island.resync(f"outer step {r} completed without this island ({e})")
        wait_s = time.perf_counter() - ready_at + copy_s
        extra = {"fragment": p, "overlap_steps": self.tau, **({"params_hash": h} if h else {}),
                 # where the wait went: the pseudo-gradient's copy off the device at the launch; here the verdict of
                 # the previous fragment's hash vote (taken by the reduce thread), the reduce not done yet, the
                 # apply, the state's host copy (hashing and the vote run in the background)
                 "wait_verdict_seconds": verdict_s, "wait_launch_seconds": copy_s, "wait_reduce_seconds": reduce_s,
                 "wait_apply_seconds": apply_s,
                 "wait_vote_seconds": wait_s - copy_s - verdict_s - reduce_s - apply_s,
                 **_reduce_fields(self.island.client.last_stats)}
        row = self._record(step, jax.device_get(metrics), wait_s, self.fragment_wire_bytes[p], extra,
                           sync_s=max(sync_s or 0.0, wait_s))
        if h is None:  # the vote thread hashes the state: the row waits for its hash (`_settle_vote`)
            self._row = (row, report)
        else:
            report(row, ready_at)
        return self._resume_step(step)

    def _packed_abstract(self, n: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        return tuple(jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)
                     for shape, dtype in self._codec.layout(n))

    @staticmethod
    def _packed(codes, scales, norm, n: int):
        from intellect_jax.codecs import Packed

        return Packed(np.asarray(codes), np.asarray(scales), n), float(norm)

    def _to_device(self, delta) -> tuple:
        """The ring's mean as the apply programs take it: (codes, scales) or (fp32 vector,)."""
        if self.device_codes:
            return tuple(jax.device_put(a, self.replicated) for a in (delta.codes, delta.scales))
        return (jax.device_put(delta, self.replicated),)

    def _vector_abstract(self, p: int) -> jax.ShapeDtypeStruct:
        n = sum(x.size for x in jax.tree.leaves(self.frags.take(jax.eval_shape(lambda s: s.global_params,
                                                                               self.state), p)))
        return jax.ShapeDtypeStruct((n,), jax.numpy.float32, sharding=self.replicated)

    # island.LocalState: what the island's protocol (island.py) asks of this state
    def position(self) -> tuple[int, int]:
        return int(self.state.outer_step), int(self.state.inner.step[0])

    def install_snapshot(self, arrays: dict[str, np.ndarray], outer_step: int, step: int) -> None:
        self.install_global(*self.global_from_snapshot(arrays), outer_step, step)

    def install_global(self, global_params, outer_opt_state, outer_step: int, step: int) -> None:
        self._flight = None  # a peer's state replaces what this island had in flight
        super().install_global(global_params, outer_opt_state, outer_step, step)

    def _outer(self):
        metrics, h = self.island.sync()
        return metrics, {"params_hash": h, **_reduce_fields(self.island.client.last_stats)}

    def pseudo_gradient_payload(self) -> tuple[Any, float | None, Any]:
        """(what this island puts into the ring: Packed codes made here or the fp32 vector, its norm or None, the
        new error-feedback residual or None, to hand back to `apply_mean`)."""
        if self.device_codes:
            codes, scales, norm, residual = self._pseudo(self.state)
            n = sum(x.size for x in jax.tree.leaves(self.state.global_params))
            return (*self._packed(*jax.device_get((codes, scales, norm)), n), residual)
        vec = np.asarray(jax.device_get(self._pseudo(self.state)), np.float32)
        # Error feedback: what the ring's codec drops of this island's vector (the same block grid: blocks start at
        # element 0), kept when the mean is applied.
        residual = jax.device_put(vec - self._codec.roundtrip(vec), self.replicated) if self.error_feedback else None
        return vec, None, residual

    def apply_mean(self, delta: Any, residual: Any) -> dict:
        """Applies the ring's mean (outer step) and, with error feedback, the residual from the payload."""
        self.state, metrics = self._apply_delta(self.state, *self._to_device(delta), residual)
        if residual is not None:
            metrics["residual_norm"] = jax.numpy.linalg.norm(residual)
        return self._block(metrics)

    def run_finished(self) -> None:
        if self.island is not None:
            self.island.client.mark_finished()

    def close(self) -> None:
        if self.island is not None:
            self.island.close()


def make_sync(cfg: Config, mesh: Mesh, setup: ModelSetup, inner_step: Callable, batch_sharding,
              params: Any = None) -> Sync:
    """The one place that chooses the mode: elastic.coordinator set -> ElasticSync; several islands in the mesh ->
    MeshSync; otherwise NoSync."""
    if cfg.elastic.coordinator:
        cls: type[Sync] = ElasticSync
    elif sh.island_count(mesh) > 1:
        cls = MeshSync
    else:
        cls = NoSync
    return cls(cfg, mesh, setup, inner_step, batch_sharding, params)


def nparams_of(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def ddp_ratio(elements: int, islands: int, inner_steps: int, sent: int) -> float | None:
    """How many times fewer bytes an outer step sent per island than data-parallel training of the same parameters
    would have: an fp32 ring all-reduce of their gradients among the same islands at every one of the H inner steps.
    None when nothing was sent (an island alone)."""
    if sent <= 0 or islands < 2:
        return None
    return collective.ring_allreduce_bytes_per_island(elements, islands) * inner_steps / sent


def _reduce_fields(stats: dict[str, Any]) -> dict[str, Any]:
    """An outer row's fields from the elastic client's stats of the reduce: bytes, members, ring order, aborts, and
    where the reduce's time went (the sync barrier, the ring's connections, its bytes, the done barrier)."""
    return {"bytes_sent_per_island": stats.get("bytes_sent", 0), "islands": len(stats.get("members", [])) or 1,
            "ring_order": stats.get("order"), "reduce_aborts": stats.get("aborts", 0),
            **{f"reduce_{k}": stats[k] for k in ("barrier_seconds", "connect_seconds", "ring_seconds",
                                                 "done_seconds") if k in stats}}


def _has_pinned_host() -> bool:
    try:
        return "pinned_host" in {m.kind for m in jax.devices()[0].addressable_memories()}
    except Exception:  # noqa: BLE001 - backends without memory-kind support
        return False


def _host_named(tree) -> dict[str, np.ndarray]:
    """A tree's leaves copied to the host, named by their key paths (jax.tree_util.keystr)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _check_names(names: list[str], arrays: dict[str, Any]) -> None:
    missing = [n for n in names if n not in arrays]
    if missing:
        raise RuntimeError(f"the peer's state lacks {missing[:3]}: is it running the same model, outer optimizer "
                           "and diloco.fragments?")


def _from_named(like, arrays: dict[str, np.ndarray], prefix: str = ""):
    """The inverse of `_host_named` (names under `prefix`): host arrays in `like`'s tree structure and shapes."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [prefix + jax.tree_util.keystr(path) for path, _ in leaves]
    _check_names(names, arrays)
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(arrays[n]).reshape(np.shape(x))
                                                  for n, (_, x) in zip(names, leaves)])


def _unravel_like(tree, vec):
    """The inverse of ravel_pytree for a tree shaped like `tree` (inside jit)."""
    return jax.flatten_util.ravel_pytree(tree)[1](vec)
