"""The layout of a diffusers Z-Image pipeline directory (torch-free).

``model_index.json`` names five components; three hold weights (safetensors beside a config), two are
plain files. Artifacts keep the same layout (``quantize.manifest`` adds their own files to it).
"""

from __future__ import annotations

MODEL_INDEX = "model_index.json"
WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae")
FILE_COMPONENTS = ("tokenizer", "scheduler")
PIPELINE_COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
