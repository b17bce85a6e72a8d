"""Ring all-reduce benchmark: achieved reduce time vs the link-rate bound 2 (N-1)/N x payload / rate.

Each member is its own process (``member`` sub-command) with its own listener; members connect to their ring
successor with ``--streams`` TCP connections, run a one-block reduce as a barrier, then time the reduce of a float32
vector (``--sizes-mb``: fp32 megabytes, 1e6 bytes) with int8 and fp32 payloads. All members must end with the same
bytes (SHA-256 compared). Payload = bytes one member's vector occupies on the wire (int8: codes + scales).

    python benchmarks/ring_allreduce.py --members 3 --sizes-mb 10,50,200            # loopback (127.0.0.1)
    sudo python benchmarks/ring_allreduce.py --members 3 --wan 100mbit --sizes-mb 10 # netns + tbf links

On loopback the "rate" is a measured single-stream raw TCP rate between two processes (no framing, no HMAC), so the
bound shows how far framing, AES-GCM (or HMAC with ``--encrypt off``), packing and accumulation are from moving
bytes at memory speed; with ``--wan``
the rate is the tbf rate of each island's access link.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

from intellect_jax import quant  # noqa: E402
from intellect_jax.elastic import identity, ring, wire  # noqa: E402

RUN = "ring-bench"
BLOCK = 256


def payload_bytes(n: int, compression: str) -> int:
    return 4 * n if compression == "none" else n + 4 * (-(-n // BLOCK))


# --------------------------------------------------------------------------------------------------------------------
# One ring member (a process).


def member(a: argparse.Namespace) -> int:
    secret = bytes.fromhex(a.secret_hex)
    me = identity.secret_auth(secret, f"m{a.rank}")
    addrs = a.addrs.split(",")
    N, r = len(addrs), a.rank
    maxf = 64 << 20
    inbox: list[wire.Conn] = []
    got = threading.Condition()

    def handler(conn, hello):
        with got:
            inbox.append((int(hello["stream"]), conn))
            got.notify_all()
        return True

    encrypt = a.encrypt == "on"
    srv = wire.Server(a.bind or addrs[r], me, RUN, maxf, handler, "bench", encrypt=encrypt).start()
    send = []
    deadline = time.monotonic() + 60
    for k in range(a.streams):
        while True:
            try:
                send.append(wire.connect(addrs[(r + 1) % N], me, f"m{(r + 1) % N}", RUN, maxf, hello={"stream": k},
                                         timeout=10, encrypt=encrypt)[0])
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    with got:
        got.wait_for(lambda: len(inbox) == a.streams, 60)
    recv = [c for _, c in sorted(inbox, key=lambda t: t[0])]
    epoch = 0
    for mb in [float(s) for s in a.sizes_mb.split(",")]:
        n = int(mb * 1e6 / 4)
        vec = np.random.default_rng(r).standard_normal(n).astype(np.float32)
        for comp in a.compression.split(","):
            codec = ring.make_codec(comp, BLOCK)
            inp = vec
            if a.codes == "device":  # what an accelerator island hands the ring: its codes, packed before the sync
                padded = np.zeros(-(-n // BLOCK) * BLOCK, np.float32)
                padded[:n] = vec
                inp = ring.Packed(*quant.pack_np(padded, bits=codec.bits, block_size=BLOCK), n)
                del padded
            def barrier(ep: int) -> None:  # a one-block reduce
                ring.ring_mean(np.zeros(BLOCK, np.float32), r, send, recv, N, codec, a.chunk_bytes, BLOCK,
                               timeout=120, epoch=ep)

            for rep in range(a.repeats):
                epoch += 1
                barrier(-epoch)
                out, st = ring.ring_mean(inp, r, send, recv, N, codec, a.chunk_bytes, BLOCK, timeout=120,
                                         epoch=epoch, packed_out=a.codes == "device")
                barrier(-epoch - 10**6)  # every member done before any hashes its result
                h = hashlib.sha256()
                for part in ((out.codes, out.scales) if a.codes == "device" else (out,)):
                    h.update(memoryview(part).cast("B"))
                print(json.dumps({"rank": r, "mb": mb, "n": n, "compression": comp, "repeat": rep,
                                  "seconds": st.seconds, "sha": h.hexdigest()}), flush=True)
                del out
    srv.close()
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Driver.


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def loopback_tcp_rate(nbytes: int = 512 << 20) -> float:
    """Single-stream raw TCP throughput between two processes on 127.0.0.1 (bytes/s)."""
    port = _free_port()
    code = (f"import socket,time\ns=socket.create_server(('127.0.0.1',{port}));c,_=s.accept();n=0;b=bytearray(1<<20)\n"
            f"while n<{nbytes}:\n k=c.recv_into(b)\n if not k: break\n n+=k\nc.sendall(b'x')")
    p = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.3)
    c = socket.create_connection(("127.0.0.1", port))
    buf = bytes(1 << 20)
    t0 = time.perf_counter()
    for _ in range(nbytes >> 20):
        c.sendall(buf)
    c.recv(1)
    dt = time.perf_counter() - t0
    p.wait(10)
    return nbytes / dt


_RAW_RECV = ("import socket,sys,threading\ns=socket.create_server(('0.0.0.0',{port}));cs=[s.accept()[0] for _ in "
             "range({streams})]\ndef rd(c):\n b=bytearray(1<<20)\n while c.recv_into(b): pass\n"
             "ts=[threading.Thread(target=rd,args=(c,)) for c in cs];[t.start() for t in ts];[t.join() for t in ts]")
_RAW_SEND = ("import socket,threading,time\ncs=[]\nfor _ in range({streams}):\n while True:\n  try: cs.append("
             "socket.create_connection(('{host}',{port}))); break\n  except OSError: time.sleep(0.1)\n"
             "b=bytes(1<<20)\ndef wr(c):\n for _ in range({mib}//{streams}): c.sendall(b)\n c.close()\n"
             "ts=[threading.Thread(target=wr,args=(c,)) for c in cs];t0=time.perf_counter()\n"
             "[t.start() for t in ts];[t.join() for t in ts];print(({mib}//{streams})*{streams}*2**20/"
             "(time.perf_counter()-t0))")


def raw_ring_rate(topo, streams: int, mib: int = 256, port: int = 7100) -> float:
    """Raw TCP (no framing, no codec) bytes/s per island when every island sends to its ring successor at once
    over the emulated links, `streams` connections each: what the links themselves deliver to the ring's pattern."""
    n = len(topo.ips)
    recv = [subprocess.Popen(topo.exec_cmd(i, [sys.executable, "-c", _RAW_RECV.format(port=port, streams=streams)]))
            for i in range(n)]
    send = [subprocess.Popen(topo.exec_cmd(i, [sys.executable, "-c", _RAW_SEND.format(
        host=topo.ips[(i + 1) % n], port=port, streams=streams, mib=mib)]), stdout=subprocess.PIPE, text=True)
        for i in range(n)]
    rates = [float(p.communicate(timeout=600)[0]) for p in send]
    for p in recv:
        p.wait(60)
    return min(rates)


def run_ring(addrs: list[str], prefixes: list[list[str]], a: argparse.Namespace, binds: list[str] | None = None,
             ) -> list[dict]:
    """Every --streams value in turn; rows carry their "streams"."""
    rows = []
    for streams in [int(v) for v in str(a.streams).split(",")]:
        rows += [dict(r, streams=streams) for r in _run_ring(addrs, prefixes, argparse.Namespace(
            **dict(vars(a), streams=streams)), binds)]
    return rows


def _run_ring(addrs: list[str], prefixes: list[list[str]], a: argparse.Namespace, binds: list[str] | None,
              ) -> list[dict]:
    secret = os.urandom(32).hex()
    procs = []
    for r, addr in enumerate(addrs):
        cmd = prefixes[r] + [sys.executable, str(Path(__file__).resolve()), "member", "--rank", str(r),
                             "--bind", binds[r] if binds else addr, "--addrs",
                             ",".join(addrs), "--secret-hex", secret, "--sizes-mb", a.sizes_mb, "--compression",
                             a.compression, "--streams", str(a.streams), "--chunk-bytes", str(a.chunk_bytes),
                             "--repeats", str(a.repeats), "--encrypt", a.encrypt, "--codes", a.codes]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    rows = []
    for p in procs:
        out, _ = p.communicate(timeout=a.timeout)
        if p.returncode:
            raise RuntimeError(f"member exited with {p.returncode}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def summarize(rows: list[dict], N: int, rate: float, rate_label: str) -> list[dict]:
    out = []
    keys = sorted({(r["streams"], r["mb"], r["compression"]) for r in rows})
    for streams, mb, comp in keys:
        sel = [r for r in rows if (r["streams"], r["mb"], r["compression"]) == (streams, mb, comp)]
        reps = sorted({r["repeat"] for r in sel})
        per_rep = [max(r["seconds"] for r in sel if r["repeat"] == k) for k in reps]
        shas = {r["sha"] for r in sel if r["repeat"] == reps[-1]}
        payload = payload_bytes(sel[0]["n"], comp)
        bound = 2 * (N - 1) / N * payload / rate
        best = min(per_rep)
        out.append({"members": N, "streams": streams, "fp32_mb": mb, "compression": comp, "payload_mb": payload / 1e6,
                    "seconds_best": best, "seconds_median": float(np.median(per_rep)), "seconds_each": per_rep, "bound_s": bound,
                    "fraction_of_link_rate": bound / best, "bit_identical": len(shas) == 1, "rate": rate_label})
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "member":
        mp = argparse.ArgumentParser()
        mp.add_argument("--rank", type=int, required=True)
        mp.add_argument("--addrs", required=True)
        mp.add_argument("--bind", default="", help="listen here (default: our entry of --addrs)")
        mp.add_argument("--secret-hex", required=True)
        mp.add_argument("--sizes-mb", required=True)
        mp.add_argument("--compression", required=True)
        mp.add_argument("--streams", type=int, required=True)
        mp.add_argument("--chunk-bytes", type=int, required=True)
        mp.add_argument("--repeats", type=int, required=True)
        mp.add_argument("--encrypt", choices=("on", "off"), required=True)
        mp.add_argument("--codes", choices=("host", "device"), required=True)
        return member(mp.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--sizes-mb", default="10,50,200", help="fp32 vector sizes in MB (1e6 bytes)")
    ap.add_argument("--compression", default="int8,none")
    ap.add_argument("--streams", default="4", help="TCP streams per link; a list (1,4,8) runs each in turn")
    ap.add_argument("--chunk-bytes", type=int, default=4 << 20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--wan", default="", help="e.g. 100mbit: run in netns islands with tbf links (root)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="with --wan: one-way delay added to every link by "
                    "a user-space relay in front of each member (launch/delay_relay.py; RTT = 2x)")
    ap.add_argument("--window-mb", type=float, default=4.0, help="with --delay-ms: TCP window per stream (MiB) the "
                    "relay emulates (Linux's default autotuned send window is 4 MiB)")
    ap.add_argument("--encrypt", choices=("on", "off"), default="on",
                    help="AES-256-GCM sealed frames (elastic.encrypt, the default) or HMAC only")
    ap.add_argument("--codes", choices=("host", "device"), default="host",
                    help="host: each member packs its fp32 vector and decodes the fp32 mean on the host (a CPU "
                    "island, elastic.device_codes off); device: each member starts from its codes and keeps the "
                    "mean's codes, as an accelerator island does (its device packs before the sync and decodes "
                    "after it, outside this timing); the hops' decode + add + re-pack run on the host either way")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default="", help="also write the summary rows here")
    ap.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    a = ap.parse_args(argv)
    if a.codes == "device" and "none" in a.compression.split(","):
        ap.error("--codes device needs --compression int8 or int4 (an fp32 ring has no codes); drop 'none'")
    t_start = time.perf_counter()
    N = a.members
    if a.wan:
        import wan_emulation
        with wan_emulation.Topology(N, a.wan) as topo:
            raw = raw_ring_rate(topo, max(int(v) for v in str(a.streams).split(",")))
            addrs = [f"{ip}:{7000}" for ip in topo.ips]
            relays, binds = [], None
            if a.delay_ms > 0:  # each member listens on its loopback; the relay on its link address forwards
                binds = ["127.0.0.1:7001"] * N
                relays = [subprocess.Popen(topo.exec_cmd(i, [
                    sys.executable, str(ROOT / "launch" / "delay_relay.py"), "--listen", addrs[i], "--to",
                    binds[i], "--delay-ms", str(a.delay_ms), "--window-mb", str(a.window_mb)]),
                    stdout=subprocess.PIPE, text=True) for i in range(N)]
                for r in relays:
                    r.stdout.readline()  # "relay ... -> ...": listening
            try:
                rows = run_ring(addrs, [topo.exec_cmd(i, []) for i in range(N)], a, binds)
            finally:
                for r in relays:
                    r.terminate()
                    r.wait(10)
        rate, label = wan_emulation.rate_bytes_per_s(a.wan), f"tbf {a.wan}"
        if a.delay_ms > 0:
            label += f", {a.delay_ms:g} ms one-way (RTT {2 * a.delay_ms:g} ms, window {a.window_mb:g} MiB/stream)"
        link_note = (f" tbf bucket {topo.burst}; raw TCP on these links in the ring's pattern (every island sending "
                     f"to its successor at once, no relay): {raw * 8 / 1e9:.3f} Gbit/s per island.")
    else:
        rate = loopback_tcp_rate()
        label = f"loopback raw TCP {rate / 1e9:.2f} GB/s"
        link_note = ""
        addrs = [f"127.0.0.1:{_free_port()}" for _ in range(N)]
        rows = run_ring(addrs, [[] for _ in range(N)], a)
    summary = summarize(rows, N, rate, label)
    print(f"# ring all-reduce, {N} members, chunk {a.chunk_bytes >> 20} MiB, rate: {label}, "
          f"encrypt {a.encrypt}, codes made on the {a.codes}")
    print(f"{'streams':>7} {'fp32 MB':>8} {'comp':>5} {'payload MB':>10} {'best s':>8} {'median s':>9} {'bound s':>8} "
          f"{'of rate':>8} {'identical':>9}")
    for s in summary:
        print(f"{s['streams']:7d} {s['fp32_mb']:8.0f} {s['compression']:>5} {s['payload_mb']:10.1f} "
              f"{s['seconds_best']:8.3f} {s['seconds_median']:9.3f} {s['bound_s']:8.3f} "
              f"{s['fraction_of_link_rate']:8.1%} {str(s['bit_identical']):>9}")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    if not a.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks import common

        body = common.table(
            ["streams", "fp32 MB", "mode", "payload MB", "best s", "median s", "bound s", "of link rate",
             "bit-identical"],
            [[s["streams"], f"{s['fp32_mb']:.0f}", s["compression"] + (", device codes" if a.codes == "device" else ""),
              f"{s['payload_mb']:.1f}",
              f"{s['seconds_best']:.3f}", f"{s['seconds_median']:.3f}", f"{s['bound_s']:.3f}",
              f"{s['fraction_of_link_rate']:.1%}", str(s["bit_identical"])] for s in summary])
        note = (f"{N} islands (separate processes), 'streams' TCP connections per link, frames "
                f"{'sealed with AES-256-GCM' if a.encrypt == 'on' else 'HMAC-SHA256 only (encrypt off)'}, chunk "
                f"{a.chunk_bytes >> 20} MiB, rate: {label}. Bound = 2(N-1)/N x payload / link rate (int8 payload "
                "includes the fp32 block scales). 'bit-identical': every member decoded the same mean bytes."
                + link_note
                + (" Device codes: every member starts from its int8 codes and ends with the mean's codes (an "
                   "accelerator island packs before and decodes after the sync on its device); the hops' decode, add "
                   "and re-pack run on the host." if a.codes == "device" else ""))
        common.write_section(f"Link utilization: {label if a.wan else 'loopback'}"
                             + (", encrypted" if a.encrypt == "on" else ", HMAC only")
                             + (", device codes" if a.codes == "device" else ""),
                             common.provenance(time.perf_counter() - t_start) + "\n\n" + body + "\n\n" + note)
    return 0 if all(s["bit_identical"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
