"""Which chunk leaves a full memory tier, and whether waiting can make room instead.

`ChunkStore` asks these, under its lock, while a tier is over budget. They only read chunk state. The order of
eviction, first to last: chunks used already before chunks prefetched and not used yet (evicting one would only
read it again), least recently used first; chunks created with `keep` (LoRA adapters) only when no other chunk
can go. A write in flight will free room by itself, so it is waited for rather than evicting a kept chunk or
throwing away a prefetch.
"""

from __future__ import annotations

from collections.abc import Collection

from .chunks import Chunk, Tier

__all__ = ["choose_victim", "describe_holders", "may_free_later"]


def choose_victim(
    chunks: Collection[Chunk],
    tier: Tier,
    *,
    exclude: Chunk | None,
    busy: Collection[int],
    writes_in_flight: bool,
    can_spill: bool,
) -> Chunk | None:
    """The chunk to evict from `tier`, or None: there is none, or waiting for a write in flight is better.

    Args:
        exclude: the chunk room is made for; never its own victim.
        busy: ids of the chunks being written or moved between tiers, which are left alone.
        writes_in_flight: some write in flight frees room when it completes.
        can_spill: there is an NVMe backend, so a host chunk holding the only copy of its bytes may leave (it
            is written first).
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
    return max(candidates, key=lambda chunk: chunk.last_use, default=None)  # the prefetch needed last


def may_free_later(chunks: Collection[Chunk], tier: Tier, *, exclude: Chunk | None, moving: Collection[int]) -> bool:
    """Whether memory in `tier` may still be freed by someone else: a held chunk, a load in flight, or a chunk
    another thread is moving between tiers (`moving`: their ids)."""
    if any(key != id(exclude) for key in moving):
        return True
    return any((chunk.loading or chunk.pinned(tier)) and chunk is not exclude for chunk in chunks)


def describe_holders(chunks: Collection[Chunk], tier: Tier) -> str:
    """The chunks occupying `tier` (loading or present), for the error that says it cannot make room."""
    return ", ".join(
        f"{c.key}{'' if tier in c.buffers else ' (loading)'}" for c in chunks if tier in c.buffers or tier in c.loading
    )
