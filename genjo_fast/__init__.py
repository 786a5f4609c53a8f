"""genjo_fast: fast, exact sampling for masked-diffusion language models (LLaDA, Dream).

``from genjo_fast import generate`` is a drop-in replacement for the reference ``generate``.
``mdlm_generate`` samples transformers masked LMs (MDLM, DiffuGPT); with transformers
installed, importing genjo_fast also registers the transformers pipeline task
``"text-diffusion"`` (:mod:`genjo_fast.pipeline`) for when transformers' pipelines are imported.
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _import_source_tree_kernels() -> None:
    """Runs from a source checkout (the repo root on ``sys.path``, e.g. ``python -m
    genjo_fast.demo`` there) import the top-level ``kernels/`` folder as ``genjo_fast.kernels``,
    the name the wheel installs it under (``package_dir``)."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    init = _os.path.join(_os.path.dirname(here), "kernels", "__init__.py")
    if (_os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(init)
            or "genjo_fast.kernels" in _sys.modules):
        return
    spec = _importlib_util.spec_from_file_location(
        "genjo_fast.kernels", init, submodule_search_locations=[_os.path.dirname(init)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["genjo_fast.kernels"] = module
    spec.loader.exec_module(module)


_import_source_tree_kernels()

from . import reference, reference_dream  # noqa: E402
from .backends import accepted_backends, backend_status  # noqa: E402
from .dispatch import BackendStatus  # noqa: E402
from .draws import TensorDraws, TorchDraws  # noqa: E402
from .dream import diffusion_generate  # noqa: E402
from .dream_settings import DreamGenerateOutput  # noqa: E402
from .engine import GenerateStats, StepEvent  # noqa: E402
from .generate import generate  # noqa: E402
from .likelihood import get_log_likelihood, get_log_likelihoods, is_greedy_continuation  # noqa: E402
from .mdlm import MDLMStats, mdlm_generate, mdlm_semi_autoregressive  # noqa: E402
from .mdlm_contract import TensorMDLMDraws, TorchMDLMDraws  # noqa: E402
from .registration import install as _install_pipeline_registration  # noqa: E402

_install_pipeline_registration()

__version__ = "0.1.0"
__all__ = ["generate", "diffusion_generate", "DreamGenerateOutput", "reference",
           "reference_dream", "StepEvent", "GenerateStats", "TensorDraws", "TorchDraws",
           "get_log_likelihood", "get_log_likelihoods", "is_greedy_continuation",
           "accepted_backends", "backend_status", "BackendStatus", "mdlm_generate",
           "mdlm_semi_autoregressive", "MDLMStats", "TensorMDLMDraws", "TorchMDLMDraws",
           "__version__"]
