"""Meta-device skeletons of pipeline components, and the buffers that a state dict does not carry.

A skeleton has every module and parameter shape but no storage: weights arrive later from the
artifact (``requantize`` / ``load_state_dict(assign=True)``), so no float copy is ever allocated.
Non-persistent buffers are not in any state dict; each class that has them gets a restorer here
(Qwen3's rotary ``inv_freq`` would otherwise hold uninitialised memory after ``to_empty``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantize.manifest import ArtifactError

LIBRARIES = ("diffusers", "transformers")
# Component classes of this project that a pipeline directory may name instead (a distilled text
# encoder); ``save_pretrained`` records them under their module path.
PROJECT_CLASSES: dict[tuple[str, str], str] = {
    ("zimage_edge.model.text_student", "CaptionProjectedQwen3Model"): "transformers",
}


def component_class(root: Path, name: str) -> tuple[str, str]:
    """(library, class name) of a component, from ``model_index.json``."""
    index = json.loads((root / "model_index.json").read_text())
    entry = index.get(name)
    known = isinstance(entry, list) and len(entry) == 2 and (entry[0] in LIBRARIES or tuple(entry) in PROJECT_CLASSES)
    if not known:
        raise ArtifactError(f"{root / 'model_index.json'}: component {name!r} has no loadable class ({entry!r})")
    return str(entry[0]), str(entry[1])


def build_skeleton(component_dir: Path, library: str, class_name: str, dtype: torch.dtype) -> nn.Module:
    """The component on the meta device, in ``dtype``."""
    import diffusers
    import transformers

    if (library, class_name) in PROJECT_CLASSES:
        module_of = importlib.import_module(library)
        library = PROJECT_CLASSES[(library, class_name)]
    else:
        module_of = diffusers if library == "diffusers" else transformers
    cls = getattr(module_of, class_name, None)
    if cls is None:
        raise ArtifactError(f"{library} has no class {class_name!r} (needed for {component_dir})")
    with torch.device("meta"):
        if library == "diffusers":
            module = cls.from_config(cls.load_config(component_dir))
        else:
            module = cls(transformers.AutoConfig.from_pretrained(component_dir))
    # nn.Module.to, not the diffusers override: the override warns about fp32-pinned modules, which
    # Z-Image does not have, and meta tensors only change their recorded dtype here.
    nn.Module.to(module, dtype)
    module.eval()
    return module


def _restore_qwen_rotary(module: Any, device: torch.device) -> None:
    rotary_cls = type(module.rotary_emb)
    module.rotary_emb = rotary_cls(config=module.config).to(device)


# Class name -> function that recomputes its non-persistent buffers on ``device``.
RESTORERS: dict[str, Callable[[Any, torch.device], None]] = {
    "Qwen3Model": _restore_qwen_rotary,
    "Qwen2Model": _restore_qwen_rotary,
    "CaptionProjectedQwen3Model": _restore_qwen_rotary,
}


def nonpersistent_buffers(module: nn.Module) -> list[str]:
    persistent = set(module.state_dict().keys())
    return [name for name, _ in module.named_buffers() if name not in persistent]


def restore_nonpersistent(module: nn.Module, device: torch.device) -> None:
    """Recompute the buffers no state dict holds; refuse classes we do not know how to restore."""
    names = nonpersistent_buffers(module)
    if not names:
        return
    restorer = RESTORERS.get(type(module).__name__)
    if restorer is None:
        raise ArtifactError(
            f"{type(module).__name__} has non-persistent buffers {names} that cannot be restored after loading"
        )
    restorer(module, device)
