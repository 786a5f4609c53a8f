"""genjo_fast: fast, exact sampling for masked-diffusion language models (Genjo / LLaDA).

``from genjo_fast import generate`` is a drop-in replacement for the reference ``generate``.
"""
from . import reference
from .backends import available_backends
from .draws import TensorDraws, TorchDraws
from .generate import GenerateStats, StepEvent, generate
from .likelihood import get_log_likelihood, get_log_likelihoods, is_greedy_continuation

__version__ = "0.1.0"
__all__ = ["generate", "reference", "StepEvent", "GenerateStats", "TensorDraws", "TorchDraws",
           "get_log_likelihood", "get_log_likelihoods", "is_greedy_continuation",
           "available_backends", "__version__"]
