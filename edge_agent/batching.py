"""The micro-batching rule: a pure function over the pending queue and the clock.

The oldest request decides: it is served first, with the compatible requests behind it (same size,
steps, guidance and sequence length: they can share one pipeline call), up to ``max_images`` images.
It waits for companions at most ``window`` seconds after it arrived; a full batch goes at once.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pending:
    key: Hashable  # requests with equal keys can share a batch
    images: int  # how many images the request adds to the batch
    enqueued_at: float


@dataclass(frozen=True)
class BatchDecision:
    take: tuple[int, ...]  # indices into the pending sequence, oldest first; empty: wait
    wake_at: float | None  # when to decide again if nothing else happens (None: nothing to wait for)


def collate(pending: Sequence[Pending], now: float, max_images: int, window: float) -> BatchDecision:
    """Which pending requests to run now, or when to look again."""
    if not pending:
        return BatchDecision((), None)
    head = pending[0]
    take = [0]
    images = head.images
    for index in range(1, len(pending)):
        item = pending[index]
        if item.key != head.key or images + item.images > max_images:
            continue
        take.append(index)
        images += item.images
        if images == max_images:
            break
    deadline = head.enqueued_at + window
    if images >= max_images or now >= deadline:
        return BatchDecision(tuple(take), None)
    return BatchDecision((), deadline)
