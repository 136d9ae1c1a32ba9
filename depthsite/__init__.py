"""depthsite: a Django platform for monocular depth estimation with a model registry and weight cache."""

__version__ = "0.1.0"
