"""When outer steps happen: one answer for every transport.

Plain DiLoCo is the case P = 1, tau = 0 of Streaming DiLoCo (streaming.py): with H = ``diloco.inner_steps``, P =
``diloco.fragments`` and tau = ``diloco.overlap_steps``, outer step r syncs fragment r mod P. Its sync starts (the
pseudo-gradient is taken) after

    launch(r) = (r // P + 1) H + floor((r mod P) H / P)

inner steps, and its mean lands (the outer update is applied) tau inner steps later. Fragments are staggered within
each round so one fragment (1/P of the bytes) is on the wire at a time. Outer steps are counted in this order on
every island, so an island that knows how many outer steps the run has completed knows which fragment is next and
where it starts, also after a restart or a re-sync from a peer.

Pure Python, no jax: the transports, the trainer and the benchmarks ask the same object.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Schedule:
    inner_steps: int  # H
    fragments: int = 1  # P
    overlap_steps: int = 0  # tau

    def __post_init__(self):
        H, P, tau = self.inner_steps, self.fragments, self.overlap_steps
        if H < 1 or not 1 <= P <= H or tau < 0 or tau * P >= H:
            # (DilocoConfig.validate says the same to a user, naming the settings)
            raise ValueError(f"a schedule needs H >= 1, 1 <= P <= H and 0 <= tau with tau P < H (each fragment its "
                             f"own sync step, each mean applied before the next fragment syncs), not {self}")

    def fragment(self, r: int) -> int:
        """The fragment outer step r syncs."""
        return r % self.fragments

    def offset(self, p: int) -> int:
        """Inner steps between a round's start and fragment p's sync."""
        return p * self.inner_steps // self.fragments

    def launch(self, r: int) -> int:
        """The inner step after which outer step r's sync starts."""
        return (r // self.fragments + 1) * self.inner_steps + self.offset(r % self.fragments)

    def land(self, r: int) -> int:
        """The inner step after which outer step r's mean is applied."""
        return self.launch(r) + self.overlap_steps

    def due(self, step: int) -> int | None:
        """The fragment whose sync starts after `step` inner steps, or None."""
        for p in range(self.fragments):
            off = self.offset(p)
            if step >= self.inner_steps + off and (step - off) % self.inner_steps == 0:
                return p
        return None

    def at_boundary(self, step: int) -> bool:
        """Whether every island holds the global state after `step` inner steps: plain DiLoCo's outer steps (with
        fragments there is no such step; a fragment's sync is a boundary for that fragment only)."""
        return step % self.inner_steps == 0

    def completed_by(self, step: int) -> int:
        """Outer steps whose mean has landed after `step` inner steps (where a run resumed at `step` stands)."""
        lo, hi = 0, (step // self.inner_steps + 1) * self.fragments
        while lo < hi:  # the first r whose mean lands after `step` (land is increasing in r)
            mid = (lo + hi) // 2
            if self.land(mid) <= step:
                lo = mid + 1
            else:
                hi = mid
        return lo
