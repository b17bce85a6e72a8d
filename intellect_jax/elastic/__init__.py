"""Cross-island layer for islands that are separate programs (the internet case). Host-side only: no jax.

identity     per-island Ed25519 keys and the operator's islands file (who is admitted, under which name)
wire         framed, versioned messages; an X25519 + Ed25519 handshake, then AES-256-GCM per connection and direction
protocol     the coordinator's state machine: epochs, votes, deadlines, quarantine, recovery (no sockets)
coordinator  its I/O: membership, heartbeats, the islands file re-read live; restartable (`intellect-jax coordinator`)
ring         int8 / int4 (or fp32) ring all-reduce of the pseudo-gradients, fp32 accumulation; the all-gather
             forwards the owners' bytes verbatim, so the result is bit-identical on every member
plan         reduce plans: who sends which segment to whom in which round (the ring is the first topology)
executor     runs any plan over TCP streams: threads, in-flight window, rate deadline, cancellation, errors
ordering     bandwidth-aware ring order (maximise the slowest link)
recovery     live state transfer from a live island, resumable across sources
client       IslandClient: join / all_reduce_mean / commit / fetch_state / close
status       the operator view: the coordinator's /metrics, /status.json and status page; `intellect-jax status`

Settings come from ``intellect_jax.config.ElasticConfig``. A numpy stand-in island that drives IslandClient like the
trainer (for the end-to-end tests and the WAN demo) lives in tests/sim_island.py.
"""

from .client import ElasticError, IslandClient, JoinInfo, NotAdmitted, ReduceFailed, StaleStep
from .recovery import State, params_hash

__all__ = ["ElasticError", "IslandClient", "JoinInfo", "NotAdmitted", "ReduceFailed", "StaleStep", "State",
           "params_hash"]
