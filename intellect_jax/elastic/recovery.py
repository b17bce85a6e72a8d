"""Live state transfer: a joining or re-syncing island pulls global params + outer optimizer state from a live one.

The source serves from a background thread of its listener (its training loop keeps running): its
``state_provider()`` returns ``(arrays, meta)``, the latest committed state (the trainer replaces, never mutates,
those arrays). The transfer is chunked and pipelined (``window`` requests in flight); every array is verified end
to end with SHA-256 from the manifest (`array_digests`: pieces hashed in parallel). If the source dies mid-transfer the fetch continues from the next source,
keeping every array prefix whose SHA-256 in the new manifest is unchanged (same outer step -> nothing is re-sent).

Protocol on a connection opened with HELLO ``{"op": "state"}``:
  REQUEST {"op": "manifest"}                         -> REPLY {"meta", "arrays": [{name, dtype, shape, nbytes, sha256}]}
  REQUEST {"op": "chunk", "name", "offset", "length"} -> REPLY {} + raw bytes
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from intellect_jax import pools

from . import wire

log = logging.getLogger("intellect_jax.elastic.recovery")


class State(NamedTuple):
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]  # JSON; includes "outer_step" (completed outer steps) and "params_hash"


class TransferError(RuntimeError):
    pass


StateProvider = Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]


PIECE_BYTES = 64 << 20  # an array's bytes are hashed in pieces of this size, in parallel


def array_digests(arrays: dict[str, Any]) -> dict[str, str]:
    """Per array: SHA-256 over the SHA-256 of each PIECE_BYTES piece of its bytes (every piece of every array hashed
    in parallel). The state manifest carries these; the receiver recomputes them on what it got."""
    views = {k: memoryview(np.ascontiguousarray(a)).cast("B") for k, a in arrays.items()}
    pieces = [(k, off) for k, v in views.items() for off in range(0, max(len(v), 1), PIECE_BYTES)]
    sha = lambda kv: hashlib.sha256(views[kv[0]][kv[1]:kv[1] + PIECE_BYTES]).digest()  # noqa: E731
    out = {k: hashlib.sha256() for k in views}
    hashers = pools.pool("hash", min(16, pools.usable_cores()))
    digests = list(hashers.map(sha, pieces)) if len(pieces) > 1 else [sha(p) for p in pieces]
    for (k, _), d in zip(pieces, digests):
        out[k].update(d)
    return {k: h.hexdigest() for k, h in out.items()}


def params_hash(arrays: dict[str, np.ndarray], digests: dict[str, str] | None = None) -> str:
    """SHA-256 over names, dtypes, shapes and the arrays' digests (`array_digests`, computed unless given), in name
    order: equal iff the states are bit-identical (barring a SHA-256 collision)."""
    digests = array_digests(arrays) if digests is None else digests
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|{digests[name]}|".encode())
    return h.hexdigest()


def serve_state(conn: wire.Conn, provider: StateProvider, max_bytes_per_s: float = 0.0) -> None:
    """Answers manifest/chunk requests on `conn` until the peer closes. One snapshot per manifest request."""
    arrays: dict[str, np.ndarray] = {}
    sent, t0 = 0, time.monotonic()
    while True:
        mtype, req, _ = conn.recv()
        op = req.get("op")
        if op == "manifest":
            arrays, meta = provider()
            arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            meta = dict(meta)
            digests = meta.pop("array_digests", None) or array_digests(arrays)  # the snapshot's, when it has them
            man = [{"name": k, "dtype": v.dtype.str, "shape": list(v.shape), "nbytes": int(v.nbytes),
                    "sha256": digests[k]} for k, v in sorted(arrays.items())]
            conn.send(wire.MsgType.REPLY, {"meta": meta, "arrays": man})
            log.info("serving state (outer step %s, %d arrays, %.1f MB) to %s", meta.get("outer_step"),
                     len(man), sum(m["nbytes"] for m in man) / 1e6, conn.peer)
        elif op == "chunk":
            name, off, n = req.get("name"), req.get("offset"), req.get("length")
            a = arrays.get(name) if isinstance(name, str) else None
            if (a is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in (off, n))
                    or off < 0 or n < 0 or off + n > a.nbytes):
                conn.send(wire.MsgType.ERROR, {"error": f"bad chunk request {str(req)[:200]}"})
                continue
            conn.send(wire.MsgType.REPLY, {}, memoryview(a).cast("B")[off:off + n])
            sent += n
            if max_bytes_per_s > 0:  # keep the transfer from starving the source's own ring traffic
                ahead = sent / max_bytes_per_s - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        else:
            conn.send(wire.MsgType.ERROR, {"error": f"unknown state op {str(op)[:80]!r}"})


Layout = dict[str, tuple[str, tuple[int, ...]]]  # array name -> (numpy dtype str, shape)


def layout_of(arrays: dict[str, np.ndarray]) -> Layout:
    return {k: (np.asarray(v).dtype.str, tuple(np.shape(v))) for k, v in arrays.items()}


def check_manifest(man: Any, layout: Layout | None, source: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, arrays) of a manifest, refused (TransferError) unless every entry is well formed and, with `layout`,
    exactly the local model's arrays: names, dtypes and shapes, so no size the peer chose is ever allocated."""
    try:
        meta, arrays = man["meta"], man["arrays"]
        if not isinstance(meta, dict) or not isinstance(arrays, list):
            raise TypeError("meta must be an object and arrays a list")
        out = []
        for m in arrays:
            dt = np.dtype(m["dtype"])
            shape = tuple(int(d) for d in m["shape"])
            if dt.kind not in "fiub" or dt.hasobject or any(d < 0 for d in shape):
                raise ValueError(f"array {m['name']!r}: dtype {dt} / shape {shape} is not numeric state")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if int(m["nbytes"]) != nbytes or not isinstance(m["sha256"], str) or not isinstance(m["name"], str):
                raise ValueError(f"array {m['name']!r}: nbytes {m['nbytes']} does not match {dt} x {shape}")
            out.append({"name": m["name"], "dtype": dt.str, "shape": list(shape), "nbytes": nbytes,
                        "sha256": m["sha256"]})
        int(meta["outer_step"]), str(meta["params_hash"])
    except (KeyError, TypeError, ValueError) as e:
        raise TransferError(f"malformed state manifest from {source}: {e}") from None
    if layout is not None:
        theirs = {m["name"]: (m["dtype"], tuple(m["shape"])) for m in out}
        if theirs != layout:
            diff = sorted(set(theirs.items()) ^ set(layout.items()))[:3]
            raise TransferError(f"the state manifest of {source} does not match this island's model (first "
                                f"differences: {diff}); is it the same model and optimizer?")
    return meta, out


def fetch_state(sources: Iterable[tuple[str, str]], connect: Callable[[str, str], wire.Conn],
                chunk_bytes: int, window: int = 4, layout: Layout | None = None,
                expected_hash: Callable[[int], str | None] | None = None) -> tuple[State, dict[str, Any]]:
    """Pulls a state from the first source that completes; resumes from the next one when a source fails.

    `sources` are (name, "HOST:PORT"); `connect(name, addr)` opens a connection to that identity with HELLO op
    "state". `layout` (the local model's arrays) bounds what is allocated; `expected_hash(outer_step)` is the hash the
    run committed for that outer step (the coordinator's majority), which the assembled state must have: a source
    whose manifest names a step with no committed hash, or whose state does not hash to it, is dropped (logged) and
    the next one tried.
    Returns the state and a report {"source", "tried", "bytes", "reused_bytes", "seconds"}.
    """
    t0 = time.monotonic()
    bufs: dict[str, bytearray] = {}
    got: dict[str, int] = {}
    shas: dict[str, str] = {}
    tried: list[str] = []
    fetched = reused = 0
    last_err: BaseException | None = None
    for name, addr in sources:
        tried.append(name)
        try:
            conn = connect(name, addr)
        except (OSError, wire.WireError, wire.RemoteError) as e:
            log.warning("state source %s (%s) unreachable: %s", name, addr, e)
            last_err = e
            continue
        try:
            man, _ = conn.request({"op": "manifest"})
            meta, arrays = check_manifest(man, layout, name)
            if expected_hash is not None and expected_hash(int(meta["outer_step"])) is None:
                raise TransferError(f"{name} offers the state of outer step {meta['outer_step']}, which has no "
                                    "committed hash; dropping this source")
            for m in arrays:
                k = m["name"]
                if shas.get(k) == m["sha256"] and len(bufs[k]) == m["nbytes"]:
                    reused += got[k]  # same bytes as before the failure: keep the prefix we hold
                else:
                    bufs[k], got[k], shas[k] = bytearray(m["nbytes"]), 0, m["sha256"]
            for k in list(bufs):
                if k not in {m["name"] for m in arrays}:
                    del bufs[k], got[k], shas[k]
            reqs = [(m["name"], off, min(chunk_bytes, m["nbytes"] - off)) for m in arrays
                    for off in range(got[m["name"]], m["nbytes"], chunk_bytes)]
            inflight = 0
            for i, (k, off, n) in enumerate(reqs):
                conn.send(wire.MsgType.REQUEST, {"op": "chunk", "name": k, "offset": off, "length": n})
                inflight += 1
                while inflight >= window or (i == len(reqs) - 1 and inflight):
                    j = i - inflight + 1
                    rk, roff, rn = reqs[j]
                    mtype, rep, data = conn.recv()
                    if mtype != wire.MsgType.REPLY or len(data) != rn:
                        raise TransferError(f"bad chunk reply from {name}: {rep}")
                    bufs[rk][roff:roff + rn] = data
                    got[rk] = roff + rn
                    fetched += rn
                    inflight -= 1
            out = {m["name"]: np.frombuffer(bufs[m["name"]], np.dtype(m["dtype"])).reshape(m["shape"]) for m in arrays}
            digests = array_digests(out)
            for m in arrays:
                k = m["name"]
                if digests[k] != m["sha256"]:
                    bufs.pop(k), got.pop(k), shas.pop(k)
                    raise TransferError(f"array {k!r} from {name} failed its SHA-256 check")
            got_hash = params_hash(out, digests)
            want = expected_hash(int(meta["outer_step"])) if expected_hash else None
            if got_hash != meta["params_hash"] or (want is not None and got_hash != want):
                bufs.clear(), got.clear(), shas.clear()  # nothing of a lying source is kept for the next one
                raise TransferError(
                    f"the state of outer step {meta['outer_step']} from {name} hashes to {got_hash[:16]}, but "
                    + (f"the run committed {want[:16]}" if want is not None and got_hash != want else
                       f"the source claimed {str(meta['params_hash'])[:16]}") + "; dropping this source")
            report = {"source": name, "tried": tried, "bytes": fetched, "reused_bytes": reused,
                      "seconds": time.monotonic() - t0}
            log.info("fetched state (outer step %s) from %s: %.1f MB in %.2f s%s", meta.get("outer_step"), name,
                     fetched / 1e6, report["seconds"],
                     f" (resumed; {reused / 1e6:.1f} MB kept from {tried[:-1]})" if len(tried) > 1 else "")
            return State(out, meta), report
        except (OSError, wire.WireError, wire.RemoteError, TransferError, KeyError) as e:
            log.warning("state transfer from %s broke after %.1f MB: %s; trying the next source", name,
                        fetched / 1e6, e)
            last_err = e
        finally:
            conn.close()
    raise TransferError(f"no source could provide the state (tried {tried}): {last_err}")
