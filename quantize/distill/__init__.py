"""Distillation: smaller students of a Z-Image pipeline for the smallest nodes.

A transformer student keeps some of the teacher's main layers (chosen by measuring, on the teacher's
own 8-step trajectories, how much the output moves when each layer is left out) and is trained to
reproduce the teacher's velocity on those trajectories, with its layers' hidden states matched to the
teacher layers they came from. A text-encoder student is a smaller ``Qwen3Model`` with a projection to
the teacher's caption-feature size, trained to reproduce the prompt features the pipeline feeds the
transformer. A student is saved as an ordinary pipeline directory (``zimage-edge quantize`` takes it)
with ``zimage_edge_student.json`` beside ``model_index.json``: its teacher, its recipe and its quality.
"""
