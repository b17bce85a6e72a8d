"""Run metrics: a JSONL writer (one object per line in <run dir>/metrics.jsonl), TensorBoard / W&B / progress bar,
and the training loop's metric cadence and step timing (StepLogger).

Rows have a ``kind``: ``inner`` (one per inner step), ``outer`` (one per DiLoCo outer step) and ``eval`` (the
held-out loss of the global params: ``step``, ``outer_step``, ``eval_loss``, ``eval_tokens``, ``eval_seconds``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

# Dense bf16 peak FLOP/s per device (no sparsity), for MFU.
PEAK_FLOPS = {
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "GH200": 989e12,
    "B200": 2250e12,
}


def device_peak_flops(device_kind: str) -> float | None:
    """Peak FLOP/s of a jax device_kind string such as 'NVIDIA H100 80GB HBM3'; None when unknown (e.g. CPU)."""
    kind = device_kind.upper()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return None


def to_python(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per line; flushes every write so a killed run keeps its metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **{k: to_python(v) for k, v in record.items()}}
        self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class TensorBoardWriter:
    """Scalars to TensorBoard event files (tensorboardX; no TensorFlow needed)."""

    def __init__(self, log_dir: str | Path):
        from tensorboardX import SummaryWriter

        self._w = SummaryWriter(str(log_dir), flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        prefix = record.get("kind", "train")
        for k, v in record.items():
            if k in ("step", "kind", "time") or isinstance(v, (list, str, bool)) or v is None:
                continue
            self._w.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        self._w.close()


class WandbWriter:
    """Weights & Biases, when run.wandb_project is set (optional extra `wandb`)."""

    def __init__(self, project: str, run_name: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ImportError("run.wandb_project is set but wandb is not installed; pip install 'intellect-jax[wandb]' "
                              "or leave run.wandb_project empty") from None
        self._run = wandb.init(project=project, name=run_name, config=config, resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        prefix = record.get("kind", "train")
        values = {f"{prefix}/{k}": v for k, v in record.items()
                  if k not in ("kind", "time", "step") and isinstance(v, (int, float))}
        self._run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self._run.finish()


class PrometheusWriter:
    """The rows that go to metrics.jsonl as Prometheus gauges, one per (kind, field), served at HOST:PORT/metrics:
    ``intellect_jax_inner_loss``, ``intellect_jax_outer_wait_seconds``, ``intellect_jax_eval_eval_loss``, ... (the
    latest value of each), and ``intellect_jax_step`` (the step of the last row)."""

    def __init__(self, bind: str):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        host, _, port = bind.rpartition(":")
        self.registry = CollectorRegistry(auto_describe=True)
        self._gauge, self._gauges = Gauge, {}
        self.step = Gauge("intellect_jax_step", "Inner step of the latest metrics row", registry=self.registry)
        self.server, _ = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)
        self.port = self.server.server_address[1]

    def write(self, record: dict[str, Any]) -> None:
        kind = str(record.get("kind", "train"))
        if "step" in record:
            self.step.set(float(record["step"]))
        for k, v in record.items():
            if k in ("kind", "time", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            name = re.sub(r"[^a-zA-Z0-9_]", "_", f"intellect_jax_{kind}_{k}")
            g = self._gauges.get(name)
            if g is None:
                g = self._gauges[name] = self._gauge(name, f"{k} of the latest {kind} row of metrics.jsonl",
                                                     registry=self.registry)
            g.set(float(v))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RunLogger:
    """Where a run's metrics go: metrics.jsonl, TensorBoard (<run dir>/tensorboard), a progress bar or log lines.

    Only the primary process writes; the others hold a logger that drops everything.
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool | None = None, tensorboard: bool = True, wandb_project: str = "",
                 run_name: str = "", config: dict[str, Any] | None = None, metrics_http: str = ""):
        import sys

        self.enabled = enabled
        self.writers: list[Any] = []
        self.bar = None
        self.eval_loss: float | None = None  # the latest held-out loss, shown on the progress bar
        if not enabled:
            return
        self.writers.append(MetricsWriter(Path(run_dir) / "metrics.jsonl"))
        if tensorboard:
            try:
                self.writers.append(TensorBoardWriter(Path(run_dir) / "tensorboard"))
            except ImportError:
                import logging

                logging.getLogger(__name__).warning("tensorboardX is not installed: no TensorBoard event files")
        if wandb_project:
            self.writers.append(WandbWriter(wandb_project, run_name, config or {}))
        if metrics_http:  # the same rows as metrics.jsonl, no second source of truth
            self.writers.append(PrometheusWriter(metrics_http))
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    @property
    def interactive(self) -> bool:
        return self.bar is not None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for w in self.writers:
            w.write(record)
        if record.get("kind") == "eval":
            self.eval_loss = record["eval_loss"]
        if self.bar is not None and record.get("kind") == "inner":
            self.bar.update(int(record["step"]) - self.bar.n)
            extra = {} if self.eval_loss is None else {"eval": f"{self.eval_loss:.4f}"}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", **extra)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.bar is not None:
            self.bar.close()


def summarise(metrics: dict[str, Any], num_islands: int) -> dict[str, Any]:
    """Host metrics of one step: per-island values become their mean (tokens: their sum), plus the islands' losses."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        if v.ndim:  # one value per island
            out[k] = float(v.sum() if k == "tokens" else v.mean())
            if k == "loss" and num_islands > 1:
                out["loss_per_island"] = [float(x) for x in v]
        else:
            out[k] = float(v)
    return out


class StepLogger:
    """The loop's metric cadence and step timing, on top of a RunLogger.

    Step N's metrics are pulled to the host only after step N+1 has been dispatched (`pipelined`), so the host never
    stalls the device queue; a step's time is the interval between consecutive pulls, which in steady state is the
    device time of one step. Where the backend runs one program at a time (``pipelined=False``, simulated CPU
    devices) each step is written as soon as it returns. An outer step (``outer``) or an evaluation (``eval``) tells
    when the inner steps had finished, so neither the sync's time nor the evaluation's is counted as a step's.
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int, tokens_per_step: int,
                 num_islands: int, log_every: int, pipelined: bool, flops_per_token: float = 0.0,
                 peak_flops: float | None = None, enabled: bool = True, **writer_options: Any):
        self.out = RunLogger(run_dir, total_steps=total_steps, start_step=start_step, enabled=enabled,
                             **writer_options)
        self.total, self.start, self.log_every = total_steps, start_step, log_every
        self.tokens_per_step, self.num_islands, self.pipelined = tokens_per_step, num_islands, pipelined
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._pending: tuple[int, Any] | None = None
        self.t_start = self._t_last = time.perf_counter()
        self.compute_s = 0.0  # time in inner steps (what utilization counts as useful)
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.eval_loss: float | None = None  # the latest held-out loss

    def maybe_flush(self, step: int, metrics: Any) -> None:
        """Called once `step` (0-based) is dispatched: writes the previous step's metrics (or this one's when not
        pipelined)."""
        if self._pending is not None:
            self._write(*self._pending)
        self._pending = (step, metrics)
        if not self.pipelined:
            self._write(step, metrics)
            self._pending = None

    def outer(self, record: dict[str, Any], ready_at: float) -> None:
        """An outer step's record; the inner steps before it had finished at `ready_at`."""
        self._between_steps(record, ready_at)

    def eval(self, record: dict[str, Any], ready_at: float) -> None:
        """An evaluation's record (kind "eval"); the inner steps before it had finished at `ready_at`."""
        self._between_steps(record, ready_at)
        self.eval_loss = record["eval_loss"]
        logging.getLogger("intellect_jax").info(
            "eval at step %d (outer step %d): held-out loss %.4f on %d tokens (%.2fs)", record["step"],
            record["outer_step"], record["eval_loss"], record["eval_tokens"], record["eval_seconds"])

    @contextlib.contextmanager
    def paused(self):
        """Host work between steps (a checkpoint save): the step in flight is written once it has finished, and
        the time inside the block is nobody's step time."""
        self.flush()
        try:
            yield
        finally:
            self._t_last = time.perf_counter()

    def _between_steps(self, record: dict[str, Any], ready_at: float) -> None:
        """Writes `record`; the time from `ready_at` to now is nobody's step time."""
        if self._pending is not None:
            self._write(*self._pending, end=ready_at)
            self._pending = None
        self.out.write(record)
        self._t_last = time.perf_counter()

    def flush(self) -> None:
        if self._pending is not None:
            self._write(*self._pending)
            self._pending = None

    def _write(self, step: int, metrics: Any, *, end: float | None = None) -> None:
        """`end`: when the step had finished (default: now, once its metrics have reached the host)."""
        import jax

        m = summarise(jax.device_get(metrics), self.num_islands)
        end = time.perf_counter() if end is None else end
        dt = max(end - self._t_last, 0.0)
        self._t_last = max(end, self._t_last)
        self.compute_s += dt
        # process_cpu_seconds: CPU time this process has used so far, all threads (the host's share of a step:
        # data loading, the ring, hashing, next to the compute on CPU backends)
        m.update(step=step + 1, step_seconds=dt, tokens_per_s=self.tokens_per_step / dt if dt > 0 else 0.0,
                 islands=self.num_islands, process_cpu_seconds=time.process_time())
        if self.peak_flops:
            m["mfu"] = self.flops_per_token * m["tokens_per_s"] / self.peak_flops
        self.first_loss = m["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = m["loss"]
        self.out.write({"kind": "inner", **m})
        if not self.out.interactive and ((step + 1) % self.log_every == 0 or step == self.start
                                         or step + 1 == self.total):
            logging.getLogger("intellect_jax").info(
                "step %d/%d loss %.4f z %.3g gnorm %.3f lr %.3g %.0f tok/s", step + 1, self.total, m["loss"],
                m["z_loss"], m["grad_norm"], m["lr"], m["tokens_per_s"])

    def summary(self, end_step: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t_start
        done = max(end_step - self.start, 1)
        return {"steps": end_step, "first_loss": self.first_loss, "last_loss": self.last_loss,
                "eval_loss": self.eval_loss, "seconds": elapsed,
                "tokens_per_s": done * self.tokens_per_step / elapsed,
                "compute_utilization": self.compute_s / elapsed if elapsed > 0 else 1.0}

    def close(self) -> None:
        self.out.close()
