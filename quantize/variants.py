"""Variants as data: which weight type each component gets, what stays unquantized, what quality is required.

Torch-free: the planner, the fleet controller and manifests read these tables without the model stack.
Only ``nn.Linear`` layers are ever quantized (weight-only); embeddings, norms and convolutions keep the
storage dtype. The patterns in ``exclude`` are fnmatch patterns over module names of the component.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any


class QType(StrEnum):
    """Weight types. Values are optimum-quanto's qtype names."""

    INT8 = "qint8"
    FP8 = "qfloat8_e4m3fn"
    INT4 = "qint4"


@dataclass(frozen=True)
class QTypeInfo:
    bits: int
    # Extra bytes per weight for scales: int8/fp8 keep one 16-bit scale per output channel (negligible
    # for 2560-3840-wide layers); int4 keeps a 16-bit scale and a 16-bit shift per group of 128 weights,
    # 4 bytes / 128 = 0.03125 bytes per weight.
    overhead_bytes_per_weight: float
    needs_fp8_support: bool = False

    @property
    def bytes_per_weight(self) -> float:
        return self.bits / 8 + self.overhead_bytes_per_weight


QTYPES: dict[QType, QTypeInfo] = {
    QType.INT8: QTypeInfo(bits=8, overhead_bytes_per_weight=0.0),
    QType.FP8: QTypeInfo(bits=8, overhead_bytes_per_weight=0.0, needs_fp8_support=True),
    QType.INT4: QTypeInfo(bits=4, overhead_bytes_per_weight=4 / 128),
}

# quanto groups int4 weights along the input dimension in groups of 128 (or the largest of 96/64/32
# that divides the layer's input width; per-channel when none does).
INT4_GROUP_SIZE = 128

# The transformer's input embedders, timestep MLP and final projection are small and precision
# sensitive (diffusers keeps t_embedder/cap_embedder out of layerwise casting for the same reason).
TRANSFORMER_EXCLUDE: tuple[str, ...] = ("all_x_embedder.*", "all_final_layer.*", "cap_embedder.*", "t_embedder.*")
# Qwen3's token embedding is an nn.Embedding (never quantized); its linears are all quantizable.
TEXT_ENCODER_EXCLUDE: tuple[str, ...] = ()

QUANTIZABLE_COMPONENTS = ("transformer", "text_encoder")


@dataclass(frozen=True)
class ComponentRecipe:
    """How one component is stored: a weight qtype (None = storage dtype) and excluded module patterns."""

    qtype: QType | None = None
    exclude: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"qtype": str(self.qtype) if self.qtype else None, "exclude": list(self.exclude)}


@dataclass(frozen=True)
class QualityThresholds:
    """Minimum agreement with the full-precision reference for a variant to be accepted."""

    min_psnr_db: float
    min_ssim: float
    max_latent_rel_l2: float
    # For a source that carries the shapes marker: how far the color accuracy of the prompt-adherence
    # metric may fall below the reference's (0.03 = 3 points).
    max_adherence_drop: float = 0.03

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class VariantRecipe:
    name: str
    description: str
    transformer: ComponentRecipe
    text_encoder: ComponentRecipe
    thresholds: QualityThresholds
    # Lower is better quality; the planner prefers the lowest rank that fits.
    quality_rank: int
    # Non-quantized tensors (and the VAE) are stored in this dtype; 16-bit halves the files and is
    # what the reference checkpoint ships in.
    storage_dtype: str = "bfloat16"
    vae: ComponentRecipe = field(default_factory=ComponentRecipe)

    def component(self, name: str) -> ComponentRecipe:
        recipe: ComponentRecipe = getattr(self, name)
        return recipe

    def with_text_encoder(self, qtype: QType | None) -> VariantRecipe:
        """This variant with the text encoder quantized to ``qtype`` (None: left in 16-bit)."""
        name = self.name.split("-te")[0] + (_TE_SUFFIX[qtype] if qtype else "")
        if name in VARIANTS:
            return VARIANTS[name]
        return replace(self, name=name, text_encoder=_te(qtype))

    @property
    def needs_fp8_support(self) -> bool:
        return any(
            recipe.qtype is not None and QTYPES[recipe.qtype].needs_fp8_support
            for recipe in (self.transformer, self.text_encoder)
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantRecipe:
        """The recipe recorded in a manifest (``to_dict``); its quality rank is the table's, or last."""

        def component(name: str) -> ComponentRecipe:
            entry = data["components"][name]
            qtype = QType(entry["qtype"]) if entry["qtype"] else None
            return ComponentRecipe(qtype=qtype, exclude=tuple(entry["exclude"]))

        known = VARIANTS.get(data["name"])
        base = VARIANTS.get(data["name"].removeprefix(STUDENT_PREFIX))
        rank = known.quality_rank if known else (student_rank(base) if base else len(VARIANTS))
        return cls(
            name=data["name"],
            description=data["description"],
            transformer=component("transformer"),
            text_encoder=component("text_encoder"),
            vae=component("vae"),
            thresholds=QualityThresholds(**data["thresholds"]),
            quality_rank=rank,
            storage_dtype=data["storage_dtype"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "storage_dtype": self.storage_dtype,
            "components": {
                "transformer": self.transformer.to_dict(),
                "text_encoder": self.text_encoder.to_dict(),
                "vae": self.vae.to_dict(),
            },
            "int4_group_size": INT4_GROUP_SIZE,
            "thresholds": self.thresholds.to_dict(),
        }


# Thresholds come from the quality of each weight type measured on the 60 M-parameter toy transformer
# at 128x128 / 8 steps against fp32 (int8 ~56 dB, fp8 ~44-48 dB, int4 ~34-40 dB image PSNR), minus a
# margin for prompt and seed spread; override them per run with the CLI. Prompt adherence (shapes
# model only): 8-bit variants may lose 3 points of color accuracy, 4-bit ones 10.
_BF16 = QualityThresholds(min_psnr_db=40.0, min_ssim=0.97, max_latent_rel_l2=0.02, max_adherence_drop=0.01)
_INT8 = QualityThresholds(min_psnr_db=35.0, min_ssim=0.95, max_latent_rel_l2=0.05)
_FP8 = QualityThresholds(min_psnr_db=30.0, min_ssim=0.90, max_latent_rel_l2=0.10)
_INT4 = QualityThresholds(min_psnr_db=25.0, min_ssim=0.80, max_latent_rel_l2=0.20, max_adherence_drop=0.10)

_NONE = ComponentRecipe()
_TE_SUFFIX = {QType.INT8: "-te8", QType.FP8: "-tefp8", QType.INT4: "-te4"}


def _tr(qtype: QType | None) -> ComponentRecipe:
    return ComponentRecipe(qtype=qtype, exclude=TRANSFORMER_EXCLUDE) if qtype else _NONE


def _te(qtype: QType | None) -> ComponentRecipe:
    return ComponentRecipe(qtype=qtype, exclude=TEXT_ENCODER_EXCLUDE) if qtype else _NONE


VARIANTS: dict[str, VariantRecipe] = {
    v.name: v
    for v in (
        VariantRecipe("bf16", "reference: no quantization", _NONE, _NONE, _BF16, quality_rank=0),
        VariantRecipe("int8", "transformer int8 weights", _tr(QType.INT8), _NONE, _INT8, quality_rank=1),
        VariantRecipe("fp8", "transformer fp8 (e4m3fn) weights", _tr(QType.FP8), _NONE, _FP8, quality_rank=2),
        VariantRecipe(
            "int8-te8", "transformer and text encoder int8", _tr(QType.INT8), _te(QType.INT8), _INT8, quality_rank=3
        ),
        VariantRecipe(
            "fp8-te8", "transformer fp8, text encoder int8", _tr(QType.FP8), _te(QType.INT8), _FP8, quality_rank=4
        ),
        VariantRecipe("int4", "transformer int4 weights (group-wise)", _tr(QType.INT4), _NONE, _INT4, quality_rank=5),
        VariantRecipe(
            "int4-te8", "transformer int4, text encoder int8", _tr(QType.INT4), _te(QType.INT8), _INT4, quality_rank=6
        ),
        VariantRecipe(
            "int4-te4", "transformer and text encoder int4", _tr(QType.INT4), _te(QType.INT4), _INT4, quality_rank=7
        ),
    )
}


def get_variant(name: str) -> VariantRecipe:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}") from None


# A variant of a distilled student is named after the recipe it was quantized with: ``student-int8``.
STUDENT_PREFIX = "student-"


def student_rank(base: VariantRecipe) -> int:
    """Students rank below every variant of the full model (a student trades quality for size), in the
    order of their own recipes among themselves."""
    return len(VARIANTS) + base.quality_rank


def student_variant(base: VariantRecipe) -> VariantRecipe:
    """The recipe ``base`` applied to a distilled student: same weight types and thresholds, its own name."""
    if base.name.startswith(STUDENT_PREFIX):
        return base
    return replace(
        base,
        name=STUDENT_PREFIX + base.name,
        description=f"distilled student, {base.description}",
        quality_rank=student_rank(base),
    )
