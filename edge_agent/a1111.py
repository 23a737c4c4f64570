"""AUTOMATIC1111's web UI API beyond txt2img, as pydantic models and tables (they also make /openapi.json).

What A1111 clients call besides ``txt2img``: ``sd-models`` to check the server is up and list its
models, ``options`` to read and set the checkpoint, ``progress`` to poll a running request,
``samplers``/``schedulers`` to offer names, ``interrupt``/``skip`` to stop work. Shapes follow
A1111's own API models (``modules/api/models.py``) so clients parse them unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from quantize.identity import ModelIdentity

PREFIX = "/sdapi/v1/"


class SDModelItem(BaseModel):
    title: str = Field(description="what clients show and send back as sd_model_checkpoint")
    model_name: str
    hash: str | None = Field(description="the first 10 hex digits of sha256 (A1111's short hash)")
    sha256: str | None = Field(description="the artifact_id: sha256 of the artifact's manifest.json")
    filename: str = Field(description="where the node loads it from")
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    job: str = Field(description="id of the caller's running job, or empty")
    job_count: int = Field(description="the caller's jobs in flight (running and queued)")
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float = Field(ge=0, le=1, description="of the caller's jobs in flight, 0..1")
    eta_relative: float = Field(ge=0, description="seconds left, estimated from the pace so far")
    state: ProgressState
    current_image: str | None = Field(default=None, description="never sent: no previews are decoded")
    textinfo: str | None = None


class OptionsUpdate(BaseModel):
    """``POST /sdapi/v1/options``: only ``sd_model_checkpoint`` acts (a model swap, admin only)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    sd_model_checkpoint: str | None = Field(
        default=None, min_length=1, description="a title, name or hash from sd-models, or an artifact directory"
    )

    def ignored(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class OptionsResult(BaseModel):
    applied: list[str]
    ignored: list[str] = Field(description="accepted A1111 options that have no meaning on this node")


# The one sampler Z-Image-Turbo runs: flow-matching Euler on the scheduler's shifted sigmas. The
# aliases are the names A1111 clients commonly send for it.
SAMPLERS = [
    SamplerItem(name="Euler", aliases=["k_euler", "FlowMatchEuler", "flow_match_euler"], options={}),
]
SCHEDULERS = [
    SchedulerItem(name="automatic", label="Automatic", aliases=["flow_match_shift_3"]),
]
# A1111 options that have a meaning here are answered from the node; these others keep A1111's
# defaults, so that clients reading them find what they expect. Setting them changes nothing.
OPTION_DEFAULTS: dict[str, Any] = {
    "samples_format": "png",
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0,
    "live_previews_enable": False,
    "sd_checkpoint_cache": 0,
}


def title(identity: ModelIdentity) -> str:
    """A1111 titles a checkpoint ``name [short hash]``."""
    return f"{identity.variant} [{identity.short_hash}]"


def model_item(identity: ModelIdentity) -> SDModelItem:
    return SDModelItem(
        title=title(identity),
        model_name=identity.variant,
        hash=identity.short_hash,
        sha256=identity.id,
        filename=identity.source,
    )


def find_model(known: dict[str, ModelIdentity], wanted: str) -> ModelIdentity | None:
    """The known model a client names by title, sha256 or short hash (or name, when unambiguous)."""
    for identity in known.values():
        if wanted in (title(identity), identity.id, identity.short_hash):
            return identity
    by_name = [i for i in known.values() if i.variant == wanted]
    return by_name[0] if len(by_name) == 1 else None
