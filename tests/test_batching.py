from __future__ import annotations

from edge_agent.batching import Pending, collate

A, B = ("512", 8), ("1024", 8)


def test_empty_queue_waits_for_nothing() -> None:
    assert collate([], now=0.0, max_images=4, window=0.01).take == ()
    assert collate([], now=0.0, max_images=4, window=0.01).wake_at is None


def test_a_lone_request_waits_for_the_window_then_goes() -> None:
    pending = [Pending(A, 1, enqueued_at=10.0)]
    early = collate(pending, now=10.004, max_images=4, window=0.01)
    assert early.take == ()
    assert early.wake_at == 10.01
    assert collate(pending, now=10.01, max_images=4, window=0.01).take == (0,)


def test_a_full_batch_goes_at_once_oldest_first() -> None:
    pending = [
        Pending(A, 1, 0.0), Pending(B, 1, 0.001), Pending(A, 2, 0.002), Pending(A, 1, 0.003), Pending(A, 1, 0.004)
    ]  # fmt: skip
    decision = collate(pending, now=0.0045, max_images=4, window=1.0)
    assert decision.take == (0, 2, 3)  # 1 + 2 + 1 images of key A; B waits for its own batch
    assert decision.wake_at is None


def test_incompatible_or_oversized_requests_are_skipped_not_reordered() -> None:
    pending = [Pending(A, 3, 0.0), Pending(A, 2, 0.0), Pending(A, 1, 0.0)]
    assert collate(pending, now=5.0, max_images=4, window=0.01).take == (0, 2)


def test_a_head_larger_than_the_batch_still_runs() -> None:
    pending = [Pending(A, 8, 0.0), Pending(A, 1, 0.0)]
    assert collate(pending, now=0.0, max_images=4, window=0.01).take == (0,)


def test_zero_window_never_waits() -> None:
    assert collate([Pending(B, 1, 3.0)], now=3.0, max_images=8, window=0.0).take == (0,)
