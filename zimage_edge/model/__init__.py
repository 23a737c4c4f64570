"""The model layer: the real diffusers code paths, exercised on real checkpoints or on toy models.

Submodules import torch; import them explicitly (``zimage_edge.model.generate`` ...) so that parts
which must stay torch-free never pull them in by accident.
"""
