from __future__ import annotations

import threading

import numpy as np
import pytest

from zimage_edge.errors import GenerationCancelled
from zimage_edge.model.generate import generate, generate_batch
from zimage_edge.request import GenerationRequest

REQUEST = GenerationRequest(prompt="a green triangle", width=128, height=96, seed=11)


class ForwardCounter:
    """Counts forward calls of a module and the batch sizes it saw."""

    def __init__(self, module) -> None:
        self.calls = 0
        self.batches: list[int] = []
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs, _output) -> None:
        self.calls += 1
        first = args[0] if args else kwargs["input_ids"]
        self.batches.append(len(first) if isinstance(first, list) else first.shape[0])

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture
def counters(tiny_loaded):
    pipe = tiny_loaded.pipe
    made = {
        "transformer": ForwardCounter(pipe.transformer),
        "text_encoder": ForwardCounter(pipe.text_encoder),
        "decoder": ForwardCounter(pipe.vae.decoder),
    }
    yield made
    for counter in made.values():
        counter.close()


def test_result_shape_progress_and_timings(tiny_loaded, counters) -> None:
    seen: list[tuple[int, int]] = []
    result = generate(tiny_loaded.pipe, REQUEST, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 8) for i in range(1, 9)]
    assert counters["transformer"].calls == 8  # Turbo: one transformer forward per step, no CFG
    assert result.images[0].size == (128, 96)
    assert result.seeds == [11]
    assert tuple(result.latents.shape) == (1, 16, 12, 16)
    t = result.timings
    assert min(t.encode_sec, t.denoise_sec, t.decode_sec) > 0
    assert t.total_sec >= t.encode_sec + t.denoise_sec + t.decode_sec - 1e-6


def test_guidance_runs_cfg_with_a_doubled_batch(tiny_loaded, counters) -> None:
    generate(tiny_loaded.pipe, REQUEST.model_copy(update={"guidance": 4.0, "negative_prompt": "blur"}))
    assert counters["transformer"].batches == [2] * 8
    assert counters["text_encoder"].calls == 2  # prompt and negative prompt


def test_cancellation_stops_within_one_step(tiny_loaded, counters) -> None:
    cancel = threading.Event()

    def on_step(done: int, _total: int) -> None:
        if done == 3:
            cancel.set()

    with pytest.raises(GenerationCancelled) as info:
        generate(tiny_loaded.pipe, REQUEST, on_step=on_step, cancel=cancel)
    # The event was set while step 3 reported progress; the check right after it stops the loop.
    assert info.value.step == 3
    assert counters["transformer"].calls == 3
    assert counters["decoder"].calls == 0


def test_cancelled_before_start_does_no_model_work(tiny_loaded, counters) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        generate(tiny_loaded.pipe, REQUEST, cancel=cancel)
    assert counters["text_encoder"].calls == 0
    assert counters["transformer"].calls == 0


def test_pipeline_is_usable_after_a_cancellation(tiny_loaded) -> None:
    cancel = threading.Event()
    with pytest.raises(GenerationCancelled):
        generate(tiny_loaded.pipe, REQUEST, on_step=lambda d, t: cancel.set(), cancel=cancel)
    assert generate(tiny_loaded.pipe, REQUEST).images[0].size == (128, 96)


def test_batched_images_equal_solo_images(tiny_loaded, counters) -> None:
    a = REQUEST
    b = REQUEST.model_copy(update={"prompt": "a yellow square on a black background", "seed": 40, "num_images": 2})
    solo = [generate(tiny_loaded.pipe, r) for r in (a, b)]
    counters["transformer"].batches.clear()
    batched = generate_batch(tiny_loaded.pipe, [a, b])
    assert counters["transformer"].batches == [3] * 8  # one pipeline call for three images
    assert [r.seeds for r in batched] == [[11], [40, 41]]
    for alone, together in zip(solo, batched, strict=True):
        for x, y in zip(alone.images, together.images, strict=True):
            # Per-image generators make batching transparent up to float summation order.
            assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 2


def test_incompatible_requests_are_not_batched(tiny_loaded) -> None:
    with pytest.raises(ValueError, match="share width"):
        generate_batch(tiny_loaded.pipe, [REQUEST, REQUEST.model_copy(update={"steps": 4})])


def test_random_seed_when_none_given(tiny_loaded) -> None:
    request = REQUEST.model_copy(update={"seed": None, "num_images": 2})
    result = generate(tiny_loaded.pipe, request)
    assert result.seeds[1] == result.seeds[0] + 1


def test_one_cancelled_request_leaves_the_batch_and_the_others_go_on(tiny_loaded, counters) -> None:
    a = REQUEST
    b = REQUEST.model_copy(update={"prompt": "a blue square", "seed": 50, "num_images": 2})
    c = REQUEST.model_copy(update={"prompt": "a white circle", "seed": 60})
    alone = generate(tiny_loaded.pipe, c)
    counters["transformer"].batches.clear()
    events = [threading.Event(), threading.Event(), None]

    def on_step(done: int, _total: int) -> None:
        if done == 2:
            events[1].set()  # the client of request b went away during step 2

    results = generate_batch(tiny_loaded.pipe, [a, b, c], on_step=on_step, cancels=events)
    # b's two rows leave after step 2: 4 rows for two steps, then 2 rows.
    assert counters["transformer"].batches == [4, 4] + [2] * 6
    assert [r.cancelled for r in results] == [False, True, False]
    assert results[1].images == []
    assert len(results[0].images) == len(results[2].images) == 1
    diff = np.abs(np.asarray(alone.images[0], np.int16) - np.asarray(results[2].images[0], np.int16))
    assert diff.max() <= 2


def test_all_requests_cancelled_stops_the_batch(tiny_loaded, counters) -> None:
    events = [threading.Event(), threading.Event()]
    b = REQUEST.model_copy(update={"seed": 99})

    def on_step(done: int, _total: int) -> None:
        for event in events:
            event.set()

    with pytest.raises(GenerationCancelled):
        generate_batch(tiny_loaded.pipe, [REQUEST, b], on_step=on_step, cancels=events)
    assert counters["transformer"].calls <= 2
    assert counters["decoder"].calls == 0
