"""Which chunk leaves a full memory tier, and whether waiting can make room instead.

`ChunkStore` asks these, under its lock, while a tier is over budget. They only read chunk state. The order of
eviction, first to last: chunks used already before chunks prefetched and not used yet (evicting one would only
read it again), least recently used first; chunks created with `keep` (LoRA adapters) only when no other chunk
can go. A write in flight will free room by itself, so it is waited for rather than evicting a kept chunk or
throwing away a prefetch. A prefetch never evicts a chunk prefetched and not used yet: prefetches are asked for
in the order of use, so that one is needed sooner, and the new one is skipped instead.
"""

from __future__ import annotations

from collections.abc import Collection

from .chunks import Chunk, Tier
from .sizes import format_bytes

__all__ = ["BudgetExceeded", "choose_victim", "may_free_later", "no_room"]


class BudgetExceeded(MemoryError):
    """A tier cannot make room: everything in it is in use. The message says which tier and how much."""


def choose_victim(
    chunks: Collection[Chunk],
    tier: Tier,
    *,
    exclude: Chunk | None,
    busy: Collection[int],
    writes_in_flight: bool,
    can_spill: bool,
    prefetch: bool = False,
) -> Chunk | None:
    """The chunk to evict from `tier`, or None: there is none, or waiting for a write in flight is better.

    Args:
        exclude: the chunk room is made for; never its own victim.
        busy: ids of the chunks being written or moved between tiers, which are left alone.
        writes_in_flight: some write in flight frees room when it completes.
        can_spill: there is an NVMe backend, so a host chunk holding the only copy of its bytes may leave (it
            is written first).
        prefetch: the room is for a prefetch, which takes none from a chunk prefetched and not used yet.
    """
    candidates = [
        chunk
        for chunk in chunks
        if tier in chunk.buffers
        and chunk is not exclude
        and not chunk.pinned(tier)
        and id(chunk) not in busy
        and (tier is Tier.DEVICE or can_spill or not chunk.only_copy_in(Tier.HOST))
    ]
    unkept = [chunk for chunk in candidates if not chunk.keep]
    if not unkept and writes_in_flight:
        return None  # a write in flight frees room without evicting a kept chunk (adapters stay resident)
    candidates = unkept or candidates
    used = [chunk for chunk in candidates if not chunk.prefetched]
    if used:
        return min(used, key=lambda chunk: chunk.last_use)
    if writes_in_flight:
        return None  # a write finishing frees room without throwing away a load made ahead of its use
    if prefetch:
        return None  # the loads made ahead are needed before the one asked for now: it is skipped instead
    return max(candidates, key=lambda chunk: chunk.last_use, default=None)  # the prefetch needed last


def may_free_later(chunks: Collection[Chunk], tier: Tier, *, exclude: Chunk | None, moving: Collection[int]) -> bool:
    """Whether memory in `tier` may still be freed by someone else: a held chunk, a load in flight, or a chunk
    another thread is moving between tiers (`moving`: their ids)."""
    if any(key != id(exclude) for key in moving):
        return True
    return any((chunk.loading or chunk.pinned(tier)) and chunk is not exclude for chunk in chunks)


def no_room(chunks: Collection[Chunk], tier: Tier, nbytes: int, used: int, limit: int) -> BudgetExceeded:
    """The error for a demand that cannot be met: `used` of the tier's `limit` bytes are held, naming by whom."""
    holders = ", ".join(
        f"{c.key}{'' if tier in c.buffers else ' (loading)'}" for c in chunks if tier in c.buffers or tier in c.loading
    )
    return BudgetExceeded(
        f"the {tier.value} tier cannot make room for {format_bytes(nbytes)}: {format_bytes(used)} of "
        f"{format_bytes(limit)} are held; raise the {tier.value} budget or lower the prefetch depth (held: {holders})"
    )
