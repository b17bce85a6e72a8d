"""Throughput / MFU of the inner training step per preset on the hardware present.

    python benchmarks/throughput.py                       # CPU default: debug preset + 150m at a tiny batch
    python benchmarks/throughput.py --preset configs/1b.toml --steps 10 \\
        --set data.batch_size=8 --set model.attention_impl=cudnn   # one H100 (1B preset, cuDNN attention)

Each preset runs in its own subprocess (the simulated CPU device count is per process), builds the real
``Trainer`` with the preset's mesh, compiles, runs one warm-up step and then times ``--steps`` inner steps on a fixed
batch of random tokens (data loading is benchmarked by data_throughput.py; DiLoCo syncs are not included).

tokens/s = islands x batch x seq_len / median step time. MFU = (6 N + 12 L H Q T) x tokens/s / (peak x devices)
(info.flops_per_token; PaLM appendix B) where ``metrics.device_peak_flops`` knows the device (dense bf16 peak); on
CPU it is n/a. References for a GPU run: INTELLECT-1 43.3% MFU with no communication (INTELLECT-1 technical report,
Jaghouar et al. 2024, arXiv 2412.01152), MaxText ~50% (as quoted in issue 8).

On CPU the presets that cannot finish a step in reasonable time are skipped, with the reason computed from their
FLOPs per step at the CPU's measured FLOP rate and from info.memory_estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

CONFIGS = common.ROOT / "configs"
# CPU defaults: (preset, overrides). 150m at a tiny batch on one device: it fits in memory, not in time at its batch.
CPU_DEFAULT = [("debug.toml", []),
               ("150m.toml", ["data.batch_size=1", "data.seq_len=256", "model.compute_dtype=float32"])]
CPU_SKIPPED = ["1b.toml", "intellect1-10b.toml"]
CPU_STEP_LIMIT_S = 120.0  # a preset whose estimated step exceeds this on CPU is skipped
REFERENCE_MFU = "INTELLECT-1 43.3% (no communication, INTELLECT-1 report); MaxText ~50% (issue 8)"


def measure(preset: str, overrides: list[str], steps: int, after=None) -> dict:
    """Runs in the child process: builds the Trainer, times `steps` inner steps, returns the numbers (and, with
    ``after``, what ``after(run_one_step)`` returns under "after": a profile, say)."""
    import jax

    from intellect_jax.config import load_config
    from intellect_jax.info import count_params, flops_per_token
    from intellect_jax.metrics import device_peak_flops
    from intellect_jax.trainer import Trainer

    cfg = load_config(CONFIGS / preset if not Path(preset).is_file() else preset, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    n, B, L = trainer.num_islands, cfg.data.batch_size, cfg.data.seq_len
    batch = trainer.make_batch(common.random_batch(n, B, L, cfg.model.vocab_size))
    jax.block_until_ready(trainer.inner_step(batch))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(trainer.inner_step(batch))  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(trainer.inner_step(batch))
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    extra = {"after": after(lambda: jax.block_until_ready(trainer.inner_step(batch)))} if after else {}
    devices = trainer.mesh.devices.size
    params = count_params(cfg.model).total_params
    fpt = flops_per_token(cfg.model, L, params)
    tokens_s = n * B * L / step_s
    peak = device_peak_flops(jax.devices()[0].device_kind)
    return {"preset": Path(preset).name, "overrides": overrides, "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend(), "devices": devices, "mesh": dict(trainer.mesh.shape),
            "params": params, "islands": n, "batch": B, "seq_len": L, "compute_dtype": cfg.model.compute_dtype,
            "attention": cfg.model.attention_impl, "remat": cfg.model.remat, "steps": steps,
            "step_s": step_s, "step_min_s": min(times), "step_max_s": max(times), "compile_s": compile_s,
            "tokens_s": tokens_s, "flops_per_token": fpt, "model_flops_s": fpt * tokens_s,
            "mfu": fpt * tokens_s / (peak * devices) if peak else None, **extra}


def run_child(preset: str, overrides: list[str], steps: int, host_devices: int | None, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--steps", str(steps)]
    for o in overrides:
        cmd += ["--set", o]
    if host_devices:
        cmd += ["--host-devices", str(host_devices)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=common.ROOT)
    except subprocess.TimeoutExpired:
        return {"preset": Path(preset).name, "overrides": overrides, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"preset": Path(preset).name, "overrides": overrides, "error": f"exit {p.returncode}: {tail}"}
    return json.loads(lines[-1])


def skip_reason(preset: str, cpu_flops_s: float | None) -> str:
    """Why a preset is not run on this CPU: its step's FLOPs at the measured rate, and its memory per device."""
    from intellect_jax.config import load_config
    from intellect_jax.info import count_params, flops_per_token, memory_estimate

    cfg = load_config(CONFIGS / preset)
    info = count_params(cfg.model)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len, info.total_params) * tokens
    mem = memory_estimate(cfg, {"islands": 1, "data": 1, "fsdp": 1, "tensor": 1}, info)["total per device"]
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 0
    est = f"{flops / cpu_flops_s:,.0f} s" if cpu_flops_s else "n/a"
    one = flops_per_token(cfg.model, cfg.data.seq_len, info.total_params) * cfg.data.seq_len
    one_est = f"{one / cpu_flops_s:,.0f} s" if cpu_flops_s else "n/a"
    return (f"{info.total_params / 1e9:.2f}B params; one step of batch {cfg.data.batch_size} x {cfg.data.seq_len} "
            f"= {flops:.3g} FLOPs, ~{est} at the CPU's measured rate (batch 1: ~{one_est}, > {CPU_STEP_LIMIT_S:.0f} "
            f"s); memory ~{mem / 2**30:.0f} GiB on one device at batch {cfg.data.batch_size} (this host: "
            f"{ram / 2**30:.0f} GiB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", default=None,
                    help="config file or name in configs/ (repeatable; CPU default: debug + 150m tiny batch)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override applied to every --preset (repeatable)")
    ap.add_argument("--steps", type=int, default=None, help="timed inner steps (default: debug 20, others 3)")
    ap.add_argument("--host-devices", type=int, default=None,
                    help="simulated CPU devices (default: the preset's run.host_devices, else 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per preset before giving up")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()

    if args.child:
        from intellect_jax.config import load_config

        preset = args.preset[0]
        cfg = load_config(CONFIGS / preset if not Path(preset).is_file() else preset, args.set)
        devices = args.host_devices or cfg.run.host_devices or 1
        common.force_cpu_devices(devices)  # ignored by GPU/TPU backends
        print(json.dumps(measure(preset, args.set, args.steps or 3)))
        return 0

    t_all = time.perf_counter()
    # Ask a child for the backend: importing jax here would make this process hold the accelerator's memory.
    on_cpu = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                            text=True, timeout=300).stdout.strip() == "cpu"
    if args.preset:
        plan = [(p, list(args.set)) for p in args.preset]
    elif on_cpu:
        plan = [(p, o + list(args.set)) for p, o in CPU_DEFAULT]
    else:
        plan = [("1b.toml", list(args.set))]
    results = []
    for preset, overrides in plan:
        steps = args.steps or (20 if Path(preset).name == "debug.toml" else 3)
        print(f"{preset} {' '.join(overrides)}: {steps} steps ...", flush=True)
        r = run_child(preset, overrides, steps, args.host_devices, args.timeout)
        print("  " + (r.get("error") or f"{r['tokens_s']:,.0f} tokens/s, step {r['step_s']:.3f} s"), flush=True)
        results.append(r)
    cpu_rate = max((r["model_flops_s"] for r in results if "error" not in r), default=None)
    skipped = []
    if on_cpu and not args.preset:
        skipped = [(p, skip_reason(p, cpu_rate)) for p in CPU_SKIPPED]

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["preset"], " ".join(r["overrides"]) or "–", *["–"] * 7, f"failed: {r['error']}"])
            continue
        mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        rows.append([r["preset"], " ".join(r["overrides"]) or "–", f"{r['params'] / 1e6:,.1f}M",
                     f"{r['devices']} x {r['device']} ({mesh})",
                     f"{r['islands']} x {r['batch']} x {r['seq_len']}",
                     f"{r['step_s']:.3f} ({r['step_min_s']:.3f}–{r['step_max_s']:.3f})",
                     f"{r['tokens_s']:,.0f}", f"{r['tokens_s'] / r['devices']:,.0f}",
                     f"{r['model_flops_s'] / 1e9:,.1f}",
                     f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no known peak)"])
    for p, why in skipped:
        rows.append([p, "–", *["–"] * 7, f"skipped: {why}"])
    header = ["preset", "overrides", "params", "devices (mesh)", "islands x batch x seq", "step s (min–max)",
              "tokens/s", "tokens/s/device", "model GFLOP/s", "MFU"]
    tab = common.table(header, rows, "llrlrrrrrl")
    any_gpu = any(r.get("backend") == "gpu" for r in results)
    ok = [r for r in results if "error" not in r]
    notes = ("Inner step only (forward, backward, clip, AdamW; no DiLoCo sync, no data loading), random tokens, "
             "median over the timed steps after compile + one warm-up step"
             + (" (" + ", ".join(f"{r['preset']}: {r['steps']} steps, compile {r['compile_s']:.0f} s" for r in ok)
                + ")" if ok else "")
             + ". Model FLOPs per token: 6 N + 12 L H Q T (info.flops_per_token; N = matmul params incl. the LM "
             "head). tokens/s counts every island's tokens. "
             + (f"MFU = model FLOP/s / (dense bf16 peak x devices); compare {REFERENCE_MFU}." if any_gpu else
                "MFU is n/a on CPU (no peak in metrics.PEAK_FLOPS); a GPU run compares with " + REFERENCE_MFU + ".")
             + (" On this shared 2-core CPU the debug preset simulates its 8 devices (4 islands x fsdp 2); the "
                "150m row is one device at batch 1 x 256 in float32 (the preset's bf16 compute overridden for the CPU)."
                if on_cpu and not args.preset else ""))
    seconds = time.perf_counter() - t_all
    print()
    print(tab)
    print()
    print(notes)
    print(f"\ntotal {seconds:.0f} s")
    if not args.no_write:
        common.write_section("Throughput / MFU", "\n\n".join([common.provenance(seconds), tab, notes,
                                                               "Raw: `" + json.dumps(ok) + "`"]))
        print(f"wrote {common.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
