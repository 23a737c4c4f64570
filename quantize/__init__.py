"""quantize: turns a Z-Image-Turbo checkpoint into INT8 / FP8 / INT4 artifacts sized to each device.

Owns the artifact manifest and the device profiles, the contracts that ``fleet`` and ``edge_agent`` read.
"""
