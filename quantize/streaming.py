"""Block-by-block quantization straight from safetensors shards, and sharded writing.

The whole bf16 transformer (12.3 GB) never has to be in memory: the component's skeleton lives on the
meta device; each block ("unit": an element of a ModuleList, or another direct child) is copied from
the skeleton, filled with just its tensors from the source files, cast to the storage dtype,
quantized, frozen and handed to the shard writer, then dropped. Source files are opened per unit and
closed after it, so pages of the memory-mapped source do not accumulate in the process either.
Peak memory is about one block plus one output shard.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quantize.backend import QuantBackend, quantizable_linears
from quantize.manifest import QUANT_MAP, ArtifactError
from quantize.variants import ComponentRecipe

# 1 GiB shards: the writer holds one shard in memory, so this bounds the output side of the peak;
# the 6 GB int8 transformer becomes 7 files.
DEFAULT_MAX_SHARD_BYTES = 1024**3
UNIT_HOLDER = "unit"

# Called with the number of units just finished.
UnitProgress = Callable[[int], None]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


Header = tuple[dict[str, Any], int]  # a safetensors file's JSON header and where its data starts


def read_header(path: Path) -> Header:
    """Format: 8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
    data_offsets}}`` (and ``__metadata__``), then the data."""
    with path.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(header_len)), 8 + header_len


def read_safetensors(path: Path, keys: list[str], header: Header | None = None) -> dict[str, torch.Tensor]:
    """Read some tensors of a safetensors file with plain reads into their final buffers.

    ``safe_open`` memory-maps the file, and every page it touches stays counted in the process's
    resident set until the mapping closes; reading into freshly allocated tensors keeps the resident
    set at what the tensors themselves need. ``header`` saves parsing it again (``read_header``).
    """
    entries, data_start = header or read_header(path)
    with path.open("rb") as handle:
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            entry = entries[key]
            begin, end = entry["data_offsets"]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(data_start + begin)
            if handle.readinto(buffer.numpy().data) != end - begin:
                raise ArtifactError(f"{path}: tensor {key!r} is truncated")
            out[key] = buffer.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return out


class SourceWeights:
    """Where each tensor of a component lives among its safetensors files."""

    def __init__(self, component_dir: Path) -> None:
        self.dir = component_dir
        indexes = sorted(component_dir.glob("*.safetensors.index.json"))
        self.key_file: dict[str, Path] = {}
        self._headers: dict[Path, Header] = {}  # parsed once per file, read for every block
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            self.key_file = {key: component_dir / name for key, name in weight_map.items()}
        else:
            files = sorted(component_dir.glob("*.safetensors"))
            if not files:
                raise ArtifactError(f"{component_dir} has no safetensors weights")
            for path in files:
                self.key_file.update(dict.fromkeys((k for k in self._header(path)[0] if k != "__metadata__"), path))
        # Checkpoints saved from a *ForCausalLM wrapper prefix the base model's keys with "model.".
        self.prefix = "model." if self.key_file and all(k.startswith("model.") for k in self.key_file) else ""

    def _header(self, path: Path) -> Header:
        if path not in self._headers:
            self._headers[path] = read_header(path)
        return self._headers[path]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read ``keys`` (skeleton names) straight into fresh tensors, without memory-mapping the files."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            source_key = self.prefix + key
            if source_key not in self.key_file:
                raise ArtifactError(f"{self.dir}: tensor {source_key!r} is missing from the source weights")
            by_file.setdefault(self.key_file[source_key], []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        for path, file_keys in by_file.items():
            loaded = read_safetensors(path, [self.prefix + k for k in file_keys], self._header(path))
            tensors.update({k: loaded[self.prefix + k] for k in file_keys})
        return tensors

    @property
    def keys(self) -> set[str]:
        return {k[len(self.prefix) :] for k in self.key_file}


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks below 32 MB in its arenas).

    A transformer block's linears are 10-40 MB each, so without this the resident set of a
    block-by-block run creeps up to the largest blocks' sum instead of one block.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


def iter_units(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The blocks of a component in order: ModuleList elements, then other direct children."""
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            for index, block in enumerate(child):
                yield f"{name}.{index}", block
        else:
            yield name, child


def count_units(module: nn.Module) -> int:
    return sum(1 for _ in iter_units(module)) + 1  # + the component's own direct tensors


@dataclass
class ShardWriter:
    """Collects tensors and writes ``model-NNNNN.safetensors`` files of at most ``max_bytes``."""

    out_dir: Path
    max_bytes: int = DEFAULT_MAX_SHARD_BYTES
    stem: str = "model"  # diffusers checkpoints use "diffusion_pytorch_model"
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    pending_bytes: int = 0
    weight_map: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        for key, tensor in tensors.items():
            self.pending[key] = tensor.detach().contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.stem}-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out_dir / name))
        for key in self.pending:
            self.weight_map[key] = name
        self.files.append(name)
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        index_name = f"{self.stem}.safetensors.index.json"
        (self.out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n")
        return [*self.files, index_name]


@dataclass(frozen=True)
class ComponentResult:
    files: list[str]
    params: int
    quantized_params: int
    bytes: int
    ignored_source_keys: list[str]


def _in_component(unit_name: str) -> Callable[[str], str]:
    """Map a name inside the unit holder (``unit.attention.to_q``) to its name in the component."""

    def full_name(name: str) -> str:
        return unit_name + name.removeprefix(UNIT_HOLDER)

    return full_name


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in tensors.items()}


def quantize_component(
    source: SourceWeights,
    skeleton: nn.Module,
    recipe: ComponentRecipe,
    *,
    storage_dtype: torch.dtype,
    out_dir: Path,
    backend: QuantBackend,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_unit: UnitProgress | None = None,
) -> ComponentResult:
    """Quantize one component block by block from ``source`` into ``out_dir`` (weights, index, qmap)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, max_shard_bytes)
    qmap: dict[str, dict[str, str]] = {}
    consumed: set[str] = set()
    params = quantized = 0

    # The component's own parameters and persistent buffers (e.g. Z-Image's pad tokens).
    own = [name for name, _ in skeleton.named_parameters(recurse=False)]
    persistent = set(skeleton.state_dict().keys())
    own += [name for name, _ in skeleton.named_buffers(recurse=False) if name in persistent]
    if own:
        tensors = _cast(source.read(own), storage_dtype)
        params += sum(t.numel() for name, t in tensors.items() if name in dict(skeleton.named_parameters()))
        writer.add(tensors)
        consumed.update(own)
    if on_unit:
        on_unit(1)

    for unit_name, meta_unit in iter_units(skeleton):
        holder = nn.Module()
        holder.add_module(UNIT_HOLDER, copy.deepcopy(meta_unit))
        keys = [k.removeprefix(f"{UNIT_HOLDER}.") for k in holder.state_dict()]
        full_keys = [f"{unit_name}.{k}" for k in keys]
        if full_keys:
            loaded = _cast(source.read(full_keys), storage_dtype)
            holder.load_state_dict(
                {f"{UNIT_HOLDER}.{k}": loaded[f"{unit_name}.{k}"] for k in keys}, strict=True, assign=True
            )
            params += sum(p.numel() for p in holder.parameters())
            if recipe.qtype is not None:
                include = quantizable_linears(holder, recipe.exclude, _in_component(unit_name))
                quantized += backend.quantize(holder, recipe.qtype, include)
            writer.add({f"{unit_name}.{k.removeprefix(UNIT_HOLDER + '.')}": v for k, v in holder.state_dict().items()})
            for name, entry in backend.quantization_map(holder).items():
                # A unit that is itself a linear (a direct child of the component) maps under its own name.
                inner = name.removeprefix(UNIT_HOLDER).removeprefix(".")
                qmap[f"{unit_name}.{inner}" if inner else unit_name] = entry
            consumed.update(full_keys)
        del holder
        release_freed_memory()
        if on_unit:
            on_unit(1)

    files = writer.close()
    (out_dir / QUANT_MAP).write_text(json.dumps(dict(sorted(qmap.items())), indent=2) + "\n")
    files.append(QUANT_MAP)
    return ComponentResult(
        files=files,
        params=params,
        quantized_params=quantized,
        bytes=writer.total_bytes,
        ignored_source_keys=sorted(source.keys - consumed),
    )
