"""Run metrics: a JSONL writer (one object per line in <run dir>/metrics.jsonl) and throughput arithmetic."""

from __future__ import annotations

import json
import math
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


class RunLogger:
    """Where a run's metrics go: metrics.jsonl, TensorBoard (<run dir>/tensorboard), a progress bar or log lines.

    Only the primary process writes; the others hold a logger that drops everything.
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool | None = None, tensorboard: bool = True, wandb_project: str = "",
                 run_name: str = "", config: dict[str, Any] | None = None):
        import sys

        self.enabled = enabled
        self.writers: list[Any] = []
        self.bar = None
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
        if self.bar is not None and record.get("kind") == "inner":
            self.bar.update(int(record["step"]) - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.bar is not None:
            self.bar.close()
