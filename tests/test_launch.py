"""Multi-process runs, metrics JSONL + plots, SIGTERM -> checkpoint -> resume (real processes)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from intellect_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/debug.toml", "--data.kind=synthetic", "--data.seq_len=32", "--model.vocab_size=256",
        "--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_hidden_layers=2",
        "--diloco.inner_steps=3", "--checkpoint.every_outer_steps=1", "--mesh.islands=2", "--mesh.fsdp=4"]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the command sets its own device count
    return env


def _train(run_dir, *extra, timeout=300):
    r = subprocess.run([sys.executable, "-m", "intellect_jax", "train", *TINY, f"--run.dir={run_dir}", *extra],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _inner(run_dir):
    return [m for m in read_metrics(Path(run_dir) / "metrics.jsonl") if m["kind"] == "inner"]


def test_two_process_run_matches_one_process(tmp_path):
    _train(tmp_path / "one", "--run.steps=6")
    r = subprocess.run([sys.executable, "launch/local.py", "--nproc", "2", "--devices-per-process", "4", "--",
                        "train", *TINY, f"--run.dir={tmp_path / 'two'}", "--run.steps=6"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es), 8 cpu device(s)" in (tmp_path / "two" / "train.process1.log").read_text()
    one = [m["loss"] for m in _inner(tmp_path / "one")]
    two = [m["loss"] for m in _inner(tmp_path / "two")]
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    # checkpoints written by both processes restore as one
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_metrics_jsonl_fields_and_plots(tmp_path):
    run = tmp_path / "run"
    _train(run, "--run.steps=6")
    records = read_metrics(run / "metrics.jsonl")
    inner = [r for r in records if r["kind"] == "inner"]
    outer = [r for r in records if r["kind"] == "outer"]
    assert [r["step"] for r in inner] == list(range(1, 7)) and len(outer) == 2
    for r in inner:
        for k in ("loss", "z_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_seconds", "islands"):
            assert k in r, k
        assert 0 < r["loss"] < 10 and r["z_loss"] >= 0 and r["lr"] > 0 and r["grad_norm"] > 0
        assert r["tokens"] == 2 * 8 * 32 and r["tokens_per_s"] > 0 and r["islands"] == 2
        assert len(r["loss_per_island"]) == 2
        assert "mfu" not in r  # no peak FLOPs for a CPU
    for r in outer:
        for k in ("sync_seconds", "bytes_sent_per_island", "wire_ratio_vs_ddp", "compute_utilization", "islands",
                  "outer_step"):
            assert k in r, k
        assert 0 < r["compute_utilization"] <= 1 and r["sync_seconds"] > 0
        assert r["wire_ratio_vs_ddp"] > 3 * 0.9  # int8 at H=3 vs fp32 every step: ~4 x 3 / 1.016
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    r = subprocess.run([sys.executable, "-m", "intellect_jax", "plot", "--run-dir", str(run)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pngs = sorted((run / "plots").glob("*.png"))
    assert {p.name for p in pngs} == {"loss.png", "throughput.png", "sync.png", "utilization.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_sigterm_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "intellect_jax", "train", *TINY, f"--run.dir={run}",
                             "--run.steps=200"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out and "stopped by signal at step" in out
    stopped = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert 4 <= stopped < 200
    ckpts = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == stopped
    r = _train(run, f"--run.steps={stopped + 4}")
    assert f"resumed from checkpoint step {stopped}" in r.stderr
    steps = [m["step"] for m in _inner(run)]
    assert steps[-4:] == list(range(stopped + 1, stopped + 5))
