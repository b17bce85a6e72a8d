"""Held-out evaluation during training: the loss of the run's global parameters on a fixed evaluation set.

What is scored. ``sync.global_params()``: one island's params, or DiLoCo's global params, which change only at an
outer step. So an evaluation runs at the first outer-step boundary (``sync.at_boundary``) at or after every multiple
of ``run.eval_every`` inner steps, and at the end of the run (a run that ends mid-outer-step scores the global params
of its last outer step, unless they were scored already). One island: exactly every ``run.eval_every`` steps.

On what. ``data.make_eval_set``: ``data.eval_batches`` batches of ``batch_size x seq_len`` tokens packed from every
``data.eval_holdout_every``-th document of each source, which the training streams skip whenever evaluation is on
(``data.make_iterator(..., hold_out=True)``). The set is built on every process from the config alone, so every
process, process layout and island count scores the same tokens.

How. Mean token cross-entropy (no z-loss) over the whole set, one jitted program per batch with the params'
own shardings: a batch's rows are split over the ``data`` x ``fsdp`` axes as a training batch's are, in
``optim.grad_accum_steps`` micro-batches (the training step's activation memory), and every island computes the same
rows. DiLoCo keeps the global params in pinned host memory where it can; the program moves them onto the devices for
its duration, as the outer step does.

The loop calls ``evaluator.maybe(step, report=logger.eval)`` after every inner step; the report says when the inner
steps had finished, so that the evaluation's time is nobody's step time (``StepLogger.eval``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from intellect_jax import data
from intellect_jax import sharding as sh
from intellect_jax.config import Config
from intellect_jax.train_step import make_loss_fn

log = logging.getLogger("intellect_jax")

Report = Callable[[dict[str, Any], float], None]  # (eval record, time.perf_counter() when the inner steps had finished)


class Evaluator:
    """The evaluation schedule and program of one run; ``run.eval_every = 0`` makes every call a no-op."""

    def __init__(self, cfg: Config, trainer: Any, start: int):
        """`trainer`: a trainer.Trainer (mesh, model setup, sync); `start`: the step the run starts (or resumes)
        from. Builds the evaluation set and compiles the program (when evaluation is on)."""
        self.every, self.total = cfg.run.eval_every, cfg.total_inner_steps
        self.sync = trainer.sync
        self.last, self._last_outer = start, None
        self._due = (start // self.every + 1) * self.every if self.every else 0
        if not self.every:
            return
        if not self.sync.at_boundary(self.every):
            log.info("run.eval_every=%d is not a multiple of diloco.inner_steps=%d: each evaluation waits for the "
                     "next outer step, where the global params change", self.every, cfg.diloco.inner_steps)
        self.batches = data.make_eval_set(cfg.data, vocab_size=cfg.model.vocab_size)
        self.batch_sharding = NamedSharding(trainer.mesh, sh.batch_spec())
        params = self.sync.global_params()
        on_device = jax.tree.map(lambda x: x.sharding.with_memory_kind("device"), params)
        loss_fn = make_loss_fn(trainer.setup.graphdef, 0.0, sh.activation_constraint(trainer.mesh))
        accum = cfg.optim.grad_accum_steps

        def sums(params, batch):
            """(sum of token cross-entropies, tokens) of one batch, in `accum` micro-batches."""
            params = jax.device_put(params, on_device)  # a no-op where they live on the devices already
            micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
            ce = jax.lax.map(lambda mb: loss_fn(params, mb)[1][0], micro)
            return ce.sum(), batch["loss_mask"].sum()

        replicated = NamedSharding(trainer.mesh, PartitionSpec())
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
                 for k, v in self.batches[0].items()}
        t0 = time.perf_counter()
        self._sums = jax.jit(sums, out_shardings=(replicated, replicated)).lower(abstract, batch).compile()
        log.info("evaluation every %d steps on %d held-out batches (%d tokens); compiled in %.1fs", self.every,
                 len(self.batches), sum(int(b["loss_mask"].sum()) for b in self.batches), time.perf_counter() - t0)

    def maybe(self, step: int, report: Report) -> None:
        """Called after every inner step with the steps done: evaluates when the schedule says so and hands the
        record (kind "eval") to `report`."""
        if not self.every or step == self.last:
            return
        end = step >= self.total
        if not end and not (step >= self._due and self.sync.at_boundary(step)):
            return
        outer = self.sync.outer_step()
        if end and not self.sync.at_boundary(step) and outer == self._last_outer:
            return  # the run ends mid-outer-step and its global params were scored already
        jax.block_until_ready(self.sync.state)  # the inner steps are done: the evaluation's time starts here
        ready_at = time.perf_counter()
        loss, tokens = self.evaluate(self.sync.global_params())
        report({"kind": "eval", "step": step, "outer_step": outer, "eval_loss": loss, "eval_tokens": tokens,
                "eval_seconds": time.perf_counter() - ready_at}, ready_at)
        self.last, self._last_outer = step, outer
        self._due = (step // self.every + 1) * self.every

    def evaluate(self, params: Any) -> tuple[float, int]:
        """(mean token cross-entropy, tokens) of `params` (laid out like sync.global_params()) on the set."""
        out = []
        for b in self.batches:
            batch = {k: jax.make_array_from_callback(v.shape, self.batch_sharding, lambda idx, v=v: v[idx])
                     for k, v in b.items()}
            out.append(self._sums(params, batch))
            if self.sync.serialized:  # simulated CPU devices: one program with collectives at a time (see sync.py)
                jax.block_until_ready(out[-1])
        sums = np.asarray(jax.device_get(out), np.float64)  # [batches, 2]: summed on the host in float64
        ce, tokens = sums.sum(axis=0)
        return float(ce / tokens), int(tokens)
