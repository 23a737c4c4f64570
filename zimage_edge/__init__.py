"""zimage-edge: Z-Image-Turbo on fleets of small GPU nodes.

The core package holds what every part shares: the device/dtype policy, the generation request
contract, and the model layer (toy-model builder, loading, generation).
"""

__version__ = "0.1.0"
