"""Cross-island layer for islands that are separate programs (the internet case). Host-side only: no jax.

wire         framed, versioned, HMAC-authenticated messages
coordinator  membership, heartbeats, epochs, ring order; restartable (`intellect-jax coordinator`)
ring         int8 (or fp32) ring all-reduce whose result is bit-identical on every member
ordering     bandwidth-aware ring order (maximise the slowest link)
recovery     live state transfer from a live island, resumable across sources
client       IslandClient: join / all_reduce_mean / commit / fetch_state / close
sim_island   a numpy stand-in trainer island for tests, benchmarks and the WAN demo
"""

from .client import ElasticError, IslandClient, JoinInfo, ReduceFailed, StaleStep
from .recovery import State, params_hash

__all__ = ["ElasticError", "IslandClient", "JoinInfo", "ReduceFailed", "StaleStep", "State", "params_hash"]
