"""Request and response bodies of the three APIs, as pydantic models (they also make /openapi.json).

Each API's request turns into the one ``GenerationRequest`` contract; then the site's guard applies
(size and image limits, prompt length, deny-list), still before any model work. A request that names
no size gets the loaded model's own (``default_size``: 64 for the shapes model, else the contract's).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.errors import ApiError, from_validation
from edge_agent.settings import GuardSettings
from zimage_edge.request import MAX_IMAGES, GenerationRequest

OutputFormat = Literal["png", "jpeg", "webp"]


class NativeGenerate(GenerationRequest):
    """``POST /v1/generate``: the generation request plus how to answer."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    num_images: int = Field(
        default=1, ge=1, le=MAX_IMAGES, validation_alias=AliasChoices("n", "num_images"), description="images to draw"
    )
    output_format: OutputFormat = Field(default="png", description="image encoding")
    stream: bool = Field(default=False, description="answer with Server-Sent Events: one per step, then the result")

    def generation(self, default_size: int) -> GenerationRequest:
        data = self.model_dump(exclude={"output_format", "stream"})
        for side in ("width", "height"):
            if side not in self.model_fields_set:
                data[side] = default_size
        return GenerationRequest.model_validate(data)


class NativeImage(BaseModel):
    b64: str = Field(description="the encoded image, base64")
    seed: int = Field(description="the seed that drew it")


class NativeResult(BaseModel):
    id: str
    model: str
    images: list[NativeImage]
    mime: str
    timings: dict[str, float | int]
    queue_wait_sec: float
    cached: bool


class OpenAIImagesRequest(BaseModel):
    """``POST /v1/images/generations`` as the OpenAI Images API defines it (fields that apply here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(description="what to draw")
    model: str | None = Field(default=None, description="ignored: the node serves its loaded model")
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="number of images")
    # Five digits a side is past any size the model takes, and keeps int() far from Python's digit limit.
    size: str | None = Field(
        default=None, pattern=r"^\d{1,5}x\d{1,5}$", description="WIDTHxHEIGHT (default: the model's own size)"
    )
    response_format: Literal["b64_json", "url"] = Field(default="b64_json", description="inline or by link")
    output_format: OutputFormat = Field(default="png", description="image encoding")
    quality: str | None = Field(default=None, description="accepted for compatibility; Turbo always runs 8 steps")
    style: str | None = Field(default=None, description="accepted for compatibility; ignored")
    user: str | None = Field(default=None, description="end-user id, logged")
    seed: int | None = Field(default=None, ge=0, description="extension: a fixed seed")

    def generation(self, default_size: int) -> GenerationRequest:
        width, height = (int(v) for v in self.size.split("x")) if self.size else (default_size, default_size)
        return GenerationRequest(prompt=self.prompt, width=width, height=height, num_images=self.n, seed=self.seed)


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


def _default(name: str) -> Any:
    """A GenerationRequest default, read from the contract rather than written again."""
    return GenerationRequest.model_fields[name].default


class A1111Txt2Img(BaseModel):
    """``POST /sdapi/v1/txt2img`` as AUTOMATIC1111's web UI API defines it.

    A1111 clients send dozens of fields (samplers, hires fix, scripts); the ones that have no meaning
    for Z-Image-Turbo are accepted and ignored, so existing clients work unchanged. The fields that do
    have a meaning are typed as strictly as the native API's: ``"steps": true`` is not one step.
    """

    # strict applies to the declared fields; the extra ones are kept as sent, and only listed.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    prompt: str = Field(description="what to draw")
    negative_prompt: str = Field(default="", description="what to avoid (used when cfg_scale > 0)")
    steps: int = Field(default=_default("steps"), description="denoising steps")
    cfg_scale: float = Field(default=_default("guidance"), allow_inf_nan=False, description="guidance scale (Turbo: 0)")
    width: int | None = Field(default=None, description="pixels, multiple of 16 (default: the model's own size)")
    height: int | None = Field(default=None, description="pixels, multiple of 16 (default: the model's own size)")
    seed: int = Field(default=-1, ge=-1, description="-1 for random")
    batch_size: int = Field(default=1, ge=1, le=MAX_IMAGES, description="images per batch")
    n_iter: int = Field(default=1, ge=1, le=MAX_IMAGES, description="batches (multiplies batch_size)")

    @model_validator(mode="after")
    def _image_count(self) -> A1111Txt2Img:
        if self.batch_size * self.n_iter > MAX_IMAGES:
            raise ValueError(f"batch_size * n_iter = {self.batch_size * self.n_iter} exceeds {MAX_IMAGES} images")
        return self

    def generation(self, default_size: int) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            guidance=float(self.cfg_scale),
            width=default_size if self.width is None else self.width,
            height=default_size if self.height is None else self.height,
            seed=None if self.seed < 0 else self.seed,
            num_images=self.batch_size * self.n_iter,
        )

    def known_fields(self) -> dict[str, Any]:
        """The validated fields, as A1111 echoes them in ``parameters``; ignored ones are not echoed."""
        return self.model_dump(include=set(type(self).model_fields))

    def ignored_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class A1111Response(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="artifact or diffusers directory to load")


def _validated(make: Callable[[], Any]) -> Any:
    try:
        return make()
    except ValidationError as exc:
        raise from_validation(exc) from exc


def parse(model: type[BaseModel], data: Any) -> Any:
    return _validated(lambda: model.model_validate(data))


def to_generation(body: Any, default_size: int) -> GenerationRequest:
    """The body's GenerationRequest (``default_size`` where it names no size); its validation errors
    become 422s naming the body's field."""
    request: GenerationRequest = _validated(lambda: body.generation(default_size))
    return request


def apply_guard(request: GenerationRequest, guard: GuardSettings, deny: list[re.Pattern[str]]) -> None:
    """The site's limits, stricter than the model's: 422 for sizes, 400 naming the rule for prompts."""
    for name, value in (("width", request.width), ("height", request.height)):
        if value > guard.max_side:
            raise ApiError(422, "invalid_request", f"{name}: at most {guard.max_side} on this node", field=name)
    if request.num_images > guard.max_images:
        raise ApiError(
            422, "invalid_request", f"n: at most {guard.max_images} images per request on this node", field="n"
        )
    for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(text) > guard.max_prompt_chars:
            raise ApiError(
                400, "prompt_rejected", f"{name}: longer than {guard.max_prompt_chars} characters (rule: length)",
                field=name,
            )  # fmt: skip
    for pattern in deny:
        if pattern.search(request.prompt):
            raise ApiError(400, "prompt_rejected", f"prompt: matches the deny rule {pattern.pattern!r}", field="prompt")
