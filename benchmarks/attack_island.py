"""A dishonest island for benchmarks/attacks.py: tests/sim_island.py (the numpy stand-in that drives IslandClient as
the trainer does) with one behaviour turned against the run. Works with any build that has tests/sim_island.py (the
attacks are run against older builds too, to show what they did there).

    python benchmarks/attack_island.py --attack fail-rings -- <sim_island arguments>

--attack fail-rings   every reduce it is a member of, it reports failed (blaming its successor where it can)
--attack no-vote      it reduces, then never votes on the new hash (it keeps heartbeating)
--attack no-sync      it registers and heartbeats, but never comes to an outer step's sync
--attack trickle      it sends each ring frame just inside the per-frame timeout (dead_after_s - 0.3 s)
--attack huge-rtts    it reports a round trip of 1e308 s to every peer it probed
"""

from __future__ import annotations

import argparse
import sys
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attack", required=True, choices=["fail-rings", "no-vote", "no-sync", "trickle", "huge-rtts"])
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    rest = [x for x in a.rest if x != "--"]
    # The build under attack (its tests/ and intellect_jax/) comes first on PYTHONPATH (benchmarks/attacks.py).
    from intellect_jax.elastic import client, ring, wire
    from tests import sim_island

    if a.attack == "fail-rings":
        def fail(self, ep, vec, packed_out):
            try:
                raise ring.RingError("the attacker says the ring failed", "succ")
            except TypeError:  # an older RingError takes the message only
                raise ring.RingError("the attacker says the ring failed") from None
        client.IslandClient._ring = fail
    elif a.attack == "no-vote":
        client.IslandClient.commit = lambda self, *args, **kw: threading.Event().wait()
    elif a.attack == "no-sync":
        client.IslandClient.all_reduce_mean = lambda self, *args, **kw: threading.Event().wait()
    elif a.attack == "trickle":
        dead_after = float(rest[rest.index("--dead-after-s") + 1]) if "--dead-after-s" in rest else 3.0
        send = wire.Conn.send

        def slow_send(self, mtype, header=None, payload=b""):
            if mtype == wire.MsgType.DATA and isinstance(header, dict) and "p" in header:  # a ring frame
                time.sleep(max(0.1, dead_after - 0.3))
            return send(self, mtype, header, payload)
        wire.Conn.send = slow_send
    elif a.attack == "huge-rtts":
        def probe(self, peers, size):
            try:
                self._rpc("rates", retry=False, rates={p: 1e6 for p in peers}, rtts={p: 1e308 for p in peers})
            except Exception:  # noqa: BLE001 - refused: the attack failed
                pass
        client.IslandClient._probe = probe
    return sim_island.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
