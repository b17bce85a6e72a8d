"""Compute-utilization model: INTELLECT-1's Table 2 scenarios, reproduced and re-predicted for our reduce.

    python benchmarks/utilization_model.py                     # measures the debug inner step + a loopback codec rate
    python benchmarks/utilization_model.py --inner-step-seconds 1.9 --preset configs/1b.toml --H 100 \\
        --reduce-gbps 2.5                                      # numbers measured elsewhere (GPU step, real link)

The model (blocking sync, as in INTELLECT-1 and this trainer's in-program DiLoCo):

    utilization = compute / (compute + non-overlapped sync)
    compute     = H x inner-step time                    (10B: 38 min per 100 inner steps, INTELLECT-1 report)
    sync        = bytes one member sends / achieved rate + latency
    bytes sent  = 2 (N-1)/N x payload                     (ring reduce-scatter + all-gather, collective.py)
    payload     = int8 codes + one fp32 scale per 256-element block, for every parameter (quant.payload_bytes)
    achieved    = link efficiency x link rate
    latency     = 2 (N-1) x one-way latency               (one message per ring step; chunks pipeline behind it)

Streaming (``--fragments P --overlap TAU``, intellect_jax/streaming.py): each fragment sends 1/P of the bytes and
its reduce runs while the islands compute TAU more inner steps, so per outer step the compute waits
P x max(0, fragment sync - TAU x inner-step time), with fragment sync = (bytes / P) / rate + latency. This assumes the
reduce runs beside the compute (a host thread over the NIC, as an elastic island's ring does) without slowing it.

Table 1 infers from the report's median all-reduce times the rate PRIME achieved in each scenario, checks that the
model reproduces the report's utilization (it must, by construction: compute / (compute + median all-reduce)), and
then predicts the utilization with our reduce's achieved rate on the same links. The links' nominal rates are not
in the report's table; they are estimated as PRIME's achieved rate / PRIME's link efficiency, where PRIME's
efficiency (~16% of the link rate: a 1B all-reduce in ~102 s at 500 Mbit/s) is the one published figure
(the INTELLECT-1 technical report, Jaghouar et al. 2024, arXiv 2412.01152; ``--prime-link-efficiency``). That
figure is payload / rate / time; the model works with bytes sent per member (2(N-1)/N x payload), so PRIME's
efficiency is multiplied by 2(N-1)/N before use: both sides on one bound definition.

Our achieved rate is, in this order of precedence: ``--link-efficiency`` x link rate; ``min(--reduce-gbps, link
rate)``; or ``min(MEASURED_RING_EFFICIENCY x link rate, loopback codec rate)``: the first is our TCP ring's measured
fraction of the same bound (3 processes over tc tbf 1 Gbit/s links, benchmarks/ring_allreduce.py), the second is
measured here with plain sockets: one ring hop's work (pack fp32 -> int8 codes + scales, send over a loopback TCP
socket, receive, unpack, accumulate in fp32; sender and receiver share this host's cores, as they do on a ring
member, which sends and receives at once).
Table 2 applies the same model to the measured inner step of a preset on this hardware.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

# INTELLECT-1 technical report (arXiv 2412.01152), Table 2: scenario -> (median all-reduce s, compute utilization %).
REPORT = {"USA": (103.0, 95.7), "USA + Europe": (382.0, 85.6), "Global": (469.0, 83.0)}
REPORT_COMPUTE_S = 38 * 60  # 100 inner steps of the 10B model (INTELLECT-1 report)
REPORT_H = 100
PRIME_LINK_EFFICIENCY = 0.16  # INTELLECT-1 report: 1B all-reduce ~102 s at 500 Mbit/s, ~16% of the link rate
# ... defined as payload / rate / time, i.e. without the ring's 2(N-1)/N: on our definition (bytes one member sends
# / rate / time) it is 0.16 x 2(N-1)/N, computed below with the table's N.
# Our ring, measured (benchmarks/RESULTS.md, "Link utilization: tbf 1gbit, encrypted", 2026-11-27): 3 island
# processes over tc tbf 1 Gbit/s links, 1000 MB fp32 as int8, median of 3 (best 86.0%): 83.4% of
# 2(N-1)/N x payload / rate.
MEASURED_RING_EFFICIENCY = 0.834
MAX_LINK_GBPS = 4.0  # INTELLECT-1 report: links between nodes were 0.5-4 Gbit/s
# Assumed one-way latencies (not in the report): a ring step waits one message before its chunks pipeline.
DEFAULT_LATENCY_MS = {"USA": 30.0, "USA + Europe": 60.0, "Global": 120.0}
BLOCK = 256


def loopback_codec_rate(mib: int = 64, chunk_mib: int = 4, repeats: int = 3) -> tuple[float, float]:
    """(raw TCP bytes/s, int8 payload bytes/s through pack -> send -> recv -> the ring's hop: decode + add + re-pack
    in one pass, quant.accumulate_pack_np on the codec thread pool) on 127.0.0.1."""
    import numpy as np

    from intellect_jax import quant

    n = chunk_mib * (1 << 20) // 4
    chunk = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    chunks = mib // chunk_mib

    def recv_exact(sock, view):
        got = 0
        while got < len(view):
            k = sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("peer closed")
            got += k

    def run(codec: bool) -> tuple[int, float]:
        srv = socket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        sent_bytes = [0]

        def sender():
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw = chunk.view(np.uint8)
            for _ in range(chunks):
                if codec:
                    codes, scales = quant.pack_np(chunk, bits=8, block_size=BLOCK)
                    for part in (codes.view(np.uint8), scales.view(np.uint8)):
                        s.sendall(part)
                        sent_bytes[0] += part.nbytes
                else:
                    s.sendall(raw)
                    sent_bytes[0] += raw.nbytes
            s.close()

        t = threading.Thread(target=sender)
        t0 = time.perf_counter()
        t.start()
        conn, _ = srv.accept()
        codes = np.empty(n, np.int8)
        scales = np.empty(n // BLOCK, np.float32)
        raw = np.empty(n * 4, np.uint8)
        for _ in range(chunks):
            if codec:
                recv_exact(conn, memoryview(codes.view(np.uint8)))
                recv_exact(conn, memoryview(scales.view(np.uint8)))
                quant.accumulate_pack_np(codes, scales, chunk, bits=8, block_size=BLOCK)
            else:
                recv_exact(conn, memoryview(raw))
        dt = time.perf_counter() - t0
        t.join()
        conn.close()
        srv.close()
        return sent_bytes[0], dt

    raw_rates, codec_rates = [], []
    for _ in range(repeats):
        b, dt = run(False)
        raw_rates.append(b / dt)
        b, dt = run(True)
        codec_rates.append(b / dt)
    return statistics.median(raw_rates), statistics.median(codec_rates)


def measure_inner_step(cfg_path: Path, steps: int, overrides: list[str]) -> tuple[float, object]:
    """Median seconds of one inner step of the preset's Trainer on this machine (random tokens, after compile)."""
    import jax

    from intellect_jax.config import load_config
    from intellect_jax.trainer import Trainer

    cfg = load_config(cfg_path, overrides)
    trainer = Trainer(cfg)
    host = common.random_batch(trainer.num_islands, cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size)
    batch = trainer.make_batch(host)
    jax.block_until_ready(trainer.inner_step(batch))  # compile
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(trainer.inner_step(batch))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), cfg


def sync_seconds(bytes_sent: float, rate_bps: float, n: int, latency_s: float) -> float:
    return bytes_sent * 8 / rate_bps + 2 * (n - 1) * latency_s


def streaming_wait(bytes_sent: float, rate_bps: float, n: int, latency_s: float, fragments: int, overlap: int,
                   step_s: float) -> float:
    """Seconds per outer step the compute waits with P fragments each overlapped with `overlap` inner steps."""
    frag = sync_seconds(bytes_sent / fragments, rate_bps, n, latency_s)
    return fragments * max(0.0, frag - overlap * step_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--islands", type=int, default=14,
                    help="ring members N for the 10B run (INTELLECT-1: 4 at the start, 14 at peak)")
    ap.add_argument("--prime-link-efficiency", type=float, default=PRIME_LINK_EFFICIENCY,
                    help="fraction of the link rate PRIME's all-reduce achieved (INTELLECT-1 report: ~0.16)")
    ap.add_argument("--max-link-gbps", type=float, default=MAX_LINK_GBPS,
                    help="cap on the implied link rate (INTELLECT-1 report: links were 0.5-4 Gbit/s)")
    ap.add_argument("--link-efficiency", type=float, default=None,
                    help="our achieved fraction of the link rate (overrides --reduce-gbps and the loopback codec)")
    ap.add_argument("--reduce-gbps", type=float, default=None,
                    help="our measured reduce rate, Gbit/s of payload on the wire per member (capped by the link)")
    ap.add_argument("--latency-ms", type=float, nargs=3, default=None, metavar=("USA", "USA_EU", "GLOBAL"),
                    help="one-way latency per scenario (default 30 60 120 ms, assumed)")
    ap.add_argument("--inner-step-seconds", type=float, default=None,
                    help="inner-step time of --preset measured elsewhere (default: measure it here)")
    ap.add_argument("--preset", default=str(common.ROOT / "configs" / "debug.toml"),
                    help="preset for table 2 (default configs/debug.toml, measured on this machine)")
    ap.add_argument("--H", type=int, default=None, help="inner steps per outer step for table 2 (default: preset)")
    ap.add_argument("--measure-steps", type=int, default=10)
    ap.add_argument("--fragments", type=int, default=4, help="streaming columns: fragments P (default 4)")
    ap.add_argument("--overlap", type=int, default=1, help="streaming columns: overlap steps tau (default 1)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    if args.inner_step_seconds is None:
        common.force_cpu_devices(8)  # the debug preset's 4 islands x 2 devices

    from intellect_jax import collective
    from intellect_jax.config import load_config
    from intellect_jax.info import count_params

    t_all = time.perf_counter()
    latency = dict(zip(REPORT, args.latency_ms)) if args.latency_ms else DEFAULT_LATENCY_MS
    latency_s = {k: v / 1e3 for k, v in latency.items()}
    n = args.islands

    # Our achieved rate as a function of the link rate (bit/s).
    raw_rate = codec_rate = None
    if args.link_efficiency is not None:
        ours_src = f"--link-efficiency {args.link_efficiency:g} (given)"
        ours = lambda link: args.link_efficiency * link  # noqa: E731
    elif args.reduce_gbps is not None:
        ours_src = f"min(--reduce-gbps {args.reduce_gbps:g} (given), link rate)"
        ours = lambda link: min(args.reduce_gbps * 1e9, link)  # noqa: E731
    else:
        raw_rate, codec_rate = loopback_codec_rate()
        eff = MEASURED_RING_EFFICIENCY
        ours_src = (f"min({eff:g} x link rate, loopback codec rate {codec_rate * 8 / 1e9:.2f} Gbit/s): {eff:g} is our "
                    "ring's measured fraction of the link-rate bound on tbf 1 Gbit/s links, 1 GB, median of 3 "
                    "(RESULTS.md, Link "
                    "utilization: tbf 1gbit, encrypted); the codec rate is int8 payload bytes/s through pack -> TCP "
                    "send -> recv -> the ring's fused hop (decode + add + re-pack) on 127.0.0.1, one sender and one "
                    "receiver thread on the codec thread pool, measured here (raw "
                    f"loopback TCP: {raw_rate * 8 / 1e9:.2f} Gbit/s)")
        ours = lambda link: min(eff * link, codec_rate * 8)  # noqa: E731

    # Table 1: the 10B run.
    cfg10 = load_config(common.ROOT / "configs" / "intellect1-10b.toml")
    p10 = count_params(cfg10.model).total_params
    sent10 = collective.wire_bytes_per_island(p10, n, "int8", BLOCK)
    compute10 = REPORT_COMPUTE_S * REPORT_H / 100
    rows1 = []
    predictions = {}
    capped = []

    # PRIME's published efficiency is payload / rate / time; prime_rate below is bytes *sent* per member / time, so
    # the same bound definition on both sides needs PRIME's efficiency x 2(N-1)/N.
    prime_eff = args.prime_link_efficiency * 2 * (n - 1) / n

    def implied_link(prime_rate: float) -> float:
        return max(prime_rate, min(prime_rate / prime_eff, args.max_link_gbps * 1e9))

    for name, (t_report, util_report) in REPORT.items():
        prime_rate = sent10 * 8 / t_report  # bit/s, latency folded in
        link = implied_link(prime_rate)
        if link < prime_rate / prime_eff:
            capped.append(name)
        model_util = compute10 / (compute10 + t_report)
        our_sync = sync_seconds(sent10, ours(link), n, latency_s[name])
        bound_sync = sync_seconds(sent10, link, n, latency_s[name])
        predictions[name] = compute10 / (compute10 + our_sync)
        step10 = compute10 / REPORT_H
        stream = {label: compute10 / (compute10 + streaming_wait(sent10, rate, n, latency_s[name], args.fragments,
                                                                  args.overlap, step10))
                  for label, rate in (("prime", prime_rate), ("ours", ours(link)))}
        rows1.append([name, f"{t_report:.0f}", f"{util_report:.1f}%", f"{100 * model_util:.1f}%",
                      f"{prime_rate / 1e9:.2f}",
                      f"{link / 1e9:.2f}" + (" (cap)" if name in capped else ""), f"{ours(link) / 1e9:.2f}",
                      f"{our_sync:.0f}", f"{100 * predictions[name]:.1f}%", f"{bound_sync:.0f}",
                      f"{100 * compute10 / (compute10 + bound_sync):.1f}%", f"{100 * stream['prime']:.1f}%",
                      f"{100 * stream['ours']:.1f}%"])
    stream_head = f"streaming P={args.fragments} tau={args.overlap}"
    head1 = ["scenario", "report median all-reduce s", "report utilization", "model (report's time)",
             "PRIME achieved Gbit/s", "implied link Gbit/s", "ours achieved Gbit/s", "ours sync s",
             "ours utilization", "link-bound sync s", "link-bound utilization",
             f"{stream_head}, PRIME's rate", f"{stream_head}, ours"]
    tab1 = common.table(head1, rows1)
    notes1 = (f"10B run: {p10 / 1e9:.2f}B params (configs/intellect1-10b.toml), int8 payload "
              f"{sent10 / (2 * (n - 1) / n) / 1e9:.2f} GB (codes + fp32 scale per {BLOCK}), N={n} ring members -> "
              f"{sent10 / 1e9:.2f} GB sent per member per outer step; compute {compute10:.0f} s per outer step "
              f"(H={REPORT_H}, 38 min per 100 inner steps). 'PRIME achieved' = bytes sent / the report's median "
              f"all-reduce time (its latency folded in). 'Implied link' = PRIME achieved / {prime_eff:.3f} "
              f"(PRIME's published link efficiency {args.prime_link_efficiency:g}, defined as payload / rate / time, "
              f"times 2(N-1)/N = {2 * (n - 1) / n:.3f} so that both sides use our bound definition, bytes sent per "
              f"member / rate; assumed to hold in every "
              f"scenario; the report gives no link rates per scenario, only 0.5-4 Gbit/s overall), capped at "
              f"{args.max_link_gbps:g} Gbit/s"
              + (f" (capped: {', '.join(capped)}, where PRIME must have achieved more than "
                 f"{prime_eff:.3f} of its link)" if capped else "") + ". 'Ours achieved' "
              f"= {ours_src}. Latency term: 2(N-1) x one-way latency, assumed "
              + ", ".join(f"{k} {v:g} ms" for k, v in latency.items())
              + ". 'Link-bound' = the same model at 100% of the implied link rate. No overlap of sync and compute "
              "(INTELLECT-1 and a blocking outer step) except in the streaming columns: P fragments of 1/P of the "
              f"bytes, each reduce hidden behind tau={args.overlap} inner steps of {compute10 / REPORT_H:.1f} s "
              "(model, not measured: it assumes the reduce runs beside the compute without slowing it; the elastic "
              "TCP ring's measured streaming utilization on this machine, where the ring shares 2 cores with 3 "
              "islands' compute, is in 'Streaming utilization (elastic, 20mbit)').")

    # Table 2: a preset measured on this machine (or a given step time).
    preset = Path(args.preset)
    if args.inner_step_seconds is None:
        step_s, cfgp = measure_inner_step(preset, args.measure_steps, [])
        step_src = f"measured here (median of {args.measure_steps} steps after compile)"
    else:
        step_s, cfgp = args.inner_step_seconds, load_config(preset)
        step_src = "given (--inner-step-seconds)"
    H = args.H or cfgp.diloco.inner_steps
    np_ = count_params(cfgp.model).total_params
    islands_p = max(cfgp.mesh.islands, 2)
    sentp = collective.wire_bytes_per_island(np_, islands_p, "int8", BLOCK)
    rows2 = []
    for name, (t_report, _) in REPORT.items():
        link = implied_link(sent10 * 8 / t_report)
        for label, rate in (("PRIME's rate", sent10 * 8 / t_report), ("ours", ours(link))):
            s = sync_seconds(sentp, rate, islands_p, latency_s[name])
            rows2.append([name, label, f"{rate / 1e9:.2f}", f"{H * step_s:.1f}", f"{s:.2f}",
                          f"{100 * H * step_s / (H * step_s + s):.1f}%"])
    tab2 = common.table(["scenario", "rate", "Gbit/s", "compute s / outer step", "sync s", "utilization"], rows2,
                        "llrrrr")
    notes2 = (f"Preset {preset.name}: {np_ / 1e6:.2f}M params, {islands_p} islands, H={H}, inner step "
              f"{step_s:.3f} s {step_src}, int8 sync sends {sentp / 1e6:.3f} MB per island per outer step.")
    seconds = time.perf_counter() - t_all
    out = "\n\n".join(["INTELLECT-1 10B, report vs model vs our reduce:", tab1, notes1,
                       f"The same model for {preset.name} on this hardware:", tab2, notes2])
    print(out)
    print(f"\ntotal {seconds:.0f} s")
    if not args.no_write:
        parts = [common.provenance(seconds), out]
        if _can_plot():
            parts.append(_plot(predictions))
        common.write_section("Compute utilization model", "\n\n".join(parts))
        print(f"wrote {common.RESULTS}")
    return 0


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(predictions: dict[str, float]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(REPORT)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [REPORT[k][1] for k in names], 0.4, label="INTELLECT-1 report")
    ax.bar([i + 0.2 for i in x], [100 * predictions[k] for k in names], 0.4, label="model, our reduce")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("compute utilization (%)")
    ax.set_ylim(50, 100)
    ax.legend(loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    path = common.save_plot(fig, "utilization_model.png")
    plt.close(fig)
    return f"![utilization]({path})"


if __name__ == "__main__":
    sys.exit(main())
