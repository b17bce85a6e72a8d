"""Reduce plans: who sends which segment to whom, in which round, and what the receiver does with it. Pure data.

An epoch's members (ranks 0..N-1, positions in the coordinator's order) each hold a vector cut into N segments
(`Layout`); segment g has one owner, who packs its mean once. A plan is a list of `Hop`s: in `round`, member `src`
sends its bytes of segment `seg` (every chunk of it, chunk c on stream c % S of the link) to member `dst`, which
either joins them to its partial sum of the segment (``final=False``: the reduce path) or stores them verbatim as
the segment's final bytes (``final=True``: the gather path). The executor (`executor.run_plan`) reads nothing else,
so a new topology is a new function returning a `Plan`; the ring is the first:

* ``ring_plan(N)``: reduce-scatter, then all-gather (Patarasuk & Yuan 2009). Segment g starts at member g, each
  round moves it one member on and that member adds its values, until its owner g - 1 has every contribution
  (N - 1 rounds); the owner's mean then travels the ring verbatim (N - 1 rounds). Every link is member -> successor.

A member's reduce-path role for segment g follows from the hops: with no inbound partial hop it starts the segment
(sends its own values); otherwise it waits for every inbound partial hop, adds its own values once, and sends the
sum on, or, as the owner, packs the mean and sends it along its final hops. The wire frame of a hop is tagged with
its (`phase`, `step`), which with the sending link names the hop on the receiving side. Numpy-free.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

PIPELINE_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class Hop:
    """Member `src` sends segment `seg` to member `dst` in `round`; `final`: the bytes are the segment's mean
    (stored verbatim), else a partial sum the receiver adds its values to. (`phase`, `step`) tag the wire frame."""

    round: int
    src: int
    dst: int
    seg: int
    final: bool
    phase: str
    step: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """A reduce over `members` ranks: `hops`, the `owner` of each segment, and how many `rounds` they span.

    `link_roles` names a member's out- and in-links in messages (the ring's "successor", "predecessor")."""

    topology: str
    members: int
    hops: tuple[Hop, ...]
    owner: tuple[int, ...]
    rounds: int
    link_roles: tuple[str, str] = ("peer", "peer")

    def out_links(self, me: int) -> list[int]:
        """The members `me` sends to (connects to), in rank order."""
        return sorted({h.dst for h in self.hops if h.src == me})

    def in_links(self, me: int) -> list[int]:
        """The members `me` receives from (that connect to it), in rank order."""
        return sorted({h.src for h in self.hops if h.dst == me})

    def sent(self, me: int) -> list[Hop]:
        return [h for h in self.hops if h.src == me]

    def received(self, me: int) -> list[Hop]:
        return [h for h in self.hops if h.dst == me]

    def inbound(self, me: int, seg: int) -> list[Hop]:
        """The partial sums of `seg` that `me` adds its values to, in the order they are added (round, then src)."""
        return sorted((h for h in self.hops if h.dst == me and h.seg == seg and not h.final),
                      key=lambda h: (h.round, h.src))

    def outbound(self, me: int, seg: int, final: bool) -> list[Hop]:
        return [h for h in self.hops if h.src == me and h.seg == seg and h.final == final]

    def starts(self, me: int) -> list[int]:
        """The segments `me` starts with its own values (it sends them on the reduce path, receiving none)."""
        return sorted({h.seg for h in self.hops if h.src == me and not h.final and (me, h.seg) not in self._summed})

    @functools.cached_property
    def _summed(self) -> frozenset[tuple[int, int]]:
        """(member, segment) pairs where the member receives partial sums."""
        return frozenset((h.dst, h.seg) for h in self.hops if not h.final)

    def starts_of(self, seg: int) -> list[int]:
        """The members that start `seg` with their own values."""
        return [m for m in range(self.members) if seg in self.starts(m)]

    def role(self, out: bool) -> str:
        return self.link_roles[0 if out else 1]


def ring_plan(members: int) -> Plan:
    """The ring over ranks 0..members-1, rank r sending to r + 1: 2(N - 1) rounds, segment g owned by g - 1."""
    N = members
    hops = []
    for g in range(N):
        for t in range(N - 1):  # reduce-scatter: g + t -> g + t + 1 adds its values (g + N - 1 = the owner)
            hops.append(Hop(t, (g + t) % N, (g + t + 1) % N, g, False, "rs", t))
        for t in range(N - 1):  # all-gather: the owner's bytes, forwarded verbatim
            hops.append(Hop(N - 1 + t, (g - 1 + t) % N, (g + t) % N, g, True, "ag", t))
    hops.sort(key=lambda h: (h.round, h.src))
    return Plan("ring", N, tuple(hops), tuple((g - 1) % N for g in range(N)), 2 * (N - 1),
                ("successor", "predecessor"))


TOPOLOGIES: dict[str, Callable[[int], Plan]] = {"ring": ring_plan}


def describe(topology: str, order: Sequence[str]) -> dict[str, Any]:
    """What the coordinator hands out: the topology's name and the member order (ranks are positions in it)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown reduce topology {topology!r:.40}; expected one of {sorted(TOPOLOGIES)}")
    return {"topology": topology, "order": list(order)}


def from_description(desc: dict[str, Any]) -> Plan:
    """The plan an epoch names (``{"topology", "order"}``; no topology: the ring)."""
    topology = desc.get("topology") or "ring"
    if not isinstance(topology, str) or topology not in TOPOLOGIES:
        raise ValueError(f"unknown reduce topology {topology!r:.40}; expected one of {sorted(TOPOLOGIES)}")
    return TOPOLOGIES[topology](len(desc["order"]))


# --------------------------------------------------------------------------------------------------------------------
# Layout: which elements are segment g's chunk c.


@dataclasses.dataclass(frozen=True)
class Layout:
    n: int  # caller's length
    members: int  # N
    seg: int  # elements per segment (a multiple of the block size)
    chunk: int  # elements per chunk (a multiple of the block size)

    @property
    def chunks(self) -> int:
        return math.ceil(self.seg / self.chunk)

    @property
    def padded(self) -> int:
        return self.seg * self.members

    def span(self, g: int, c: int) -> tuple[int, int]:
        lo = g * self.seg + c * self.chunk
        return lo, min(lo + self.chunk, (g + 1) * self.seg)


def make_layout(n: int, members: int, block_size: int, chunk_bytes: int, bits_per_elem: int,
                streams: int = 1) -> Layout:
    seg = math.ceil(max(n, 1) / members / block_size) * block_size
    chunk = max(block_size, chunk_bytes * 8 // bits_per_elem // block_size * block_size)
    # At least PIPELINE_DEPTH chunks per stream and segment when the segment is big enough: every stream carries
    # data, and a chunk is forwarded (decoded, accumulated, re-packed) while later ones are still on the wire.
    per_stream = math.ceil(seg / (streams * PIPELINE_DEPTH) / block_size) * block_size
    chunk = min(chunk, max(block_size, per_stream))
    return Layout(n, members, seg, chunk)


def check(plan: Plan) -> None:
    """Raises ValueError unless `plan` computes the mean: every member adds its values to every segment exactly once
    (it starts the segment, or adds them to what it receives), the owner holds the complete sum, every other member
    receives the owner's bytes exactly once, a member sends a segment only after it has it, and each hop is named
    uniquely on its link by its wire tag."""
    N, R = plan.members, plan.rounds
    if len(plan.owner) != N or any(not 0 <= o < N for o in plan.owner):
        raise ValueError(f"{plan.topology}: owners {plan.owner} for {N} members")
    tags = set()
    for h in plan.hops:
        if not (0 <= h.src < N and 0 <= h.dst < N and h.src != h.dst and 0 <= h.seg < N and 0 <= h.round < R):
            raise ValueError(f"{plan.topology}: {h} out of range")
        if (h.src, h.dst, h.phase, h.step) in tags:
            raise ValueError(f"{plan.topology}: two hops tagged {h.phase}/{h.step} on link {h.src} -> {h.dst}")
        tags.add((h.src, h.dst, h.phase, h.step))
    for g in range(N):
        have: dict[int, int] = {}  # member -> the round after which it holds its part of segment g
        contributors: dict[int, frozenset[int]] = {}  # member -> whose values its partial sum of g holds
        for m in plan.starts_of(g):
            have[m], contributors[m] = 0, frozenset([m])
        if not plan.inbound(plan.owner[g], g):  # an owner that receives nothing (a single member) sums itself
            have.setdefault(plan.owner[g], 0)
            contributors.setdefault(plan.owner[g], frozenset([plan.owner[g]]))
        pending = [m for m in range(N) if plan.inbound(m, g)]
        while pending:  # a member's sum of g, once every partial sum it adds to is known
            ready = [m for m in pending if all(h.src in contributors for h in plan.inbound(m, g))]
            if not ready:
                raise ValueError(f"{plan.topology}: members {pending} add to segment {g} what is never summed")
            for m in ready:
                ins = plan.inbound(m, g)
                parts = [contributors[h.src] for h in ins]
                total = frozenset().union(*parts) | {m}
                if m in contributors or sum(map(len, parts)) + 1 != len(total):
                    raise ValueError(f"{plan.topology}: member {m}'s sum of segment {g} counts someone twice")
                have[m], contributors[m] = max(h.round for h in ins) + 1, total
                pending.remove(m)
        for h in plan.hops:
            if h.seg == g and not h.final and (h.src not in have or have[h.src] > h.round):
                raise ValueError(f"{plan.topology}: {h} sends what member {h.src} does not hold yet")
        owner = plan.owner[g]
        if contributors.get(owner) != frozenset(range(N)):
            raise ValueError(f"{plan.topology}: the owner {owner} of segment {g} does not sum every member")
        holds = {owner: have[owner]}
        for h in sorted((h for h in plan.hops if h.seg == g and h.final), key=lambda h: h.round):
            if h.src not in holds or holds[h.src] > h.round or h.dst in holds:
                raise ValueError(f"{plan.topology}: {h} is not one arrival of bytes its sender holds")
            holds[h.dst] = h.round + 1
        if len(holds) != N:
            raise ValueError(f"{plan.topology}: members {sorted(set(range(N)) - set(holds))} never get segment {g}")
