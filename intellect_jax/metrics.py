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
