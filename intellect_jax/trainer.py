"""The training loop: one island (plain data-parallel training) or DiLoCo across the islands of the mesh.

``train(cfg)`` is what ``intellect-jax train`` calls. It builds the mesh and the sharded state, then runs jitted
inner steps; with more than one island, every ``diloco.inner_steps`` steps it runs the outer synchronisation
(pseudo-gradients -> int8 cross-island mean -> outer optimizer). Step N+1 is dispatched before step N's metrics are
pulled to the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

import jax
import jax.flatten_util
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from intellect_jax import collective, data, diloco
from intellect_jax.checkpoint import Checkpointer, CheckpointError
from intellect_jax import sharding as sh
from intellect_jax.config import Config, ConfigError
from intellect_jax.info import count_params, flops_per_token
from intellect_jax.metrics import RunLogger, device_peak_flops
from intellect_jax.state import ModelSetup, init_params, init_train_state, train_state_specs
from intellect_jax.train_step import init_state as inner_init_state
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
    """Holds the jitted functions and the live state of one run."""

    def __init__(self, cfg: Config, mesh: Mesh | None = None):
        self.cfg = cfg
        self.mesh = mesh or sh.make_mesh(cfg.mesh)
        self.num_islands = sh.island_count(self.mesh)
        self.elastic = bool(cfg.elastic.coordinator)  # islands are separate programs joined over TCP
        self._serialize = jax.default_backend() == "cpu" and len(self.mesh.devices.flat) > 1
        self.diloco = self.num_islands > 1 or self.elastic
        self.setup = ModelSetup.build(cfg.model, cfg.optim)
        inner_step = make_train_step(self.setup.graphdef, cfg.model, cfg.optim, self.setup.optimizer,
                                     sh.activation_constraint(self.mesh))
        self.batch_sharding = NamedSharding(self.mesh, sh.batch_spec(per_island=True))
        # Metrics come back replicated so that every process can read them (multi-host runs).
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        if self.diloco:
            self._build_diloco(inner_step)
        else:
            self.state, shardings = init_train_state(self.setup, cfg.model, self.mesh, cfg.run.seed,
                                                     self._imported_params())
            self.state_shardings = shardings
            squeeze = lambda b: jax.tree.map(lambda x: x[0], b)  # noqa: E731 - the island dim is 1
            self._inner = jax.jit(lambda s, b: inner_step(s, squeeze(b)),
                                  in_shardings=(shardings, self.batch_sharding), out_shardings=(shardings, self.replicated),
                                  donate_argnums=0)

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

    # -- DiLoCo -------------------------------------------------------------------------------------------------------

    def _build_diloco(self, inner_step) -> None:
        cfg, mesh, n = self.cfg, self.mesh, self.num_islands
        self.outer = diloco.make_outer_optimizer(cfg.diloco)
        global_params, _ = init_params(self.setup, cfg.model, mesh, cfg.run.seed, self._imported_params())
        inner_init = lambda p: inner_init_state(p, self.setup.optimizer)  # noqa: E731
        abstract_inner = jax.eval_shape(jax.vmap(inner_init, axis_size=n),
                                        jax.eval_shape(lambda g: diloco.broadcast_islands(g, n), global_params))
        inner_specs = train_state_specs(self.setup, mesh, abstract_inner, per_island=True)
        outer_abstract = jax.eval_shape(self.outer.init, global_params)
        gspecs = sh.param_specs(self.setup.axes, self.setup.shapes, mesh)
        outer_specs = _follow_params(self.outer, outer_abstract, gspecs)
        specs = diloco.DilocoState(inner_specs, gspecs, outer_specs, PartitionSpec())
        # Global params + outer optimizer state live in pinned host memory between syncs where the backend has
        # memory kinds (as PRIME kept them on the CPU); every jitted function below moves them in and out.
        device_sh = sh.named(mesh, specs)
        self.host_offload = cfg.diloco.outer_state_on_host and _has_pinned_host()
        if self.host_offload:
            host = lambda t: jax.tree.map(lambda x: x.with_memory_kind("pinned_host"), t)  # noqa: E731
            self.state_shardings = device_sh._replace(global_params=host(device_sh.global_params),
                                                      outer_opt_state=host(device_sh.outer_opt_state))
            log.info("global params and outer optimizer state are kept in pinned host memory between syncs")
        else:
            self.state_shardings = device_sh
            if cfg.diloco.outer_state_on_host:
                log.info("the %s backend has no pinned_host memory: the outer state stays in device memory",
                         jax.default_backend())

        def on_device(s: diloco.DilocoState) -> diloco.DilocoState:
            if not self.host_offload:
                return s
            return s._replace(global_params=jax.device_put(s.global_params, device_sh.global_params),
                              outer_opt_state=jax.device_put(s.outer_opt_state, device_sh.outer_opt_state))

        self.state = jax.jit(lambda g: diloco.init_state(g, inner_init, self.outer, n),
                             out_shardings=self.state_shardings)(global_params)
        del global_params  # now inside the state
        reduce_mean = collective.make_island_mean(mesh, inner_specs.params, compression=cfg.diloco.compression,
                                                  block_size=cfg.diloco.block_size)
        inner_sh = self.state_shardings.inner
        full = self.state_shardings
        self._inner = jax.jit(diloco.island_inner_step(inner_step), in_shardings=(inner_sh, self.batch_sharding),
                              out_shardings=(inner_sh, self.replicated), donate_argnums=0)
        self._sync = jax.jit(lambda s: diloco.outer_update(on_device(s), reduce_mean, self.outer),
                             in_shardings=(full,), out_shardings=(full, self.replicated), donate_argnums=0)
        # Elastic mode: the pseudo-gradient leaves as one flat fp32 vector and the mean comes back the same way.
        flat0 = lambda s: jax.flatten_util.ravel_pytree(jax.tree.map(  # noqa: E731
            lambda x: x[0], diloco.pseudo_gradients(on_device(s).global_params, s.inner.params)))[0]
        self._pseudo_vec = jax.jit(flat0, in_shardings=(full,), out_shardings=self.replicated)
        self._apply_delta = jax.jit(
            lambda s, vec: diloco.apply_outer(on_device(s), _unravel_like(s.global_params, vec), self.outer),
            in_shardings=(full, self.replicated), out_shardings=(full, self.replicated), donate_argnums=0)
        self._install = jax.jit(
            lambda g, o, outer_step, step: diloco.DilocoState(
                jax.vmap(lambda p: inner_init(p)._replace(step=step), axis_size=n)(diloco.broadcast_islands(g, n)),
                g, o, outer_step),
            in_shardings=(device_sh.global_params, device_sh.outer_opt_state, None, None), out_shardings=full)
        self._device_shardings = device_sh
        nparams = count_params(cfg.model).total_params
        self.wire_bytes = collective.wire_bytes_per_island(nparams, max(n, 2) if self.elastic else n,
                                                           cfg.diloco.compression, cfg.diloco.block_size)
        # Data-parallel training all-reduces fp32 gradients every inner step: H of them per outer step.
        ddp = collective.ring_allreduce_bytes_per_island(nparams, n) * cfg.diloco.inner_steps
        self.wire_ratio_vs_ddp = ddp / self.wire_bytes if self.wire_bytes else float("inf")

    # -- steps --------------------------------------------------------------------------------------------------------

    def compile(self) -> None:
        """Compiles the inner step (and the in-program sync) ahead of time, so the first step is not a stall."""
        t0 = time.perf_counter()
        shape = (self.num_islands, self.cfg.data.batch_size, self.cfg.data.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_mask" else np.int32,
                                         sharding=self.batch_sharding) for k in data.BATCH_KEYS}
        self._inner = self._inner.lower(self.state.inner if self.diloco else self.state, batch).compile()
        if self.diloco and not self.elastic:
            self._sync = self._sync.lower(self.state).compile()
        log.info("compiled the training step in %.1fs", time.perf_counter() - t0)

    def inner_step(self, batch) -> dict:
        if self.diloco:
            inner, metrics = self._inner(self.state.inner, batch)
            self.state = self.state._replace(inner=inner)
        else:
            self.state, metrics = self._inner(self.state, batch)
        return self._maybe_block(metrics)

    def sync(self) -> dict:
        self.state, metrics = self._sync(self.state)
        return self._maybe_block(metrics)

    def _maybe_block(self, out):
        # Simulated CPU devices: two programs with collectives in flight at once can deadlock XLA:CPU's
        # rendezvous (seen intermittently on a loaded 2-core machine), so CPU runs execute one program at a time.
        # Accelerators keep asynchronous dispatch (step N+1 is queued before step N's metrics are read).
        if self._serialize:
            jax.block_until_ready((self.state, out))
        return out

    # -- elastic mode (island.py drives these) -----------------------------------------------------------------------

    def pseudo_gradient_vector(self) -> np.ndarray:
        return np.asarray(jax.device_get(self._pseudo_vec(self.state)), np.float32)

    def apply_delta_vector(self, delta: np.ndarray) -> dict:
        self.state, metrics = self._apply_delta(self.state, jax.device_put(delta, self.replicated))
        return self._maybe_block(metrics)

    def install_global(self, global_params, outer_opt_state, outer_step: int, step: int) -> None:
        self.state = self._install(global_params, outer_opt_state, jax.numpy.int32(outer_step),
                                   jax.numpy.int32(step))

    # -- checkpoints --------------------------------------------------------------------------------------------------

    def checkpoint_arrays(self) -> dict[str, Any]:
        if not self.diloco:
            return {"train": self.state}
        s = self.state
        return {"inner": s.inner,
                "outer": {"global_params": s.global_params, "outer_opt_state": s.outer_opt_state,
                          "outer_step": s.outer_step}}

    def meta(self, step: int) -> dict[str, Any]:
        return {"step": step, "islands": self.num_islands, "mesh": dict(self.mesh.shape),
                "outer_step": int(self.state.outer_step) if self.diloco else 0, "mode": self._mode()}

    def _mode(self) -> str:
        return "diloco" if self.diloco else "single"

    def restore(self, ckpt: Checkpointer, step: int) -> dict[str, Any]:
        """Loads checkpoint `step` into this trainer's mesh. Returns its JSON items (meta, data, config).

        The same island count restores everything (resharded to the current inner mesh if it changed). Another
        island count keeps the global params and the outer optimizer state and re-initialises every island's inner
        state from the global params (logged).
        """
        meta = ckpt.read_json(step, "meta")
        if meta["mode"] != self._mode():
            raise CheckpointError(
                f"checkpoint step {step} was written by a {meta['mode']} run ({meta['islands']} island(s)) and this "
                f"run is {self._mode()} ({self.num_islands} island(s)); resume with mesh.islands "
                f"{'> 1' if meta['mode'] == 'diloco' else '= 1'} or start a new --run.dir")
        abstract = jax.tree.map(lambda x, sh_: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh_),
                                self.checkpoint_arrays(), self._array_shardings())
        if not self.diloco:
            out = ckpt.restore(step, abstract)
            self.state = out["train"]
            return out
        if meta["islands"] == self.num_islands:
            out = ckpt.restore(step, abstract)
            inner = out["inner"]
        else:
            out = ckpt.restore(step, {"outer": abstract["outer"]})
            log.info("checkpoint step %d has %d islands and this run has %d: restored the global params and outer "
                     "optimizer state; every island's inner state (AdamW moments) is re-initialised from the global "
                     "params", step, meta["islands"], self.num_islands)
            o = out["outer"]
            self.install_global(o["global_params"], o["outer_opt_state"], int(o["outer_step"]), meta["step"])
            return out
        o = out["outer"]
        self.state = jax.device_put(diloco.DilocoState(inner, o["global_params"], o["outer_opt_state"],
                                                       o["outer_step"]), self.state_shardings)
        return out

    def _array_shardings(self) -> dict[str, Any]:
        if not self.diloco:
            return {"train": self.state_shardings}
        s = self._device_shardings  # restored into device memory, then placed (see restore)
        return {"inner": s.inner, "outer": {"global_params": s.global_params, "outer_opt_state": s.outer_opt_state,
                                            "outer_step": s.outer_step}}

    def global_params(self):
        return self.state.global_params if self.diloco else self.state.params

    def make_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        shape = (self.num_islands, self.cfg.data.batch_size, self.cfg.data.seq_len)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, shape)
                for k, v in host_batch.items()}


def _has_pinned_host() -> bool:
    try:
        return "pinned_host" in {m.kind for m in jax.devices()[0].addressable_memories()}
    except Exception:  # noqa: BLE001 - backends without memory-kind support
        return False


def _unravel_like(tree, vec):
    """The inverse of ravel_pytree for a tree shaped like `tree` (inside jit)."""
    return jax.flatten_util.ravel_pytree(tree)[1](vec)


def _follow_params(opt, abstract_state, param_specs):
    """Optimizer-state specs: param-shaped leaves follow their params, everything else is replicated."""
    return __import__("optax").tree_map_params(
        opt, lambda _, s: s, abstract_state, param_specs,
        transform_non_params=lambda x: PartitionSpec(*([None] * x.ndim)),
        is_leaf=lambda x: isinstance(x, PartitionSpec))


def _summarise(metrics: dict, num_islands: int) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        if v.ndim:  # one value per island
            out[k] = float(v.sum() if k == "tokens" else v.mean())
            if k == "loss" and num_islands > 1:
                out["loss_per_island"] = [float(x) for x in v]
        else:
            out[k] = float(v)
    return out


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


def _gather_data_state(state: dict) -> dict:
    """The data iterator states of all processes merged into one (each process holds its own slots)."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    states = [json.loads(bytes(b[:k]).decode()) for b, k in zip(blobs, sizes)]
    return data.merge_states(states)


def _check_compatible(saved: dict, cfg: Config, step: int) -> None:
    """A resumed run must train the same model; mesh, islands, steps and most hyper-parameters may change."""
    now = dataclasses.asdict(cfg)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "param_dtype"):
        if saved["model"][key] != now["model"][key]:
            raise CheckpointError(
                f"the checkpoint at step {step} has model.{key}={saved['model'][key]!r} but the config says "
                f"{now['model'][key]!r}; resume with the original model settings or start a new --run.dir")


def train(cfg: Config) -> dict[str, Any]:
    """Runs `cfg` to completion (resuming from the run directory's checkpoint if there is one); returns a summary.

    SIGINT/SIGTERM stop the run after the current step with a checkpoint (resumable, also mid-outer-step).
    """
    run_dir = cfg.run.resolved_dir.expanduser()
    primary = jax.process_index() == 0
    setup_logging(run_dir, primary)
    devices = jax.devices()
    log.info("jax %s: %d process(es), %d %s device(s) (%s); run dir %s", jax.__version__, jax.process_count(),
             len(devices), jax.default_backend(), devices[0].device_kind, run_dir)
    trainer = Trainer(cfg)
    mesh_txt = ", ".join(f"{k}={v}" for k, v in trainer.mesh.shape.items())
    n = trainer.num_islands
    info = count_params(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len, info.total_params)
    peak = device_peak_flops(devices[0].device_kind)
    log.info("model %.2fM params; mesh %s; %s", info.total_params / 1e6, mesh_txt,
             f"elastic island {cfg.elastic.data_shard} of a run coordinated at {cfg.elastic.coordinator}, "
             f"H={cfg.diloco.inner_steps}, {cfg.diloco.compression} ring all-reduce over TCP" if trainer.elastic else
             f"DiLoCo over {n} islands, H={cfg.diloco.inner_steps}, {cfg.diloco.compression} reduce, "
             f"{trainer.wire_bytes / 1e6:.2f} MB sent per island per outer step "
             f"({trainer.wire_ratio_vs_ddp:.0f}x less than data-parallel fp32)" if trainer.diloco else "one island")

    loader = _make_loader(cfg, trainer)
    H = cfg.diloco.inner_steps
    save_every = cfg.checkpoint.every_outer_steps * H  # inner steps; single island: K * H steps too
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    start = 0
    resume = cfg.checkpoint.resume_step if cfg.checkpoint.resume_step >= 0 else ckpt.latest_step()
    if resume is not None:
        saved = ckpt.read_json(resume, "config")
        _check_compatible(saved, cfg, resume)
        items = trainer.restore(ckpt, resume)
        start = items["meta"]["step"]
        if items["meta"]["islands"] == n:
            loader.set_state(items["data"])
        else:
            log.warning("the data streams restart: the checkpoint's data state is laid out for %d islands and this "
                        "run has %d", items["meta"]["islands"], n)
        log.info("resumed from checkpoint step %d (outer step %d) in %s", start, items["meta"]["outer_step"],
                 ckpt.dir)
    if primary:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def save(step: int) -> None:
        ckpt.save(step, trainer.checkpoint_arrays(),
                  {"data": _gather_data_state(loader.get_state()), "meta": trainer.meta(step),
                   "config": dataclasses.asdict(cfg)})
        log.info("checkpoint step %d saving (async) to %s", step, ckpt.dir)

    trainer.compile()  # before joining: a joiner must not fetch the run's state and then spend minutes compiling
    island = None
    if trainer.elastic:
        from intellect_jax.island import ElasticIsland

        island = ElasticIsland(cfg, trainer)
        island.join()
        if int(trainer.state.outer_step) * H > start:
            start = int(trainer.state.outer_step) * H  # a peer's state put this island ahead of its checkpoint
    total = cfg.total_inner_steps
    logger = RunLogger(run_dir, total_steps=total, start_step=start, enabled=primary,
                       wandb_project=cfg.run.wandb_project, run_name=cfg.run.name, config=dataclasses.asdict(cfg))
    tokens_per_step = n * cfg.data.batch_size * cfg.data.seq_len
    first_loss = last_loss = None
    pending: tuple[int, dict] | None = None
    t_start = t_last = t_outer = time.perf_counter()
    compute_s = 0.0  # time in inner steps (what utilization counts as useful)

    def flush(step: int, metrics: dict) -> None:
        nonlocal first_loss, last_loss, t_last, compute_s
        m = _summarise(jax.device_get(metrics), n)
        now = time.perf_counter()
        dt = now - t_last
        t_last = now
        compute_s += dt
        m.update(step=step + 1, step_seconds=dt, tokens_per_s=tokens_per_step / dt if dt > 0 else 0.0,
                 islands=n)
        if peak:
            m["mfu"] = fpt * m["tokens_per_s"] / (peak * len(devices))
        first_loss = m["loss"] if first_loss is None else first_loss
        last_loss = m["loss"]
        logger.write({"kind": "inner", **m})
        if not logger.interactive and ((step + 1) % cfg.run.log_every == 0 or step == start or step + 1 == total):
            log.info("step %d/%d loss %.4f z %.3g gnorm %.3f lr %.3g %.0f tok/s", step + 1, total, m["loss"],
                     m["z_loss"], m["grad_norm"], m["lr"], m["tokens_per_s"])

    last_saved = start
    stopped_at = None
    try:
        with StopRequest() as stop:
            step = start - 1
            while step + 1 < total:
                step += 1
                metrics = trainer.inner_step(trainer.make_batch(next(loader)))
                if pending is not None:
                    flush(*pending)
                pending = (step, metrics)
                boundary = (step + 1) % H == 0
                if trainer.diloco and boundary:
                    flush(*pending)
                    pending = None
                    t0 = time.perf_counter()
                    extra = {}
                    if island is not None:
                        sync_metrics, extra["params_hash"] = island.sync()
                        stats = island.client.last_stats
                        extra.update(bytes_sent_per_island=stats.get("bytes_sent", 0),
                                     islands=len(stats.get("members", [])) or 1, ring_order=stats.get("order"),
                                     reduce_aborts=stats.get("aborts", 0))
                        sync_metrics = jax.device_get(sync_metrics)
                    else:
                        sync_metrics = jax.device_get(trainer.sync())
                    sync_s = time.perf_counter() - t0
                    t_last += sync_s  # keep the sync out of the next step's time
                    wall = time.perf_counter() - t_outer
                    t_outer = time.perf_counter()
                    outer = int(trainer.state.outer_step)
                    logger.write({"kind": "outer", "outer_step": outer, "step": step + 1, "sync_seconds": sync_s,
                                  "outer_wall_seconds": wall,
                                  "compute_utilization": (wall - sync_s) / wall if wall > 0 else 1.0,
                                  "bytes_sent_per_island": trainer.wire_bytes,
                                  "wire_ratio_vs_ddp": trainer.wire_ratio_vs_ddp, "islands": n,
                                  **_summarise(sync_metrics, n), **extra})
                    log.info("outer step %d: synced %d islands in %.2fs, |delta| %.4g%s", outer,
                             extra.get("islands", n), sync_s, float(np.asarray(sync_metrics.get("delta_norm", 0.0))),
                             f", global hash {extra['params_hash'][:12]}" if "params_hash" in extra else "")
                if save_every and boundary and (step + 1) % save_every == 0:
                    save(step + 1)
                    last_saved = step + 1
                if island is not None and boundary and int(trainer.state.outer_step) * H > step + 1:
                    # re-synced from a peer that was ahead: continue from the run's position
                    step = int(trainer.state.outer_step) * H - 1
                    last_saved = min(last_saved, step + 1)
                if stop.agreed():
                    stopped_at = step + 1
                    break
            if pending is not None:
                flush(*pending)
            if stopped_at is not None:
                if stopped_at != last_saved:
                    save(stopped_at)  # mid-outer-step is fine: the state holds everything needed to continue
                log.info("stopped by signal at step %d; resume with the same command", stopped_at)
            elif stopped_at is None and total > last_saved and (not trainer.diloco or total % H == 0):
                save(total)  # the final state (DiLoCo: only on an outer-step boundary)
            ckpt.wait()
    finally:
        if island is not None:
            island.close()
        loader.close()
        logger.close()
        ckpt.close()
    elapsed = time.perf_counter() - t_start
    end = stopped_at or total
    done = max(end - start, 1)
    summary = {"steps": end, "first_loss": first_loss, "last_loss": last_loss, "seconds": elapsed,
               "tokens_per_s": done * tokens_per_step / elapsed, "run_dir": str(run_dir),
               "compute_utilization": compute_s / elapsed if elapsed > 0 else 1.0, "stopped": stopped_at is not None,
               "final_params": trainer.global_params()}
    log.info("done: steps %d-%d in %.1fs, loss %s -> %s", start, end, elapsed, first_loss, last_loss)
    return summary


def _make_loader(cfg: Config, trainer: "Trainer"):
    """This process's data: its (island, row) block of the global batch; an elastic island reads its data shard."""
    data.ensure_prepared(cfg.data)
    n = trainer.num_islands
    islands, rows = local_rows(trainer.batch_sharding, (n, cfg.data.batch_size, cfg.data.seq_len))
    if trainer.elastic:
        return data.make_iterator(cfg.data, vocab_size=cfg.model.vocab_size, num_islands=cfg.elastic.data_shards,
                                  islands=[cfg.elastic.data_shard], row_start=rows.start, row_stop=rows.stop)
    return data.make_iterator(cfg.data, vocab_size=cfg.model.vocab_size, num_islands=n,
                              islands=list(range(n))[islands], row_start=rows.start, row_stop=rows.stop)


def init_run_from_hf(cfg: Config) -> int:
    """`intellect-jax import-hf`: a run directory whose step-0 checkpoint holds a Hugging Face model's weights.

    `intellect-jax train` with the same config and run directory then continues pre-training from it.
    """
    run_dir = cfg.run.resolved_dir.expanduser()
    setup_logging(run_dir, jax.process_index() == 0)
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    try:
        if ckpt.latest_step() is not None:
            raise CheckpointError(f"{ckpt.dir} already holds checkpoints (latest step {ckpt.latest_step()}); "
                                  "import into a new --run.dir so nothing trained is overwritten")
        trainer = Trainer(cfg)
        loader = _make_loader(cfg, trainer)
        try:
            ckpt.save(0, trainer.checkpoint_arrays(), {"data": _gather_data_state(loader.get_state()),
                                                       "meta": trainer.meta(0), "config": dataclasses.asdict(cfg)})
            ckpt.wait()
        finally:
            loader.close()
    finally:
        ckpt.close()
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    log.info("imported %s into %s (checkpoint step 0)", cfg.run.init_from_hf, run_dir)
    return 0
