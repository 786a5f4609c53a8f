"""genjo_fast: fast, exact sampling for masked-diffusion language models (Genjo / LLaDA).

``from genjo_fast import generate`` is a drop-in replacement for the reference ``generate``.
"""
from . import reference
from .backends import available_backends
from .draws import TensorDraws, TorchDraws
from .generate import StepEvent, generate

__version__ = "0.1.0"
__all__ = ["generate", "reference", "StepEvent", "TensorDraws", "TorchDraws",
           "available_backends", "__version__"]
