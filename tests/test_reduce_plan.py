"""Reduce plans and their executor: the ring plan's structure for several member counts, the executor over the ring
plan equal to the sequential reference bit for bit on loopback TCP, and a second plan (all-to-all, defined here)
run by the same executor unchanged: the seam a later topology plugs into."""

import itertools
import threading
import types

import numpy as np
import pytest

from intellect_jax import quant
from intellect_jax.elastic import executor, identity, plan, ring, wire
from tests.test_elastic_ring import _link

SECRET = b"p" * 32
SERVER, CLIENT = identity.secret_auth(SECRET, "server"), identity.secret_auth(SECRET, "client")
RUN = "plan-test"
MAXF = 64 << 20
BLOCK = 256


@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 8])
def test_ring_plan_structure(N):
    p = plan.ring_plan(N)
    plan.check(p)  # every member sums every segment once, the owner sums all, everyone gets the owner's bytes
    assert p.topology == "ring" and p.members == N and p.rounds == 2 * (N - 1)
    assert len(p.hops) == 2 * N * (N - 1)
    for m in range(N):
        assert p.out_links(m) == ([(m + 1) % N] if N > 1 else [])  # the links replace successor / predecessor
        assert p.in_links(m) == ([(m - 1) % N] if N > 1 else [])
        assert p.starts(m) == ([m] if N > 1 else [])
        for r in range(p.rounds):  # one hop out and one in per member and round: every link busy every round
            assert sum(h.src == m and h.round == r for h in p.hops) == 1
            assert sum(h.dst == m and h.round == r for h in p.hops) == 1
        for g in range(N):
            # On the reduce path each member adds its values to each segment exactly once (or starts it) ...
            assert len(p.inbound(m, g)) + (g in p.starts(m)) == (1 if N > 1 else 0)
            # ... and ends with every segment's final bytes: the owner made them, everyone else receives them once.
            finals = [h for h in p.hops if h.dst == m and h.seg == g and h.final]
            assert len(finals) == (0 if p.owner[g] == m else 1)
    for g in range(N):
        assert p.owner[g] == (g - 1) % N
        reduce_path = sorted((h for h in p.hops if h.seg == g and not h.final), key=lambda h: h.round)
        assert [h.round for h in reduce_path] == list(range(N - 1))
        assert [h.src for h in reduce_path] == [(g + t) % N for t in range(N - 1)]  # the segment walks the ring
        gather = sorted((h for h in p.hops if h.seg == g and h.final), key=lambda h: h.round)
        assert [h.round for h in gather] == list(range(N - 1, 2 * (N - 1)))
        assert all(h.phase == "ag" for h in gather) and all(h.phase == "rs" for h in reduce_path)
        assert [h.step for h in gather] == [h.step for h in reduce_path] == list(range(N - 1))


def test_plans_from_the_epoch_description():
    desc = plan.describe("ring", ["b", "a", "c"])
    assert desc == {"topology": "ring", "order": ["b", "a", "c"]}
    assert plan.from_description(desc) == plan.ring_plan(3)
    assert plan.from_description({"order": ["a", "b"]}) == plan.ring_plan(2)  # no topology: the ring
    with pytest.raises(ValueError, match="unknown reduce topology"):
        plan.from_description({"topology": "mesh", "order": ["a"]})
    with pytest.raises(ValueError, match="unknown reduce topology"):
        plan.describe("mesh", ["a"])


def all_to_all_plan(N):
    """Every member sends segment g of its own values straight to its owner g, which sums them and sends the mean
    to every member: 2 rounds, every pair linked both ways."""
    hops = [plan.Hop(0, src, g, g, False, "rs", 0) for g in range(N) for src in range(N) if src != g]
    hops += [plan.Hop(1, g, dst, g, True, "ag", 0) for g in range(N) for dst in range(N) if dst != g]
    return plan.Plan("all-to-all", N, tuple(hops), tuple(range(N)), 2 if N > 1 else 0)


def test_check_accepts_all_to_all_and_refuses_broken_plans():
    for N in (1, 2, 3, 5):
        p = all_to_all_plan(N)
        plan.check(p)
        assert all(p.out_links(m) == p.in_links(m) == [o for o in range(N) if o != m] for m in range(N))
    r = plan.ring_plan(4)
    with pytest.raises(ValueError, match="never get segment"):  # one all-gather hop dropped
        plan.check(plan.Plan("ring", 4, r.hops[:-1], r.owner, r.rounds))
    twice = r.hops + (plan.Hop(0, 2, 0, 1, False, "rs", 9),)  # member 2 starts segment 1 as well as summing it
    with pytest.raises(ValueError, match="counts someone twice|does not hold"):
        plan.check(plan.Plan("ring", 4, twice, r.owner, r.rounds))
    early = tuple(plan.Hop(0, h.src, h.dst, h.seg, h.final, h.phase, h.step) if h.final else h for h in r.hops)
    with pytest.raises(ValueError, match="not one arrival"):  # the gather before the sum is done
        plan.check(plan.Plan("ring", 4, early, r.owner, r.rounds))


def _plan_links(p, streams):
    """send[i][j] (streams from i to j) and recv[j][i] for every link of plan `p`, handshaken on loopback."""
    send = [{} for _ in range(p.members)]
    recv = [{} for _ in range(p.members)]
    for i in range(p.members):
        for j in p.out_links(i):
            send[i][j], recv[j][i] = _link(streams)
    return send, recv


def _run(p, vecs, codec, streams, chunk_bytes=4096, packed_out=False):
    send, recv = _plan_links(p, streams)
    outs, stats, errs = [None] * p.members, [None] * p.members, []

    def member(i):
        try:
            outs[i], stats[i] = executor.run_plan(vecs[i], p, i, send[i], recv[i], codec, chunk_bytes, BLOCK,
                                                  timeout=10, epoch=5, packed_out=packed_out)
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    ths = [threading.Thread(target=member, args=(i,)) for i in range(p.members)]
    [t.start() for t in ths]
    [t.join(60) for t in ths]
    for c in itertools.chain(*(d.values() for d in send + recv)):
        [x.close() for x in c]
    assert not errs, errs
    return outs, stats


def _packed(v, codec):
    m = -(-v.size // BLOCK) * BLOCK
    codes, scales = quant.pack_np(np.pad(v, (0, m - v.size)), bits=codec.bits, block_size=BLOCK)
    return ring.Packed(codes, scales, v.size)


@pytest.mark.parametrize("N,size,streams", [(1, 1000, 1), (2, 5000, 2), (3, 20_001, 3), (5, 3000, 1)])
@pytest.mark.parametrize("compression", ["int8", "int4", "none"])
def test_executor_over_the_ring_plan_equals_the_reference(N, size, streams, compression):
    rng = np.random.default_rng(size)
    vecs = [rng.standard_normal(size).astype(np.float32) * (i + 1) for i in range(N)]
    codec = ring.make_codec(compression, BLOCK)
    ref = ring.reference_ring_mean(vecs, codec, 4096, BLOCK, streams)
    outs, stats = _run(plan.ring_plan(N), vecs, codec, streams)
    for o in outs:
        assert o.tobytes() == ref.tobytes()
    if compression != "none":  # device codes in, owners' codes out
        packed = [_packed(v, codec) for v in vecs]
        ref = ring.reference_ring_mean(packed, codec, 4096, BLOCK, streams)
        outs, _ = _run(plan.ring_plan(N), packed, codec, streams, packed_out=True)
        for o in outs:
            assert o.decode(codec).tobytes() == ref.tobytes()
    lay = plan.make_layout(size, N, BLOCK, 4096, codec.bits, streams)
    assert all(st.members == N and st.chunks == lay.chunks for st in stats)


def _reference_all_to_all(vecs, codec, chunk_bytes, streams):
    """The all-to-all's arithmetic in one process: owner g adds the decoded contributions in rank order to its own
    values, then packs the mean once."""
    N, n = len(vecs), vecs[0].size
    lay = plan.make_layout(n, N, BLOCK, chunk_bytes, codec.bits, streams)
    xs = [np.concatenate([v, np.zeros(lay.padded - n, np.float32)]) for v in vecs]
    enc = lambda a: memoryview(b"".join(codec.encode(a)))  # noqa: E731
    out = np.empty(lay.padded, np.float32)
    for c in range(lay.chunks):
        for g in range(N):
            lo, hi = lay.span(g, c)
            partial = xs[g][lo:hi]
            for src in [s for s in range(N) if s != g]:
                partial = codec.decode(enc(xs[src][lo:hi]), hi - lo) + partial
            out[lo:hi] = codec.decode(enc(quant.mean_np(partial, N)), hi - lo)
    return out[:n]


@pytest.mark.parametrize("N,streams", [(2, 1), (3, 2), (4, 1)])
@pytest.mark.parametrize("compression", ["int8", "none"])
def test_a_second_plan_runs_on_the_same_executor(N, streams, compression):
    """All-to-all through the unchanged executor: every member gets the same bytes, equal to its own reference,
    and each member's values were quantized once on the way (not N-1 times as on the ring)."""
    rng = np.random.default_rng(N)
    vecs = [rng.standard_normal(7000).astype(np.float32) * (i + 1) for i in range(N)]
    codec = ring.make_codec(compression, BLOCK)
    outs, _ = _run(all_to_all_plan(N), vecs, codec, streams)
    ref = _reference_all_to_all(vecs, codec, 4096, streams)
    for o in outs:
        assert o.tobytes() == ref.tobytes()
    exact = np.mean(np.stack(vecs).astype(np.float64), axis=0)
    if compression == "none":
        np.testing.assert_allclose(outs[0], exact, rtol=1e-6, atol=1e-6)
    else:  # one quantization of each input, one of the mean
        step = max(np.abs(v).max() for v in vecs) / 127
        assert np.abs(outs[0] - exact).max() <= step / 2 * 1.01 + sum(np.abs(v).max() for v in vecs) / 127 / N / 2


def test_executor_refuses_links_that_do_not_match_the_plan():
    with pytest.raises(ValueError, match="needs 1 streams to each of \\[1\\]"):
        executor.run_plan(np.ones(1000, np.float32), plan.ring_plan(3), 0, {2: [object()]}, {2: [object()]},
                          ring.make_codec("int8", BLOCK), 4096, BLOCK, timeout=1)


def test_an_island_reads_the_epochs_plan_and_blames_the_peer_of_the_failed_link():
    from intellect_jax.elastic import client
    from intellect_jax.elastic.protocol import Epoch

    e = Epoch(3, 0, ["a", "b", "c"], ["c", "a", "b"])
    ep = e.public({m: types.SimpleNamespace(addr="127.0.0.1:1") for m in "abc"}, lambda m: None)
    assert ep["topology"] == "ring" and ep["order"] == ["c", "a", "b"]  # the plan, and the order islands read
    assert client._check_epoch(ep, "a") is ep
    with pytest.raises(client.ElasticError, match="unknown reduce topology"):
        client._check_epoch({**ep, "topology": "mesh"}, "a")
    # The failed link's peer, by rank in the order; without one, the plan's only link that way (a's ring: c -> a -> b).
    assert client._suspect(ep, "a", executor.RingError("x", "pred", peer=2)) == "b"
    assert client._suspect(ep, "a", executor.RingError("x", "pred")) == "c"
    assert client._suspect(ep, "a", executor.RingError("x", "succ")) == "b"
    assert client._suspect(ep, "a", executor.RingError("x", cause="cancelled")) is None
