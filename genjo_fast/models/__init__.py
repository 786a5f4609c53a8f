"""genjo_fast's own model implementations.

``LLaDAModel`` is the LLaDA architecture with the reference checkpoint's parameter names:
load a checkpoint directory with :func:`load_llada`, or share the weights of a reference
model loaded through transformers with :func:`from_reference`.
"""
from .llada import LLaDAConfig, LLaDAModel, LLaDAOutput, num_parameters
from .loading import from_reference, is_llada, load_llada, save_llada

__all__ = ["LLaDAConfig", "LLaDAModel", "LLaDAOutput", "num_parameters", "load_llada",
           "save_llada", "from_reference", "is_llada"]
