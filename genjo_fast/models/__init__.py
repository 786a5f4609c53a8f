"""genjo_fast's own model implementations.

``LLaDAModel`` is the LLaDA architecture with the reference checkpoint's parameter names:
load a checkpoint directory with :func:`load_llada`, or share the weights of a reference
model loaded through transformers with :func:`from_reference`. ``DreamModel`` is the same for
Dream-7B (:func:`load_dream`, :func:`save_dream`, :func:`dream_from_reference`).
"""
from .dream import DreamConfig, DreamModel, DreamOutput
from .llada import LLaDAConfig, LLaDAModel, LLaDAOutput, num_parameters
from .loading import (dream_from_reference, from_reference, is_dream, is_llada, load_dream,
                      load_llada, save_dream, save_llada)

__all__ = ["LLaDAConfig", "LLaDAModel", "LLaDAOutput", "num_parameters", "load_llada",
           "save_llada", "from_reference", "is_llada", "DreamConfig", "DreamModel",
           "DreamOutput", "load_dream", "save_dream", "dream_from_reference", "is_dream"]
