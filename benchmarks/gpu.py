"""The GPU numbers in one run (issue 14, item 4): run by benchmarks/gpu.sh on one H100/H200 in under ~8 minutes.

    bash benchmarks/gpu.sh                 # on the GPU machine; writes the "GPU" section of RESULTS.md
    python benchmarks/gpu.py --quick       # a CPU smoke test of every section at toy sizes (writes nothing)

Sections, each in its own subprocess (an out-of-memory or a kernel that does not build costs that row only, and
every row's peak memory is its own):

1. **memory bandwidth**: a jitted ``x * 2`` over 4 GiB of fp32, bytes read + written per second (the ceiling for
   the codec rows).
2. **int8 / int4 codec on the device**: ``quant.pack`` and ``quant.unpack`` (the jitted twin of the wire codec) on a
   1 GiB fp32 pseudo-gradient, then the float64 "fix" rounding route and the Pallas kernel per tile (PALLAS_PACK), each
   checked byte for byte against ``quant.pack``; GB/s counts bytes read + written, as the bandwidth row does.
3. **attention at the 10B preset's shape** (H 32, K 8, Dh 128, L 8192, one row, bf16, forward + backward) for each
   implementation: time and the compiled temporary memory (XLA's memory analysis), with documents in the row.
4. **Pallas tiles** (``--tune``): the Pallas attention kernel's forward and forward + backward time for each tiling
   in TILES at the 1B preset's training shape; the fastest (dq error within 2x the default's) is used by the pallas
   rows of 3 and 5 (attention.PALLAS_TUNING holds the tiles a run found).
5. **1B preset training step** (throughput.measure: the real Trainer, fwd + bwd + clip + AdamW, bf16 compute, fp32
   master weights) per arm (attention, batch, remat, LM-head backward, XLA flags, config overrides): tokens/s, MFU
   against the dense bf16 peak in metrics.PEAK_FLOPS, and the step's peak device memory
   (``memory_stats()['peak_bytes_in_use']``). ``--profile`` also traces the first arm's step and writes the
   device's kernels by time (profile.md under --out).
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

GiB = 2**30


def _timed(fn, *args, reps: int = 10) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up call (compile)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def section_env(quick: bool) -> list[dict]:
    import jax

    d = jax.devices()[0]
    row = {"jax": jax.__version__, "backend": jax.default_backend(), "device": d.device_kind,
           "devices": len(jax.devices())}
    try:
        from jax._src.lib import cuda_versions

        row["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception as e:  # noqa: BLE001 - informational only
        row["cudnn"] = f"n/a ({type(e).__name__})"
    return [row]


def section_bandwidth(quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp

    n = (1 << 20) if quick else GiB  # fp32 elements: 4 GiB on the GPU
    x = jnp.ones((n,), jnp.float32)
    s = _timed(jax.jit(lambda x: x * 2.0), x)
    return [{"what": "x * 2 (fp32)", "bytes": 8 * n, "seconds": s, "GB/s": 8 * n / s / 1e9}]


# (bits, blocks per program, warps, rounding route) of the Pallas pack rows.
PALLAS_PACK = [(8, 8, 4, "u32"), (8, 4, 4, "fix"), (8, 8, 4, "fix"), (8, 16, 4, "fix"), (8, 8, 8, "fix"),
               (4, 8, 4, "fix")]


def section_codec(quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from intellect_jax import quant

    n = (1 << 20) if quick else GiB // 4  # 1 GiB of fp32
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    amax = jax.jit(lambda x: jnp.max(jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1, 256) & 0x7FFFFFFF,
                                     axis=1))
    s_amax = _timed(amax, x)
    rows = [{"what": "block amax pass alone (pack's first read)", "bytes": 4 * n + n // 64, "seconds": s_amax,
             "GB/s": (4 * n + n // 64) / s_amax / 1e9, "fp32 GB/s": 4 * n / s_amax / 1e9}]
    for bits in (8, 4):
        pack = jax.jit(lambda x, b=bits: quant.pack(x, bits=b))
        unpack = jax.jit(lambda c, s, b=bits: quant.unpack(c, s, bits=b))
        codes, scales = pack(x)
        wire = codes.nbytes + scales.nbytes
        s_pack = _timed(pack, x)
        s_unpack = _timed(unpack, codes, scales)
        rows.append({"what": f"pack int{bits}", "bytes": 4 * n + wire, "seconds": s_pack,
                     "GB/s": (4 * n + wire) / s_pack / 1e9, "fp32 GB/s": 4 * n / s_pack / 1e9})
        rows.append({"what": f"unpack int{bits}", "bytes": 4 * n + wire, "seconds": s_unpack,
                     "GB/s": (4 * n + wire) / s_unpack / 1e9, "fp32 GB/s": 4 * n / s_unpack / 1e9})
    # The Pallas kernel (one read of x per tile) per tile size and warp count; its bytes must equal XLA's.
    want = {b: jax.jit(lambda x, b=b: quant.pack(x, bits=b))(x) for b in (8, 4)}
    same = jax.jit(lambda a, b: jnp.all(a[0] == b[0]) & jnp.all(jax.lax.bitcast_convert_type(a[1], jnp.uint32)
                                                                 == jax.lax.bitcast_convert_type(b[1], jnp.uint32)))
    variants = [(f"pack int{b}, XLA, {r} route", jax.jit(lambda x, b=b, r=r: quant.pack(x, bits=b, route=r)), b)
                for b, r in ((8, "fix"), (4, "fix"))]
    variants += [(f"pack int{bits}, Pallas kernel, {route} route, {tile} blocks x {warps} warps",
                  jax.jit(lambda x, b=bits, r=tile, w=warps, rt=route: quant.pack_pallas(
                      x, bits=b, rows=r, num_warps=w, route=rt, interpret=quick)), bits)
                 for bits, tile, warps, route in PALLAS_PACK]
    for what, fn, bits in variants:
        try:
            got = fn(x)
            wire = got[0].nbytes + got[1].nbytes
            sec = _timed(fn, x)
            rows.append({"what": what, "bytes": 4 * n + wire,
                         "seconds": sec, "GB/s": (4 * n + wire) / sec / 1e9, "fp32 GB/s": 4 * n / sec / 1e9,
                         "same_bytes": bool(same(got, want[bits]))})
        except Exception as e:  # noqa: BLE001 - a tiling that does not build costs its row only
            rows.append({"section": what, "error": f"{type(e).__name__}: {e}"[:300]})
    # An elastic island's pseudo-gradient leaving the device (elastic.device_codes): fp32 to the host and packed
    # there by the numpy codec pool, or packed here and only codes + scales copied (what the ring sends either way).
    pack8 = jax.jit(lambda x: quant.pack(x, bits=8))
    pallas8 = jax.jit(lambda x: quant.pack_padded(x, bits=8))  # the production route: on a GPU the Pallas kernel
    host = lambda x: quant.pack_np(np.asarray(jax.device_get(x)), bits=8)  # noqa: E731
    dev = lambda x: jax.device_get(pack8(x))  # noqa: E731
    dev_pallas = lambda x: jax.device_get(pallas8(x))  # noqa: E731
    for what, fn in [("leave the device, host packs (device_codes off)", host),
                     ("leave the device, packed on it by XLA (device_codes on)", dev),
                     ("leave the device, packed on it by quant.pack_padded (Pallas)", dev_pallas)]:
        fn(x)
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn(x)
            t.append(time.perf_counter() - t0)
        sec = statistics.median(t)
        rows.append({"what": what, "bytes": 4 * n, "seconds": sec, "GB/s": 4 * n / sec / 1e9,
                     "fp32 GB/s": 4 * n / sec / 1e9, "host_path": True})
    return rows


def section_attention(quick: bool, impls: list[str]) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from intellect_jax import attention as attn

    B, L, H, K, D = (1, 512, 4, 2, 32) if quick else (1, 8192, 32, 8, 128)  # 10B preset: 32 heads, 8 kv heads
    dt = jnp.bfloat16
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, L, H, D), dt)
    k = jax.random.normal(ks[1], (B, L, K, D), dt)
    v = jax.random.normal(ks[2], (B, L, K, D), dt)
    starts = np.random.RandomState(0).rand(B, L) < 1 / 1024  # documents of ~1024 tokens, as packed rows have
    seg = jnp.asarray(np.cumsum(starts, axis=1) + 1, jnp.int32)
    # causal FLOPs of forward + backward: 4 matmuls of L^2/2 x Dh per head forward, 2.5x that backward
    flops = 3.5 * 4 * B * H * D * L * L / 2
    def ref_grads(q, k, v, s_ids):
        f = lambda q, k, v: attn.attention(q, k, v, s_ids, "xla")  # noqa: E731
        out, vjp = jax.vjp(f, *(x.astype(jnp.float32) for x in (q, k, v)))
        return out, vjp(dout.astype(jnp.float32))[0]

    dout = jax.random.normal(jax.random.key(1), q.shape, dt)
    rows = []
    for impl in impls:
        for use_seg in (True, False):
            s_ids = seg if use_seg else None
            name, _, m = impl.partition("@")  # "cudnn@64": cuDNN packed documents, M = 64 (attention.py)
            if m and not use_seg:
                continue

            def fwd(q, k, v, s_ids=s_ids, name=name, m=m):
                if m:
                    return attn.cudnn_packed_attention(q, k, v, s_ids, int(m))
                return attn.attention(q, k, v, s_ids, name)

            def fwd_bwd(q, k, v, fwd=fwd):
                out, vjp = jax.vjp(fwd, q, k, v)
                return out, vjp(dout)[0]

            f = jax.jit(fwd_bwd)
            row = {"impl": impl, "documents": use_seg, "shape": f"B{B} L{L} H{H} K{K} Dh{D}"}
            try:
                mem = f.lower(q, k, v).compile().memory_analysis()
                row["temp_bytes"] = mem.temp_size_in_bytes if mem else None
                row["seconds"] = _timed(f, q, k, v, reps=5)
                row["TFLOP/s"] = flops / row["seconds"] / 1e12
                out, dq = f(q, k, v)
                ref_out, ref_dq = jax.jit(ref_grads)(q, k, v, s_ids)
                row["max_err_out"] = float(jnp.abs(out.astype(jnp.float32) - ref_out).max())
                row["max_err_dq"] = float(jnp.abs(dq.astype(jnp.float32) - ref_dq).max())
            except Exception as e:  # noqa: BLE001 - a kernel that does not build on this device is a result too
                row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}".replace("|", "/")
            rows.append(row)
    return rows


# Pallas tiles tried by --tune: forward (block_q, block_k), backward (block_q_dkv, block_kv_dkv, block_q_dq,
# block_kv_dq), num_stages of the forward kernel, num_warps (None: jax's heuristic; a number also sets the backward's).
TILES = [
    ((128, 128), (32, 32, 32, 32), 2, None),  # jax's defaults
    ((128, 64), (32, 32, 32, 32), 3, None),
    ((128, 128), (64, 64, 64, 64), 2, None),
    ((128, 64), (64, 64, 64, 64), 3, None),
    ((128, 64), (32, 128, 128, 32), 3, None),
    ((128, 64), (64, 128, 128, 64), 3, None),
    ((128, 128), (32, 128, 128, 32), 2, None),
    ((64, 64), (32, 64, 64, 32), 3, None),
    ((128, 32), (32, 64, 64, 32), 4, None),
    ((128, 64), (16, 128, 128, 16), 3, None),
    ((128, 64), (32, 128, 128, 32), 3, 8),
    ((64, 128), (64, 128, 128, 64), 2, None),
]
# Round 2, around round 1's fastest (128x64 / 64x64, 64x64 / 3 / auto): `--tune --tiles-set 2`.
TILES_2 = [
    ((128, 64), (64, 64, 64, 64), 3, None),
    ((128, 64), (64, 64, 64, 64), 4, None),
    ((128, 64), (64, 64, 64, 64), 3, 8),
    ((128, 128), (64, 64, 64, 64), 3, None),
    ((128, 64), (128, 64, 64, 128), 3, None),
    ((128, 64), (128, 64, 64, 128), 3, 8),
    ((128, 64), (64, 128, 128, 64), 3, 8),
    ((128, 64), (128, 128, 128, 128), 3, 8),
    ((128, 64), (32, 64, 64, 32), 3, None),
    ((128, 64), (64, 32, 32, 64), 3, None),
    ((64, 64), (64, 64, 64, 64), 3, None),
    ((256, 64), (64, 64, 64, 64), 3, 8),
]


def tiles_dict(fwd, bwd, stages, warps) -> dict:
    d = dict(zip(("block_q", "block_k"), fwd)) | dict(
        zip(("block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq"), bwd)) | {"num_stages": stages}
    return d | ({"num_warps": warps} if warps else {})


def section_tune(quick: bool, tiles_set: int = 1) -> list[dict]:
    """The Pallas kernel's forward and forward + backward time per tiling at the 1B preset's training shape (B4 L4096,
    32 heads, 8 kv heads, documents of ~1024 tokens), errors against the fp32 XLA reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from intellect_jax import attention as attn

    B, L, H, K, D = (1, 256, 4, 2, 32) if quick else (4, 4096, 32, 8, 128)
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (B, L, h, D), jnp.bfloat16) for kk, h in zip(ks, (H, K, K)))
    dout = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    starts = np.random.RandomState(0).rand(B, L) < 1 / 1024
    seg = jnp.asarray(np.cumsum(starts, axis=1) + 1, jnp.int32)
    flops = 3.5 * 4 * B * H * D * L * L / 2
    ref = jax.jit(lambda q, k, v: jax.vjp(lambda *a: attn.attention(*a, seg, "xla"),
                                          *(x.astype(jnp.float32) for x in (q, k, v)))[1](
        dout.astype(jnp.float32))[0])(q, k, v)
    rows = []
    tilings = TILES_2 if tiles_set == 2 else TILES
    for fwd_t, bwd_t, stages, warps in tilings[:3] if quick else tilings:
        tiles = tiles_dict(fwd_t, bwd_t, stages, warps)
        attn.PALLAS_TUNING = tiles
        f = lambda q, k, v: attn._pallas_attention(q, k, v, seg, interpret=quick)  # noqa: E731
        fwd = jax.jit(f)
        fwd_bwd = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](dout)[0])
        row = {"tiles": tiles, "shape": f"B{B} L{L} H{H} K{K} Dh{D}"}
        try:
            row["fwd_s"] = _timed(fwd, q, k, v, reps=5)
            row["seconds"] = _timed(fwd_bwd, q, k, v, reps=5)
            row["TFLOP/s"] = flops / row["seconds"] / 1e12
            row["max_err_dq"] = float(jnp.abs(fwd_bwd(q, k, v).astype(jnp.float32) - ref).max())
        except Exception as e:  # noqa: BLE001 - a tiling that does not build (shared memory) is a result too
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}".replace("|", "/")
        rows.append(row)
    return rows


def best_tiles(rows: list[dict]) -> dict | None:
    """The fastest tiling whose dq error is within 2x the default tiling's (bf16's own error)."""
    ok = [r for r in rows if "seconds" in r]
    if not ok:
        return None
    bound = 2 * max(ok[0]["max_err_dq"], 1e-3)
    return min((r for r in ok if r["max_err_dq"] <= bound), key=lambda r: r["seconds"], default=ok[0])["tiles"]


# Named XLA flag sets a training arm can run under (IMPL:BATCH:REMAT:HEAD:FLAGS).
XLA_FLAG_SETS = {"default": "", "cublas": "--xla_gpu_enable_triton_gemm=false",
                 "nocmdbuf": "--xla_gpu_enable_command_buffer="}


def device_profile(run_step, steps: int = 2, top: int = 60) -> dict:
    """Traces ``steps`` calls of run_step and sums the device's events by name per timeline line (jax.profiler's
    XSpace read back through ProfileData): the kernels a step spends its time in, in ms per step."""
    import collections
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                run_step()
        data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    lines = {}
    planes = [p for p in data.planes if p.name.startswith("/device:")] or [  # the CPU smoke test: the host's
        p for p in data.planes if p.name == "/host:CPU"]
    for plane in planes:
        for line in plane.lines:
            total = collections.Counter()
            for ev in line.events:
                op = dict(ev.stats).get("hlo_op")  # the HLO instruction a kernel runs, where the trace names it
                total[f"{ev.name} [{op}]" if op and op != ev.name else ev.name] += ev.duration_ns
            if total:
                key = f"{plane.name} / {line.name}"
                lines[key] = {"ms_per_step": sum(total.values()) / 1e6 / steps,
                              "top": [[name[:160], ns / 1e6 / steps] for name, ns in total.most_common(top)]}
    return lines


def section_train(quick: bool, impl: str, batch: int, remat: str, head: str = "custom",
                  profile: bool = False, extra: tuple[str, ...] = ()) -> list[dict]:
    from benchmarks import throughput

    if head == "autodiff":  # the LM head's backward as plain autodiff makes it: fp32 cotangent x bf16 operands
        import jax.numpy as jnp

        from intellect_jax import model

        model.head_logits = lambda x, w: jnp.einsum("bld,dv->blv", x, w, preferred_element_type=jnp.float32)
    elif head != "custom":
        raise ValueError(f"head must be custom or autodiff, got {head!r}")
    preset, steps = ("debug.toml", 3) if quick else ("1b.toml", 6)
    overrides = [f"data.batch_size={batch}", f"model.attention_impl={impl}", f"model.remat={remat}", *extra]
    if quick:
        overrides += ["mesh.islands=1", "mesh.fsdp=1", "data.seq_len=128", "run.host_devices=1"]
    row = throughput.measure(preset, overrides, steps, after=device_profile if profile else None)
    if profile:
        row["profile"] = row.pop("after")
    row["peak_bytes"] = _peak_bytes()
    row["head"] = head
    return [row]


def run_section(args_list: list[str], timeout: float, flags: str = "") -> list[dict]:
    cmd = [sys.executable, __file__, "--child", *args_list]
    env = dict(os.environ)
    if flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=common.ROOT, env=env)
    except subprocess.TimeoutExpired:
        return [{"section": " ".join(args_list), "error": f"timed out after {timeout:.0f} s"}]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
    if p.returncode or not lines:
        errs = [ln for ln in p.stderr.splitlines() if "Error" in ln or "error:" in ln] or p.stderr.splitlines() or ["?"]
        tail = errs[-1].replace("|", "/")[-300:]
        return [{"section": " ".join(args_list), "error": f"exit {p.returncode}: {tail}"}]
    rows = json.loads(lines[-1])
    for r in rows:
        r["section_s"] = time.perf_counter() - t
        if flags:
            r["xla_flags"] = flags
    return rows


def _gib(b) -> str:
    return f"{b / GiB:.2f}" if isinstance(b, (int, float)) else "n/a"


def profile_report(lines: dict) -> str:
    out = []
    for key, v in sorted(lines.items(), key=lambda kv: -kv[1]["ms_per_step"]):
        out.append(f"{key}: {v['ms_per_step']:.1f} ms per step\n\n"
                   + common.table(["event", "ms per step"], [[n.replace("|", "/"), f"{ms:.2f}"] for n, ms in v["top"]],
                                  "lr"))
    return "\n\n".join(out)


def report(env, bw, codec, att, train, tune=(), tiles=None) -> str:
    out = []
    e = env[0] if env else {}
    out.append(f"Device: {e.get('device', '?')} ({e.get('backend', '?')}), jax {e.get('jax', '?')}, "
               f"cuDNN {e.get('cudnn', '?')}.")
    copy = next((r["GB/s"] for r in bw if "GB/s" in r), None)
    rows = [[r["what"] + ("" if r.get("same_bytes", True) else " (**bytes differ from XLA's**)"),
             "" if r.get("host_path") else f"{r['GB/s']:.0f}", f"{r.get('fp32 GB/s', r['GB/s'] / 2):.1f}",
             "" if r.get("host_path") else f"{100 * r['GB/s'] / copy:.0f}%" if copy else "n/a"]
            for r in bw + codec if "GB/s" in r]
    rows += [[r.get("section", "?"), r["error"], "", ""] for r in bw + codec if "error" in r]
    out.append("Memory bandwidth and the wire codec on the device (1 GiB fp32 pseudo-gradient; GB/s = bytes read "
               "+ written per second; % of the x * 2 row; the 'leave the device' rows: int8 codes in host memory, "
               "end to end, fp32 GB/s):\n\n"
               + common.table(["kernel", "GB/s (read + write)", "fp32 in GB/s", "% of bandwidth"], rows))
    if tune:
        rows = []
        for r in tune:
            t = r.get("tiles", {})
            name = (f"{t.get('block_q')}x{t.get('block_k')} / {t.get('block_q_dkv')}x{t.get('block_kv_dkv')}, "
                    f"{t.get('block_q_dq')}x{t.get('block_kv_dq')} / {t.get('num_stages')} / "
                    f"{t.get('num_warps', 'auto')}") if t else r.get("section", "?")
            rows.append([name] + ([r["error"], "", "", ""] if "error" in r else
                                  [f"{1e3 * r['fwd_s']:.2f}", f"{1e3 * r['seconds']:.2f}", f"{r['TFLOP/s']:.0f}",
                                   f"{r['max_err_dq']:.3g}"]))
        shape = next((r["shape"] for r in tune if "shape" in r), "?")
        out.append(f"Pallas attention tiles ({shape}, bf16, documents of ~1024 tokens; forward / forward + backward "
                   f"ms; TFLOP/s of forward + backward, causal half; dq error vs fp32 XLA); the pallas rows below "
                   f"use {tiles}:\n\n"
                   + common.table(["fwd q x k / bwd dkv q x kv, dq q x kv / stages / warps", "fwd ms",
                                   "fwd + bwd ms", "TFLOP/s", "max error dq"], rows, "lrrrr"))
    rows = []
    for r in att:
        if "error" in r and "impl" not in r:
            rows.append([r.get("section", "?"), "", "", "", "", r["error"]])
        elif "error" in r:
            rows.append([r["impl"], "yes" if r["documents"] else "no (causal only)", "", "", "", r["error"]])
        else:
            rows.append([r["impl"], "yes" if r["documents"] else "no (causal only)", f"{1e3 * r['seconds']:.1f}",
                         f"{r['TFLOP/s']:.0f}", _gib(r.get("temp_bytes")),
                         f"{r['max_err_out']:.3g} / {r['max_err_dq']:.3g}"])
    shape = next((r["shape"] for r in att if "shape" in r), "?")
    out.append(f"Attention at the 10B preset's shape ({shape}, bf16), forward + backward; TFLOP/s counts the causal "
               "half only (3.5 x 4 B H Dh L^2 / 2); temp = XLA's compiled temporary memory; error = max |bf16 result - "
               "fp32 xla reference| of the output / of dq (the xla row shows bf16's own error):\n\n"
               + common.table(["impl", "documents", "ms", "TFLOP/s", "temp GiB", "max error out / dq"], rows,
                              "llrrrr"))
    rows = []
    for r in train:
        if "error" in r:
            rows.append([r.get("section", "?"), "", "", "", "", r["error"]])
            continue
        variant = ("" if r.get("head", "custom") == "custom" else ", autodiff head") + (
            f", {r['xla_flags']}" if r.get("xla_flags") else "") + "".join(f", {o}" for o in r["overrides"][3:])
        rows.append([r["attention"] + variant, r["remat"], f"{r['batch']} x {r['seq_len']}", f"{r['step_s']:.3f}",
                     f"{r['tokens_s']:,.0f}", f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a",
                     _gib(r.get("peak_bytes"))])
    out.append("1B preset inner step (Trainer: fwd + bwd + clip + AdamW; bf16 compute, fp32 master weights; random "
               "tokens, one document per row; median of 6 steps after compile + warm-up). MFU = (6 N + 12 L H Q T) "
               "x tokens/s / dense bf16 peak (989 TFLOP/s); compare INTELLECT-1 43.3% (10B, H100s), MaxText ~50%:\n\n"
               + common.table(["attention", "remat", "batch x seq", "step s", "tokens/s", "MFU", "peak GiB"], rows,
                              "llrrrrr"))
    return "\n\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes on any backend (a smoke test; writes nothing)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--impl", action="append", default=None,
                    help="attention implementation(s) to compare ('none': skip the attention section)")
    ap.add_argument("--train", action="append", default=None, metavar="IMPL:BATCH:REMAT[:HEAD[:FLAGS[:SETS]]]",
                    help="1B training arm(s); HEAD custom (model.head_logits, default) or autodiff (the LM head's "
                         "backward as autodiff makes it), FLAGS a name in XLA_FLAG_SETS, SETS comma-separated config "
                         "overrides (default: pallas:4:none, pallas:4:none:custom:default:model.scan_layers=true, "
                         "pallas:4:none:autodiff, pallas:6:none)")
    ap.add_argument("--profile", action="store_true", help="also trace the first training arm's step and list the "
                                                            "device's kernels by time (raw rows and profile.md)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for the whole run; later rows are skipped")
    ap.add_argument("--out", default=None, help="also write the table and raw rows here (a folder)")
    ap.add_argument("--tune", action="store_true", help="time the Pallas kernel per tiling (TILES) first and run "
                                                         "the pallas rows with the fastest")
    ap.add_argument("--tiles", default=None, help="JSON of attention.PALLAS_TUNING for the pallas rows")
    ap.add_argument("--tiles-set", type=int, default=1, choices=(1, 2), help="--tune's tilings: TILES or TILES_2")
    args = ap.parse_args()
    impls = args.impl or ["xla", "cudnn", "cudnn@64", "cudnn_mask", "pallas", "blockwise"]
    impls = [] if impls == ["none"] else impls
    for arm in args.train or []:
        spec = arm.split(":")
        if len(spec) < 3 or len(spec) > 6 or (len(spec) > 3 and spec[3] not in ("custom", "autodiff")) or (
                len(spec) > 4 and spec[4] not in XLA_FLAG_SETS):
            ap.error(f"--train {arm}: want IMPL:BATCH:REMAT[:HEAD[:FLAGS[:KEY=VALUE,...]]], HEAD custom or "
                     f"autodiff, FLAGS one of {sorted(XLA_FLAG_SETS)}, then config overrides")

    if args.child:
        if args.quick:
            common.force_cpu_devices(1)
        if args.tiles:
            from intellect_jax import attention

            attention.PALLAS_TUNING = json.loads(args.tiles)
        fn = {"env": section_env, "bandwidth": section_bandwidth, "codec": section_codec}.get(args.section)
        if fn:
            rows = fn(args.quick)
        elif args.section == "tune":
            rows = section_tune(args.quick, args.tiles_set)
        elif args.section == "attention":
            rows = section_attention(args.quick, impls)
        else:
            spec = args.train[0].split(":")
            impl, batch, remat, head = (spec + ["custom"])[:4]
            extra = tuple(spec[5].split(",")) if len(spec) > 5 and spec[5] else ()
            rows = section_train(args.quick, impl, int(batch), remat, head, args.profile, extra)
        print(json.dumps(rows, default=str))
        return 0

    t0 = time.perf_counter()
    q = ["--quick"] if args.quick else []
    left = lambda: args.budget - (time.perf_counter() - t0)  # noqa: E731

    def section(name, extra=(), timeout=120.0, flags=""):
        if left() < 20:
            return [{"section": name, "error": "skipped: the run's time budget is spent"}]
        rows = run_section(["--section", name, *q, *extra], min(timeout, left()), flags)
        print(json.dumps(rows, default=str), flush=True)
        return rows

    env = section("env", timeout=60)
    bw = section("bandwidth", timeout=60)
    codec = section("codec", timeout=90)
    tune, tiles = [], args.tiles
    if args.tune:
        tune = section("tune", ["--tiles-set", str(args.tiles_set)], timeout=240)
        best = best_tiles(tune)
        tiles = json.dumps(best) if best else tiles
    t_arg = ["--tiles", tiles] if tiles else []
    att = section("attention", [a for i in impls for a in ("--impl", i)] + t_arg, timeout=150) if impls else []
    arms = args.train or ["pallas:4:none", "pallas:4:none:custom:default:model.scan_layers=true",
                          "pallas:4:none:autodiff", "pallas:6:none"]
    train = []
    for i, arm in enumerate(arms):
        spec = arm.split(":")
        flags = XLA_FLAG_SETS[spec[4]] if len(spec) > 4 else ""
        prof = ["--profile"] if args.profile and i == 0 else []
        # The child gets the head and the overrides; the flags travel in its XLA_FLAGS.
        spec = spec[:3] + [spec[3] if len(spec) > 3 else "custom", "default", spec[5] if len(spec) > 5 else ""]
        train += section("train", ["--train", ":".join(spec)] + t_arg + prof, timeout=150, flags=flags)
    seconds = time.perf_counter() - t0
    body = report(env, bw, codec, att, train, tune, tiles)
    raw = json.dumps({"env": env, "bandwidth": bw, "codec": codec, "tune": tune, "tiles": tiles, "attention": att,
                      "train": train}, default=str)
    print("\n" + body + f"\n\ntotal {seconds:.0f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_table.md").write_text(body + "\n")
        (Path(args.out) / "gpu_raw.json").write_text(raw + "\n")
        profiles = [r["profile"] for r in train if r.get("profile")]
        if profiles:
            (Path(args.out) / "profile.md").write_text(profile_report(profiles[0]) + "\n")
    if not args.quick:
        common.write_section("GPU (benchmarks/gpu.sh)", "\n\n".join([common.provenance(seconds), body,
                                                                     "Raw: `" + raw + "`"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
