"""Three islands in their own network namespaces on 100 Mbit/s tbf access links (root only; skipped otherwise).

All addresses live inside namespaces the test creates (10.77.0.0/24 on a bridge in its own namespace); the root
namespace's network is untouched.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from wan_emulation import Topology, netns_available  # noqa: E402

from test_elastic_e2e import Run, check_run  # noqa: E402

pytestmark = pytest.mark.netns

RATE_BYTES = 100e6 / 8
DIM = 2_500_000  # 10 MB of fp32; 2.54 MB as int8 codes + scales


@pytest.fixture(scope="module")
def topo():
    ok, why = netns_available()
    if not ok:
        pytest.skip(f"netns/tbf unavailable: {why}")
    with Topology(3, "100mbit") as t:
        yield t


def test_three_islands_on_100mbit_tbf_links(topo, tmp_path):
    run = Run(tmp_path, dead_after_s=5.0, dim=DIM,
              hosts=lambda i: topo.switch_ip if i is None else topo.ips[i],
              prefix=lambda i: topo.exec_cmd(i, []))
    try:
        run.start_coordinator(min_islands=3)
        steps = 3
        for i, n in enumerate("abc"):
            run.start_island(n, 40 + i, steps, inner_s=0.5, index=i)
        for n in "abc":
            run.wait_exit(n, timeout=120)
        by_step = check_run(run, "abc", steps)
    finally:
        run.stop()
    payload = DIM + 4 * DIM // 256
    bound = 2 * 2 / 3 * payload / RATE_BYTES
    times = [e["seconds"] for n in "abc" for e in run.events(n, "step")]
    print(f"\nreduce of {payload / 1e6:.2f} MB int8 payload, 3 islands, 100 Mbit/s tbf: "
          f"{min(times):.3f}-{max(times):.3f} s vs bound {bound:.3f} s "
          f"({bound / min(times):.0%} of link rate at best)")
    assert all(sorted(e["members"]) == ["a", "b", "c"] for e in by_step.values())
    # The links really are rate-limited (a loopback-speed reduce would take ~0.05 s).
    assert min(times) > 0.9 * bound
