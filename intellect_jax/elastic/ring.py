"""Host-side ring all-reduce (mean) of a float32 vector among an epoch's members, over authenticated TCP.

Reduce-scatter then all-gather (Patarasuk & Yuan 2009), with two changes for slow links:

* reduce-scatter moves **int8 (or int4) codes + fp32 block scales** (``quant.pack_np``); each hop decodes, adds its own fp32
  values, and re-packs the partial sum (accumulation stays fp32). The owner of a segment divides by N and packs the
  mean once.
* all-gather **forwards the owner's packed bytes verbatim**, and every member (the owner too) decodes those same
  bytes, so the result is bit-identical on all members. PRIME re-quantized at every all-gather hop, so replicas
  could drift apart.

The ring is one reduce plan (``plan.ring_plan``: which segment goes to whom in which round) run by the generic
executor (``executor.run_plan``: streams, threads, the in-flight window, deadlines, cancellation, errors); this
module keeps the ring's entry point and its sequential reference, and re-exports the codecs and errors its callers
use. ``compression="none"`` sends raw fp32 the same way (for comparison; also bit-identical, since the all-gather
forwards the owner's fp32 bytes).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from intellect_jax import quant  # the numpy twin; imports no jax

from . import wire
from intellect_jax.codecs import BlockCodec, Codec, Fp32Codec, Packed, make_codec  # noqa: F401 - its public names
from .executor import CANCEL_POLL_S, RingError, RingStats, run_plan, window  # noqa: F401
from .plan import PIPELINE_DEPTH, Layout, make_layout, ring_plan  # noqa: F401


def _window(members: int, streams: int, chunk_wire_bytes: int) -> int:
    """The ring's in-flight window (``executor.window`` over its 2(N-1) rounds)."""
    return window(2 * (members - 1), streams, chunk_wire_bytes)


def ring_mean(vec: np.ndarray | Packed, rank: int, send: Sequence[wire.Conn], recv: Sequence[wire.Conn],
              members: int, codec: Codec, chunk_bytes: int, block_size: int, timeout: float,
              epoch: int = 0, cancel: Callable[[], str | None] | None = None, packed_out: bool = False,
              min_rate: float = 0.0) -> tuple[np.ndarray | Packed, RingStats]:
    """Mean of `vec` over the ring: ``executor.run_plan`` of ``ring_plan(members)`` as member `rank`. `send[k]` goes
    to the successor, `recv[k]` comes from the predecessor (stream k); see run_plan for the rest."""
    N = members
    if N > 1 and (len(send) != len(recv) or not send):
        raise ValueError("ring_mean needs the same positive number of send and recv streams")
    links_out = {(rank + 1) % N: list(send)} if N > 1 else {}
    links_in = {(rank - 1) % N: list(recv)} if N > 1 else {}
    return run_plan(vec, ring_plan(N), rank, links_out, links_in, codec, chunk_bytes, block_size, timeout,
                    epoch=epoch, cancel=cancel, packed_out=packed_out, min_rate=min_rate)


def reference_ring_mean(vecs: Sequence[np.ndarray | Packed], codec: Codec, chunk_bytes: int,
                        block_size: int, streams: int = 1) -> np.ndarray:
    """The same arithmetic as :func:`ring_mean`, sequentially in one process (ring order = list order), float32 out.

    For tests: the networked ring must equal this bit for bit (with `Packed` inputs too; all of one kind).
    """
    N = len(vecs)
    packed = isinstance(vecs[0], Packed)
    n = vecs[0].n if packed else vecs[0].size
    lay = make_layout(n, N, block_size, chunk_bytes, codec.bits, streams)
    enc = lambda a: memoryview(b"".join(codec.encode(a)))  # noqa: E731
    if packed:
        wires = [lambda lo, hi, v=v: memoryview(b"".join(np.ascontiguousarray(a).tobytes()
                                                         for a in v.parts(codec, lo, hi))) for v in vecs]
        xs = [np.concatenate([v.decode(codec), np.zeros(lay.padded - n, np.float32)]) for v in vecs]
    else:
        xs = [np.concatenate([np.asarray(v, np.float32), np.zeros(lay.padded - n, np.float32)]) for v in vecs]
        wires = [lambda lo, hi, x=x: enc(x[lo:hi]) for x in xs]
    out = np.empty(lay.padded, np.float32)
    for c in range(lay.chunks):
        for g in range(N):
            lo, hi = lay.span(g, c)
            # Segment g starts at member g (rs step 0) and is accumulated by g+1, g+2, ..., g+N-1 (its owner).
            blob = wires[g](lo, hi)
            for j in range(1, N):
                acc = codec.decode(blob, hi - lo) + xs[(g + j) % N][lo:hi]
                blob = enc(quant.mean_np(acc, N) if j == N - 1 else acc)
            out[lo:hi] = codec.decode(blob, hi - lo)
    return out[:n].copy()
