"""A small trained model of the real architecture: flat shapes on flat backgrounds, 64x64.

``data`` draws the scenes and their captions, ``metric`` reads a generated image back into
(shape, color, background) and scores prompt adherence, ``train`` trains the VAE and then the
transformer (with the text encoder) with the flow-matching objective the Turbo scheduler uses.
"""

from pathlib import Path

# The trained pipeline shipped with the package (diffusers layout, bf16 weights, a few MB).
PRETRAINED = Path(__file__).parent / "pretrained"
# Its distilled student (``zimage-edge distill``): half the transformer's main layers and a text encoder
# of a third of the teacher's parameters, in the same layout, beside it.
STUDENT = Path(__file__).parent / "student"
