"""The generation request: one validated contract shared by the CLI, the agent's APIs and benchmarks.

Validation happens here, before any model work: sizes must be multiples of 16 (the VAE's factor 8
times the transformer's 2x2 patch) within the configured limits; Turbo's defaults are 8 steps and
guidance 0.0 (not diffusers' generic 50 / 5.0). Types are strict: ``"8"`` is not a step count.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Z-Image-Turbo is distilled for 8 steps; more than this buys nothing on a Turbo model and a site
# app asking for 1000 steps would hold the GPU for minutes.
DEFAULT_STEPS = 8
MAX_STEPS = 50
# Latent side = pixels / 8, patches = latent / 2: any multiple of 16 maps to whole patches.
SIZE_MULTIPLE = 16
MIN_SIDE = 64
# 2048 px per side is the largest the real model is used at; the position table (axes_lens 512
# patches per side) would allow 8192 but memory on edge nodes does not.
MAX_SIDE = 2048
MAX_IMAGES = 8
# Pixels one request may draw in all (width x height x images): four images at the largest side.
# The contract's own ceiling, whatever the node; each agent refuses less through its device budget
# (``edge_agent.budget``: the planner's memory model for the loaded variant on that device).
MAX_REQUEST_PIXELS = 4 * MAX_SIDE * MAX_SIDE
# Prompt length in characters; the tokenizer truncates at max_sequence_length tokens anyway, this
# rejects absurd bodies early with a clear message.
MAX_PROMPT_CHARS = 4000
DEFAULT_MAX_SEQUENCE_LENGTH = 512
MAX_SEED = 2**63 - 1

Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, description=f"pixels, a multiple of {SIZE_MULTIPLE}")]


class GenerationRequest(BaseModel):
    """One text-to-image request. Frozen and hashable so it can key caches and batches."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")
    negative_prompt: str = Field(
        default="", max_length=MAX_PROMPT_CHARS, description="what to avoid; used only when guidance > 0"
    )
    width: Side = Field(default=1024, description=f"image width in pixels, a multiple of {SIZE_MULTIPLE}")
    height: Side = Field(default=1024, description=f"image height in pixels, a multiple of {SIZE_MULTIPLE}")
    steps: int = Field(default=DEFAULT_STEPS, ge=1, le=MAX_STEPS, description="denoising steps (Turbo: 8)")
    guidance: float = Field(
        default=0.0, ge=0.0, le=20.0, description="classifier-free guidance scale (Turbo: 0.0, no CFG)"
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="seed of the first image; image i uses seed + i"
    )
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES, description="images to draw for this prompt")
    max_sequence_length: int = Field(
        default=DEFAULT_MAX_SEQUENCE_LENGTH, ge=32, le=1024, description="prompt tokens kept (padded length)"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % SIZE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIZE_MULTIPLE}, got {value}")
        return value

    @model_validator(mode="after")
    def _within_pixel_budget(self) -> GenerationRequest:
        pixels = self.width * self.height * self.num_images
        if pixels > MAX_REQUEST_PIXELS:
            raise ValueError(
                f"width*height*num_images = {pixels} exceeds {MAX_REQUEST_PIXELS} pixels per request; "
                "ask for fewer or smaller images"
            )
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError("seed + num_images - 1 exceeds the largest seed")
        return self

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 0.0

    def batch_key(self) -> tuple[int, int, int, float, int]:
        """Requests with equal keys can run in one pipeline call."""
        return (self.width, self.height, self.steps, self.guidance, self.max_sequence_length)


def describe_validation_error(exc: Exception) -> str:
    """One line per failing field, ``field: message``, for CLIs and HTTP error bodies."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "request"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return "; ".join(lines)
