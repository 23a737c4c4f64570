from __future__ import annotations

import pytest
from pydantic import ValidationError

from zimage_edge.request import DEFAULT_STEPS, GenerationRequest, describe_validation_error


def test_turbo_defaults_not_diffusers_defaults() -> None:
    request = GenerationRequest(prompt="a red circle")
    assert request.steps == DEFAULT_STEPS == 8
    assert request.guidance == 0.0
    assert not request.uses_cfg
    assert (request.width, request.height) == (1024, 1024)


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"width": 1000}, "width", "multiple of 16"),
        ({"height": 520}, "height", "multiple of 16"),
        ({"width": 4096}, "width", "less than or equal to 2048"),
        ({"height": 32}, "height", "greater than or equal to 64"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"steps": 51}, "steps", "less than or equal to 50"),
        ({"steps": "8"}, "steps", "valid integer"),
        ({"steps": 8.0}, "steps", "valid integer"),
        ({"steps": True}, "steps", "valid integer"),
        ({"width": "512"}, "width", "valid integer"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "   \n"}, "prompt", "must not be blank"),
        ({"prompt": 5}, "prompt", "valid string"),
        ({"prompt": "x" * 4001}, "prompt", "at most 4000"),
        ({"guidance": -1.0}, "guidance", "greater than or equal to 0"),
        ({"guidance": "high"}, "guidance", "valid number"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"num_images": 0}, "num_images", "greater than or equal to 1"),
        ({"num_images": 9}, "num_images", "less than or equal to 8"),
        ({"max_sequence_length": 8}, "max_sequence_length", "greater than or equal to 32"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_name_the_field(fields: dict[str, object], field: str, fragment: str) -> None:
    data: dict[str, object] = {"prompt": "a red circle", **fields}
    with pytest.raises(ValidationError) as info:
        GenerationRequest.model_validate(data)
    message = describe_validation_error(info.value)
    assert message.startswith(f"{field}: "), message
    assert fragment in message


def test_pixel_budget_counts_every_image_of_a_request() -> None:
    GenerationRequest(prompt="ok", width=2048, height=2048, num_images=4)
    GenerationRequest(prompt="ok", width=1024, height=1024, num_images=8)
    with pytest.raises(ValidationError, match="width\\*height\\*num_images = 20971520 exceeds"):
        GenerationRequest(prompt="ok", width=2048, height=2048, num_images=5)


def test_seed_range_covers_every_image() -> None:
    GenerationRequest(prompt="ok", seed=2**63 - 2, num_images=2)
    with pytest.raises(ValidationError, match="seed \\+ num_images"):
        GenerationRequest(prompt="ok", seed=2**63 - 1, num_images=2)


def test_requests_are_hashable_and_batch_keys_group_compatible_ones() -> None:
    a = GenerationRequest(prompt="a", width=256, height=256, seed=1)
    b = GenerationRequest(prompt="b", width=256, height=256, seed=2, num_images=2)
    c = GenerationRequest(prompt="a", width=512, height=256, seed=1)
    assert a.batch_key() == b.batch_key() != c.batch_key()
    assert len({a, a.model_copy(), b}) == 2


def test_json_input_accepts_integers_for_floats() -> None:
    request = GenerationRequest.model_validate_json('{"prompt": "p", "guidance": 1, "width": 512}')
    assert request.guidance == 1.0
    assert request.width == 512
