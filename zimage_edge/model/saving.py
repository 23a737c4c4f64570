"""Write a pipeline as a model directory: bf16 weights, records beside them, complete or absent."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def save_pipeline(pipe: Any, out_dir: Path, write_records: Callable[[Path], None]) -> None:
    """Save ``pipe`` to ``out_dir`` in a hidden temporary directory renamed into place once whole;
    ``write_records(directory)`` adds the model's own files (its marker, its student record)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # bf16 on disk halves the files; loading casts to the device's compute dtype.
        pipe.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
        for config in tmp.glob("*/config.json"):
            # Where a component was loaded from: a path of the machine that made the model, which means
            # nothing where it is used (and would say where it was made).
            data = json.loads(config.read_text())
            if data.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        write_records(tmp)
        # mkdtemp and the safetensors writer make owner-only files; a model is read by services.
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
