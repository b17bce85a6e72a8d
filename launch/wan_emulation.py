"""WAN emulation with Linux network namespaces, veth pairs and tbf rate limits (netem is not available here).

Topology (all inside namespaces this script creates; the root namespace's network is not touched)::

    ns <tag>sw : bridge br0 (10.77.0.254/24)  -- the "internet"; the coordinator can live here
    ns <tag>0  : eth0 10.77.0.1/24  --veth-- br0     tbf <rate> on eth0 (uplink) and on the bridge port (downlink)
    ns <tag>1  : eth0 10.77.0.2/24  --veth-- br0
    ...

So every island has a <rate> access link in each direction, as a node on a shared internet would. The tbf bucket
(``burst``) defaults to 4 ms of the rate (at least 64 KiB): a bucket smaller than the kernel's timer tick can refill
caps the achieved rate below the configured one (measured here on a 3-island raw TCP ring, 4 streams per link: burst
64 KiB at 1gbit gave 0.60 Gbit/s, 256 KiB or more 0.96 Gbit/s; at 100mbit 64 KiB already gives the rate).

    sudo python launch/wan_emulation.py up --islands 3 --rate 100mbit --tag ijw   # prints the namespaces / IPs
    sudo ip netns exec ijw0 python tests/sim_island.py ...
    sudo python launch/wan_emulation.py down --tag ijw
    sudo python launch/wan_emulation.py demo --islands 3 --rate 100mbit   # coordinator + 3 sim islands

Library use: ``with Topology(3, "100mbit") as topo: topo.exec_cmd(i, [...])``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import uuid
from pathlib import Path

SUBNET = "10.77.0"
# The numpy stand-in island the demo runs (a test helper: it drives IslandClient as the trainer does).
SIM_ISLAND = Path(__file__).resolve().parents[1] / "tests" / "sim_island.py"


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def netns_available() -> tuple[bool, str]:
    """Whether we may create namespaces, veths and tbf qdiscs (root + iproute2 + sch_tbf); with the reason if not."""
    if os.geteuid() != 0:
        return False, "needs root"
    tag = "ijp" + uuid.uuid4().hex[:5]
    try:
        subprocess.run(["ip", "netns", "add", tag], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return False, f"`ip netns add` not permitted: {getattr(e, 'stderr', e)}"
    try:
        _ip("ip", "link", "add", "p0", "type", "veth", "peer", "name", "p1", ns=tag)
        _ip("tc", "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "100mbit", "burst", "64kb", "latency",
            "100ms", ns=tag)
        return True, ""
    except subprocess.CalledProcessError as e:
        return False, f"veth/tbf not permitted: {e.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", tag], capture_output=True)


def rate_bytes_per_s(rate: str) -> float:
    """tc rate string (e.g. '100mbit', '1gbit', '512kbit') -> bytes per second."""
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
    for u, f in units.items():
        if rate.lower().endswith(u) and rate[: -len(u)].replace(".", "", 1).isdigit():
            return float(rate[: -len(u)]) * f
    raise ValueError(f"rate {rate!r}: use a number with kbit, mbit or gbit, e.g. 100mbit")


def default_burst(rate: str) -> str:
    """tbf bucket for `rate`: 4 ms of traffic, at least 64 KiB (see the module docstring)."""
    return f"{max(64 << 10, int(rate_bytes_per_s(rate) * 0.004)) >> 10}kb"


class Topology:
    def __init__(self, islands: int, rate: str = "100mbit", tag: str | None = None, burst: str | None = None):
        if not 1 <= islands <= 250:
            raise ValueError("islands must be in 1..250")
        self.n, self.rate, self.burst = islands, rate, burst or default_burst(rate)
        self.tag = tag or "ij" + uuid.uuid4().hex[:4]
        self.switch = f"{self.tag}sw"
        self.namespaces = [f"{self.tag}{i}" for i in range(islands)]
        self.ips = [f"{SUBNET}.{i + 1}" for i in range(islands)]
        self.switch_ip = f"{SUBNET}.254"

    def up(self) -> "Topology":
        try:
            subprocess.run(["ip", "netns", "add", self.switch], check=True, capture_output=True)
            _ip("ip", "link", "set", "lo", "up", ns=self.switch)
            _ip("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
            _ip("ip", "addr", "add", f"{self.switch_ip}/24", "dev", "br0", ns=self.switch)
            _ip("ip", "link", "set", "br0", "up", ns=self.switch)
            for i, ns in enumerate(self.namespaces):
                subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
                _ip("ip", "link", "set", "lo", "up", ns=ns)
                inner, outer = f"{self.tag}i{i}", f"{self.tag}o{i}"
                # Create the pair inside the switch namespace, then move one end: the root netns is never used.
                _ip("ip", "link", "add", inner, "type", "veth", "peer", "name", outer, ns=self.switch)
                _ip("ip", "link", "set", inner, "netns", ns, ns=self.switch)
                _ip("ip", "link", "set", inner, "name", "eth0", ns=ns)
                _ip("ip", "addr", "add", f"{self.ips[i]}/24", "dev", "eth0", ns=ns)
                _ip("ip", "link", "set", "eth0", "up", ns=ns)
                _ip("ip", "link", "set", outer, "master", "br0", ns=self.switch)
                _ip("ip", "link", "set", outer, "up", ns=self.switch)
                tbf = ["root", "tbf", "rate", self.rate, "burst", self.burst, "latency", "100ms"]
                _ip("tc", "qdisc", "add", "dev", "eth0", *tbf, ns=ns)  # uplink
                _ip("tc", "qdisc", "add", "dev", outer, *tbf, ns=self.switch)  # downlink
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for ns in [*self.namespaces, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def exec_cmd(self, i: int | None, argv: list[str]) -> list[str]:
        """argv prefixed to run inside island i's namespace (None: the switch namespace)."""
        return ["ip", "netns", "exec", self.switch if i is None else self.namespaces[i], *argv]

    def __enter__(self) -> "Topology":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def describe(self) -> str:
        rows = [f"switch {self.switch}: br0 {self.switch_ip}"]
        rows += [f"island {i}: netns {ns} eth0 {ip} (tbf {self.rate} burst {self.burst} up and down)"
                 for i, (ns, ip) in enumerate(zip(self.namespaces, self.ips))]
        return "\n".join(rows)


def _demo(a: argparse.Namespace) -> int:
    """Runs tests/sim_island.py in each island namespace, the coordinator on the switch."""
    import json
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="wan-demo-"))
    py, port = sys.executable, 7100
    subprocess.run([py, "-m", "intellect_jax", "secret", "--out", str(tmp / "secret")], check=True,
                   stdout=subprocess.DEVNULL)
    with Topology(a.islands, a.rate) as topo:
        print(topo.describe())
        coord = subprocess.Popen(topo.exec_cmd(None, [
            py, "-m", "intellect_jax", "coordinator", "--bind", f"{topo.switch_ip}:{port}", "--secret-file",
            str(tmp / "secret"), "--min-islands", str(a.islands)]), stderr=open(tmp / "coordinator.log", "w"))
        islands = [subprocess.Popen(topo.exec_cmd(i, [
            py, str(SIM_ISLAND), "--coordinator", f"{topo.switch_ip}:{port}",
            "--listen", f"{topo.ips[i]}:0", "--secret-file", str(tmp / "secret"), "--name", f"island{i}",
            "--seed", str(i), "--dim", str(a.dim), "--steps", str(a.steps), "--compression", a.compression,
            "--inner-s", "0.5", "--dead-after-s", "10", "--out", str(tmp / f"island{i}.jsonl")]),
            stderr=open(tmp / f"island{i}.log", "w")) for i in range(a.islands)]
        rc = max(p.wait(600) for p in islands)
        coord.terminate()
        coord.wait(10)
    n = a.islands
    payload = a.dim * 4 if a.compression == "none" else a.dim + 4 * a.dim // 256
    rate = float(a.rate.lower().removesuffix("mbit")) * 1e6 / 8 if a.rate.lower().endswith("mbit") else 0.0
    bound = 2 * (n - 1) / n * payload / rate if rate else float("nan")
    for i in range(n):
        for line in (tmp / f"island{i}.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e["event"] == "step":
                print(f"island{i} outer step {e['step']}: reduce {e['seconds']:.3f} s (bound {bound:.3f} s, "
                      f"{bound / e['seconds']:.0%} of link rate), params hash {e['hash'][:16]}")
    print(f"logs in {tmp}")
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--islands", type=int, default=3)
    up.add_argument("--rate", default="100mbit")
    up.add_argument("--tag", default="ijw")
    down = sub.add_parser("down")
    down.add_argument("--tag", default="ijw")
    down.add_argument("--islands", type=int, default=250)
    sub.add_parser("check")
    demo = sub.add_parser("demo", help="coordinator + numpy sim islands on rate-limited links; prints reduce times")
    demo.add_argument("--islands", type=int, default=3)
    demo.add_argument("--rate", default="100mbit")
    demo.add_argument("--dim", type=int, default=2_500_000)
    demo.add_argument("--steps", type=int, default=3)
    demo.add_argument("--compression", default="int8", choices=("int8", "none"))
    a = ap.parse_args(argv)
    if a.cmd == "demo":
        return _demo(a)
    if a.cmd == "check":
        ok, why = netns_available()
        print("netns + tbf available" if ok else f"not available: {why}")
        return 0 if ok else 1
    topo = Topology(a.islands, getattr(a, "rate", "100mbit"), a.tag)
    if a.cmd == "up":
        topo.up()
        print(topo.describe())
    else:
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for ns in existing:
            if ns == topo.switch or (ns.startswith(a.tag) and ns[len(a.tag):].isdigit()):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
