"""Bandwidth-aware ring order: maximise the slowest link of the ring (bottleneck travelling salesman), as PRIME did.

``rates[a][b]`` is the measured throughput from island a to island b (bytes/s; the ring sends from each member to its
successor, so links are directed). Unknown pairs count as 0 only when every order has one; otherwise orders that
avoid unmeasured links win. Exact search over all (N-1)! cycles for N <= ``EXACT_MAX``; above that a heuristic: the
largest threshold for which a greedy + 2-opt search finds a cycle using only links at or above it. Pairs in `avoid`
(two islands that blamed each other for a failed reduce) are kept apart first, where the ring allows it.
"""

from __future__ import annotations

import itertools
import math
from typing import Collection, Mapping, Sequence

EXACT_MAX = 8
# Automatic stream count (elastic.streams = 0): one TCP stream moves at most ~window / RTT, with Linux's default
# autotuned send window of 4 MiB (net.ipv4.tcp_wmem max); measured through launch/delay_relay.py at 1 Gbit/s
# (benchmarks/RESULTS.md): at 100 ms RTT 4 streams did best, at 300 ms 8, and 16 cost more host CPU than they gained.
STREAM_WINDOW_BYTES = 4 << 20
MIN_STREAMS, MAX_STREAMS = 4, 16


def _rate(rates: Mapping[str, Mapping[str, float]], a: str, b: str) -> float:
    return float(rates.get(a, {}).get(b, 0.0))


def bottleneck(order: Sequence[str], rates: Mapping[str, Mapping[str, float]]) -> float:
    """The slowest link of the ring `order` (inf for a single member)."""
    if len(order) < 2:
        return math.inf
    return min(_rate(rates, order[i], order[(i + 1) % len(order)]) for i in range(len(order)))


def slowest_rtt(order: Sequence[str], rtts: Mapping[str, Mapping[str, float]]) -> float:
    """The longest measured round trip (s) of the ring's links `order[i] -> order[i + 1]` (0 if none measured)."""
    n = len(order)
    return max((_rate(rtts, order[i], order[(i + 1) % n]) for i in range(n)), default=0.0) if n > 1 else 0.0


def auto_streams(order: Sequence[str], rtts: Mapping[str, Mapping[str, float]], link_bytes_per_s: float) -> int:
    """TCP streams per ring link so that window-bound streams fill a `link_bytes_per_s` link over the ring's slowest
    round trip: ceil(rate x RTT / window), within [MIN_STREAMS, MAX_STREAMS]; every member uses the same count."""
    need = link_bytes_per_s * slowest_rtt(order, rtts) / STREAM_WINDOW_BYTES
    if not math.isfinite(need):
        return MAX_STREAMS
    return max(MIN_STREAMS, min(MAX_STREAMS, math.ceil(need)))


def _adjacent(order: Sequence[str], avoid: Collection[frozenset]) -> int:
    n = len(order)
    return sum(frozenset((order[i], order[(i + 1) % n])) in avoid for i in range(n)) if avoid else 0


def _score(order: Sequence[str], rates, avoid: Collection[frozenset] = ()) -> tuple[float, float, float]:
    n = len(order)
    links = [_rate(rates, order[i], order[(i + 1) % n]) for i in range(n)]
    return -_adjacent(order, avoid), min(links), sum(links)


def ring_order(members: Sequence[str], rates: Mapping[str, Mapping[str, float]] | None = None,
               avoid: Collection[frozenset] = ()) -> list[str]:
    """A ring order of `members` with as few `avoid` pairs next to each other as possible, then maximising the
    bottleneck link (ties: larger total, then name order).

    With no measurements and nothing to avoid it returns the members sorted by name, so every island derives the
    same order.
    """
    names = sorted(members)
    avoid = {p for p in avoid if p <= set(names)}
    if len(names) <= 2 or (not rates and not avoid):
        return names
    if len(names) <= EXACT_MAX:
        return _exact(names, rates or {}, avoid)
    return _heuristic(names, rates or {}, avoid)


def _exact(names: list[str], rates, avoid) -> list[str]:
    first, rest = names[0], names[1:]
    best, best_score = None, None
    for perm in itertools.permutations(rest):
        order = [first, *perm]
        s = _score(order, rates, avoid)
        if best_score is None or s > best_score:
            best, best_score = order, s
    return best


def _heuristic(names: list[str], rates, avoid=()) -> list[str]:
    thresholds = sorted({_rate(rates, a, b) for a in names for b in names if a != b}, reverse=True)
    best = _greedy(names, rates, -math.inf, avoid)
    lo, hi = 0, len(thresholds) - 1  # binary search for the largest feasible threshold
    while lo <= hi:
        mid = (lo + hi) // 2
        cand = _greedy(names, rates, thresholds[mid], avoid)
        if (cand is not None and bottleneck(cand, rates) >= thresholds[mid]
                and _adjacent(cand, avoid) <= _adjacent(best, avoid)):
            best, hi = cand, mid - 1
        else:
            lo = mid + 1
    return best


def _greedy(names: list[str], rates, thr: float, avoid=()) -> list[str] | None:
    """Nearest-neighbour cycle preferring links >= thr, then 2-opt moves that raise the score."""
    order = [names[0]]
    left = set(names[1:])
    while left:
        cur = order[-1]
        nxt = max(sorted(left), key=lambda b: (frozenset((cur, b)) not in avoid, _rate(rates, cur, b)))
        order.append(nxt)
        left.remove(nxt)
    improved = True
    rounds = 0
    while improved and rounds < 50:
        improved, rounds = False, rounds + 1
        base = _score(order, rates, avoid)
        for i in range(1, len(order) - 1):
            for j in range(i + 1, len(order)):
                cand = order[:i] + order[i:j + 1][::-1] + order[j + 1:]
                s = _score(cand, rates, avoid)
                if s > base:
                    order, base, improved = cand, s, True
    return order if bottleneck(order, rates) >= thr else None
