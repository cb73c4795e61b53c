"""Which prefetches are still worth running when the staging thread gets to them late.

Prefetches are asked for in the order of use, and the staging thread may run one after the compute thread has
already got there (under load). Loading it then reads bytes a second time and evicts chunks needed sooner. So a
prefetch is dropped when
- its chunk was acquired in that tier after it was asked for (its use overtook it), or
- an earlier prefetch of the same burst (asked for with no acquire in between) found no room and its chunk is
  still missing: that chunk's use comes first and would evict this one.

`ChunkStore` calls these with its lock held; they only keep clocks and read chunk state.
"""

from __future__ import annotations

from typing import NamedTuple

from .chunks import Chunk, Tier

__all__ = ["PrefetchOrder", "Ticket"]


class Ticket(NamedTuple):
    """When a prefetch was asked for: the order's clock, and the burst (acquires counted so far)."""

    asked: int
    burst: int


class PrefetchOrder:
    """The clocks of acquires and prefetch requests, per chunk and tier."""

    def __init__(self) -> None:
        self._clock = 0
        self._acquires = 0
        self._demanded: dict[tuple[int, Tier], int] = {}  # (id(chunk), tier) -> clock of its latest acquire
        self._left_out: dict[Tier, tuple[Ticket, Chunk]] = {}  # tier -> the latest prefetch that found no room

    def acquired(self, chunk: Chunk, tier: Tier) -> None:
        """An acquire of `chunk` in `tier` begins: every prefetch of it asked for before is overtaken."""
        self._clock += 1
        self._acquires += 1
        self._demanded[(id(chunk), tier)] = self._clock

    def ask(self) -> Ticket:
        """A prefetch is asked for now."""
        self._clock += 1
        return Ticket(self._clock, self._acquires)

    def stale(self, chunk: Chunk, tier: Tier, ticket: Ticket | None) -> bool:
        """Whether the prefetch of `ticket` comes too late (None: a demand, never stale): overtaken by its chunk's
        use, or jumping over a prefetch of its burst that was left out for want of room."""
        if ticket is None:
            return False
        if self._overtaken(chunk, tier, ticket):
            return True
        left_out = self._left_out.get(tier)
        if left_out is None:
            return False
        earlier, missing = left_out
        return earlier.burst == ticket.burst and missing is not chunk and self._missing(missing, tier, earlier)

    def ran(self, chunk: Chunk, tier: Tier, ticket: Ticket) -> None:
        """The prefetch has run; if it found no room, the prefetches of its burst after it wait for its chunk."""
        if self._missing(chunk, tier, ticket):
            self._left_out[tier] = (ticket, chunk)

    def _missing(self, chunk: Chunk, tier: Tier, ticket: Ticket) -> bool:
        """`chunk` is not in `tier` (nor loading), and its use is still to come."""
        return tier not in chunk.buffers and tier not in chunk.loading and not self._overtaken(chunk, tier, ticket)

    def _overtaken(self, chunk: Chunk, tier: Tier, ticket: Ticket) -> bool:
        return self._demanded.get((id(chunk), tier), 0) > ticket.asked
