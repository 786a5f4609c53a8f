"""Registration of the ``"text-diffusion"`` pipeline task, without importing transformers.

``import genjo_fast`` must stay fast and must work without transformers, while
``transformers.pipeline("text-diffusion", ...)`` must find the task after ``import
genjo_fast``. Importing transformers' pipelines takes seconds, so :func:`install` defers the
registration to the moment they are imported: if ``transformers.pipelines`` is already imported
it imports :mod:`genjo_fast.pipeline` (which registers the task) at once; otherwise, when
transformers is installed, it adds a one-shot finder to ``sys.meta_path`` that lets the normal
import of ``transformers.pipelines`` run and then imports :mod:`genjo_fast.pipeline`. Nothing of
transformers is patched: the task goes through ``PIPELINE_REGISTRY.register_pipeline``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

logger = logging.getLogger("genjo_fast")

TARGET = "transformers.pipelines"


def _register() -> None:
    try:
        importlib.import_module("genjo_fast.pipeline")
    except Exception as error:  # never break the user's transformers import
        logger.warning("genjo_fast: could not register the 'text-diffusion' pipeline: %s",
                       error)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``transformers.pipelines``, then registers the task."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, is_package, resource readers...
        return getattr(self.loader, name)


class _AfterPipelinesImport(importlib.abc.MetaPathFinder):
    """A one-shot finder: at the import of ``transformers.pipelines`` it removes itself, finds
    the module's spec with the other finders and wraps its loader."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _transformers_installed() -> bool:
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # refused by an import guard, or a broken entry
        return False


def install() -> None:
    """Registers the task now if transformers' pipelines are imported, else when they are
    (nothing happens without transformers)."""
    if TARGET in sys.modules:
        _register()
    elif _transformers_installed():
        if not any(isinstance(finder, _AfterPipelinesImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterPipelinesImport())
