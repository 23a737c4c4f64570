"""The quantization backend interface and its optimum-quanto implementation.

Everything that knows about a particular quantization library lives behind ``QuantBackend``, so
another (torchao, say) can be added as one more entry in ``BACKENDS``. quanto's path that works for
every component: ``quantize`` -> ``freeze`` -> ``state_dict`` + ``quantization_map`` saved side by side;
reload with ``requantize`` onto a meta-device skeleton (no float copy of the weights ever exists).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from quantize.variants import ComponentRecipe, QType


class QuantBackend(Protocol):
    name: str

    def quantize(self, module: nn.Module, qtype: QType, include: list[str]) -> int:
        """Quantize and freeze the named linears of ``module`` in place; returns the quantized weights."""
        ...

    def quantization_map(self, module: nn.Module) -> dict[str, dict[str, str]]: ...

    def requantize(
        self, skeleton: nn.Module, state_dict: dict[str, torch.Tensor], qmap: dict[str, Any], device: torch.device
    ) -> None:
        """Materialise ``skeleton`` (on the meta device) from a saved state dict and quantization map."""
        ...


def quantizable_linears(
    module: nn.Module, exclude: tuple[str, ...], full_name: Callable[[str], str] = str
) -> list[str]:
    """Names (relative to ``module``) of the linears not excluded.

    Exclusion patterns are written against whole-component module names; ``full_name`` maps a name
    relative to ``module`` to that, so a component quantized block by block selects the same layers
    as one quantized whole.
    """
    return [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear) and not any(fnmatch.fnmatch(full_name(name), pattern) for pattern in exclude)
    ]


def quantize_in_memory(module: nn.Module, recipe: ComponentRecipe, backend: QuantBackend) -> int:
    """Quantize a whole, materialised component (the naive path: needs all its float weights in memory)."""
    if recipe.qtype is None:
        return 0
    return backend.quantize(module, recipe.qtype, quantizable_linears(module, recipe.exclude))


class QuantoBackend:
    name = "optimum-quanto"

    def quantize(self, module: nn.Module, qtype: QType, include: list[str]) -> int:
        from optimum.quanto import freeze, qfloat8_e4m3fn, qint4, qint8, quantize

        if "" in include:
            raise ValueError("a bare nn.Linear cannot be quantized in place; wrap it in a container")
        if not include:
            return 0
        qtypes = {QType.INT8: qint8, QType.FP8: qfloat8_e4m3fn, QType.INT4: qint4}
        count = 0
        for name in include:
            linear = module.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            count += linear.weight.numel()
        quantize(module, weights=qtypes[qtype], include=include)
        freeze(module)
        return count

    def quantization_map(self, module: nn.Module) -> dict[str, dict[str, str]]:
        from optimum.quanto import quantization_map

        qmap: dict[str, dict[str, str]] = quantization_map(module)
        return qmap

    def requantize(
        self, skeleton: nn.Module, state_dict: dict[str, torch.Tensor], qmap: dict[str, Any], device: torch.device
    ) -> None:
        from optimum.quanto import requantize

        requantize(skeleton, state_dict, qmap, device=device)


BACKENDS: dict[str, QuantBackend] = {"optimum-quanto": QuantoBackend()}
DEFAULT_BACKEND = "optimum-quanto"
