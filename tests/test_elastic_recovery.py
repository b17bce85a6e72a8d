"""Live state transfer: chunked, SHA-256 verified, resumed from another island when the source is killed."""

import logging
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest

from intellect_jax.elastic import identity, recovery, wire

SECRET = b"r" * 32
SOURCE, FETCHER = identity.secret_auth(SECRET, "src"), identity.secret_auth(SECRET, "fetcher")
RUN = "recovery-test"


def make_state(step: int, seed: int | None = None):
    rng = np.random.default_rng(step if seed is None else seed)
    arrays = {"params": rng.standard_normal(3_000_000).astype(np.float32),  # 12 MB
              "momentum": rng.standard_normal(1_000_000).astype(np.float32),
              "count": np.array([step], np.int64)}
    return arrays, {"outer_step": step, "params_hash": recovery.params_hash(arrays)}


def _source(step, rate, port_q, mutate=False, liar=False, digests=False):
    arrays, meta = make_state(step, seed=step + 1000 if liar else None)  # a liar: self-consistent, not the run's
    if digests:  # as an island's snapshot: the digests hashed once per sync, reused by every manifest
        meta = dict(meta, array_digests=recovery.array_digests(arrays))

    def provider():
        if mutate:  # a buggy trainer that mutates the served arrays in place after the manifest was hashed
            threading.Timer(0.1, lambda: arrays["params"].__setitem__(slice(-10, None), 0.5)).start()
        return arrays, meta

    def handler(conn, hello):
        recovery.serve_state(conn, provider, rate)

    srv = wire.Server("127.0.0.1:0", SOURCE, RUN, 64 << 20, handler, "src").start()
    port_q.put(srv.port)
    while True:
        time.sleep(1)


def _start(ctx, step, rate, mutate=False, liar=False, digests=False):
    q = ctx.Queue()
    p = ctx.Process(target=_source, args=(step, rate, q, mutate, liar, digests), daemon=True)
    p.start()
    return p, f"127.0.0.1:{q.get(timeout=30)}"


def _connect(name, addr):
    return wire.connect(addr, FETCHER, "src", RUN, 64 << 20, hello={"op": "state"}, timeout=5)[0]


@pytest.fixture
def ctx():
    return mp.get_context("fork")


def test_fetch_is_exact_and_hash_verified(ctx):
    p, addr = _start(ctx, 5, 0)
    try:
        state, report = recovery.fetch_state([("a", addr)], _connect, chunk_bytes=1 << 20)
    finally:
        p.kill()
    arrays, meta = make_state(5)
    assert state.meta == meta
    assert recovery.params_hash(state.arrays) == meta["params_hash"]
    for k in arrays:
        assert state.arrays[k].dtype == arrays[k].dtype and np.array_equal(state.arrays[k], arrays[k])
    assert report["source"] == "a" and report["reused_bytes"] == 0


def test_source_killed_mid_transfer_resumes_from_another(ctx, caplog):
    caplog.set_level(logging.INFO)
    slow, slow_addr = _start(ctx, 7, 8e6)  # 16 MB at 8 MB/s: ~2 s
    fast, fast_addr = _start(ctx, 7, 0)
    try:
        killer = threading.Timer(0.8, lambda: os.kill(slow.pid, signal.SIGKILL))
        killer.start()
        state, report = recovery.fetch_state([("slow", slow_addr), ("fast", fast_addr)], _connect,
                                             chunk_bytes=256 << 10, window=2)
        killer.join()
    finally:
        slow.kill()
        fast.kill()
    arrays, meta = make_state(7)
    assert recovery.params_hash(state.arrays) == meta["params_hash"]
    total = sum(a.nbytes for a in arrays.values())
    assert report["tried"] == ["slow", "fast"] and report["source"] == "fast"
    assert report["reused_bytes"] > 2e6  # kept what the dead source had sent
    assert report["bytes"] < total + 1e6  # ... so far less than two full transfers
    assert any("state transfer from slow broke" in r.getMessage() for r in caplog.records)
    assert any("resumed" in r.getMessage() for r in caplog.records)


def test_resume_from_a_source_at_another_step_refetches_changed_arrays(ctx):
    slow, slow_addr = _start(ctx, 3, 8e6)
    newer, newer_addr = _start(ctx, 4, 0)
    try:
        threading.Timer(0.5, lambda: os.kill(slow.pid, signal.SIGKILL)).start()
        state, report = recovery.fetch_state([("slow", slow_addr), ("newer", newer_addr)], _connect,
                                             chunk_bytes=256 << 10, window=2)
    finally:
        slow.kill()
        newer.kill()
    arrays, meta = make_state(4)
    assert state.meta["outer_step"] == 4 and recovery.params_hash(state.arrays) == meta["params_hash"]
    assert report["reused_bytes"] == 0  # every array differs between the two steps


def test_corrupted_transfer_is_rejected_then_next_source_used(ctx, caplog):
    caplog.set_level(logging.INFO)
    bad, bad_addr = _start(ctx, 9, 20e6, mutate=True)
    good, good_addr = _start(ctx, 9, 0)
    try:
        state, report = recovery.fetch_state([("bad", bad_addr), ("good", good_addr)], _connect,
                                             chunk_bytes=256 << 10)
    finally:
        bad.kill()
        good.kill()
    assert report["source"] == "good"
    assert recovery.params_hash(state.arrays) == make_state(9)[1]["params_hash"]
    assert any("failed its SHA-256 check" in r.getMessage() for r in caplog.records)


def test_no_source_raises(ctx):
    with pytest.raises(recovery.TransferError, match="no source"):
        recovery.fetch_state([("gone", "127.0.0.1:1")], _connect, chunk_bytes=1 << 20)


def test_a_source_whose_state_is_not_the_committed_one_is_dropped(ctx, caplog):
    """A peer serving a self-consistent state of the right step that the run did not commit (a diverged or lying
    island): its hash differs from the coordinator's majority hash, so it is dropped and the next source used."""
    caplog.set_level(logging.INFO)
    liar, liar_addr = _start(ctx, 6, 0, liar=True)
    good, good_addr = _start(ctx, 6, 0)
    arrays, meta = make_state(6)
    try:
        state, report = recovery.fetch_state([("liar", liar_addr), ("good", good_addr)], _connect,
                                             chunk_bytes=1 << 20, layout=recovery.layout_of(arrays),
                                             expected_hash=lambda s: meta["params_hash"] if s == 6 else None)
    finally:
        liar.kill()
        good.kill()
    assert report["source"] == "good" and report["reused_bytes"] == 0
    assert recovery.params_hash(state.arrays) == meta["params_hash"]
    assert any("from liar hashes to" in r.getMessage() and "the run committed" in r.getMessage()
               for r in caplog.records)


def test_a_state_of_a_step_without_a_committed_hash_is_never_installed(ctx, caplog):
    """A source offering a (self-consistent) state of outer step 1,000,000, for which the run has no committed hash:
    dropped before a byte of it is fetched; the next source's committed state is installed."""
    caplog.set_level(logging.INFO)
    far, far_addr = _start(ctx, 1_000_000, 0)
    good, good_addr = _start(ctx, 6, 0)
    arrays, meta = make_state(6)
    try:
        state, report = recovery.fetch_state([("far", far_addr), ("good", good_addr)], _connect,
                                             chunk_bytes=1 << 20, layout=recovery.layout_of(arrays),
                                             expected_hash=lambda s: meta["params_hash"] if s == 6 else None)
    finally:
        far.kill()
        good.kill()
    assert report["source"] == "good" and report["bytes"] == sum(a.nbytes for a in arrays.values())
    assert any("offers the state of outer step 1000000, which has no committed hash" in r.getMessage()
               for r in caplog.records)


def _fake_source(manifest):
    """An in-process source that answers the manifest request with `manifest` (and any chunk with zeros)."""
    def handler(conn, hello):
        while True:
            _, req, _ = conn.recv()
            if req.get("op") == "manifest":
                conn.send(wire.MsgType.REPLY, manifest)
            else:
                conn.send(wire.MsgType.REPLY, {}, bytes(int(req["length"])))
    return wire.Server("127.0.0.1:0", SOURCE, RUN, 64 << 20, handler, "fake").start()


@pytest.mark.parametrize("entry,needle", [
    ({"name": "params", "dtype": "<f4", "shape": [1 << 40], "nbytes": 4 << 40, "sha256": "0"},
     "does not match this island's model"),
    ({"name": "params", "dtype": "|O", "shape": [3], "nbytes": 24, "sha256": "0"}, "is not numeric state"),
    ({"name": "params", "dtype": "<f4", "shape": [3], "nbytes": 4, "sha256": "0"}, "does not match float32 x (3,)"),
    ({"name": "params", "dtype": "no-such-dtype", "shape": [3], "nbytes": 12, "sha256": "0"}, "malformed"),
])
def test_malformed_or_oversized_manifests_are_refused_before_allocation(ctx, caplog, entry, needle):
    caplog.set_level(logging.INFO)
    arrays, meta = make_state(2)
    bad = _fake_source({"meta": meta, "arrays": [entry]})
    good, good_addr = _start(ctx, 2, 0)
    try:
        state, report = recovery.fetch_state([("bad", f"127.0.0.1:{bad.port}"), ("good", good_addr)], _connect,
                                             chunk_bytes=1 << 20, layout=recovery.layout_of(arrays))
    finally:
        bad.close()
        good.kill()
    assert report["source"] == "good" and recovery.params_hash(state.arrays) == meta["params_hash"]
    assert any(needle in r.getMessage() and "bad" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_digests_hash_pieces_in_parallel_and_the_transfer_checks_them(ctx, monkeypatch):
    """Arrays are hashed in pieces (here 1 MiB: 12 pieces for the 12 MB array) on a thread pool; a changed piece
    changes its array's digest only; a served snapshot's own digests go into the manifest, not into the meta."""
    monkeypatch.setattr(recovery, "PIECE_BYTES", 1 << 20)  # inherited by the forked source
    arrays, meta = make_state(5)
    d = recovery.array_digests(arrays)
    changed = dict(arrays, params=arrays["params"].copy())
    changed["params"][2_000_000] += 1.0  # byte 8e6: piece 7
    d2 = recovery.array_digests(changed)
    assert d2["params"] != d["params"] and d2["momentum"] == d["momentum"] and d2["count"] == d["count"]
    assert recovery.params_hash(arrays) == recovery.params_hash(arrays, d) != recovery.params_hash(changed)
    monkeypatch.setattr(recovery, "PIECE_BYTES", 64 << 20)
    assert recovery.array_digests(arrays)["params"] != d["params"]  # the piece size is part of the definition
    monkeypatch.setattr(recovery, "PIECE_BYTES", 1 << 20)
    p, addr = _start(ctx, 5, 0, digests=True)
    try:
        state, _ = recovery.fetch_state([("a", addr)], _connect, chunk_bytes=1 << 20)
    finally:
        p.kill()
    assert state.meta == meta  # the digests stayed out of the meta
    assert all(np.array_equal(state.arrays[k], arrays[k]) for k in arrays)
