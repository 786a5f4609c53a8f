"""The one dispatch rule of genjo_fast, shared by every op that has several implementations.

A :class:`Registry` maps backend names to an implementation and an availability check.
The choice comes from the ``backend=`` argument, else the registry's env variable, else
``"auto"``. ``"auto"`` takes the first available backend in preference order and logs once per
(backend, device type) when it falls back; an explicit request for an unavailable backend is an
error naming the reason. A backend may add an ``auto_check`` that only ``"auto"`` applies: it
runs on some devices when asked for by name but is not picked there by default (the Triton
kernels on CPU tensors through the slow interpreter).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger("genjo_fast")


class Registry:
    """Backends of one op.

    Args:
        what: the argument's name in messages (``"backend"``, ``"attention backend"``).
        env_var: the env variable read when no backend is passed.
    """

    def __init__(self, what: str, env_var: str):
        self.what = what
        self.env_var = env_var
        self._backends: Dict[str, Tuple[Any, Callable[..., Optional[str]]]] = {}
        self._auto_checks: Dict[str, Callable[..., Optional[str]]] = {}
        self._logged = set()

    def register(self, name: str, impl: Any,
                 check: Callable[..., Optional[str]] = lambda device, *inputs: None, *,
                 auto_check: Optional[Callable[..., Optional[str]]] = None) -> None:
        """Adds a backend, most preferred first. ``check(device, *inputs)`` returns ``None``
        when the backend can run on ``device`` (and on these inputs, when the caller passes
        them), else the reason it cannot. ``auto_check`` (same signature), when given, must
        also pass for ``"auto"`` to pick the backend; an explicit request skips it."""
        self._backends[name] = (impl, check)
        if auto_check is not None:
            self._auto_checks[name] = auto_check

    def names(self) -> Tuple[str, ...]:
        return tuple(self._backends)

    def resolve(self, requested: Optional[str], device: torch.device,
                *inputs: Any) -> Tuple[str, Any]:
        """Returns ``(name, impl)`` of the backend to use on ``device`` for ``inputs``."""
        name = requested if requested is not None else os.environ.get(self.env_var, "auto")
        source = self.what if requested is not None else self.env_var
        if name != "auto" and name not in self._backends:
            raise ValueError(f"{source}={name!r} is not known; expected 'auto' or one of "
                             f"{self.names()}")
        if name != "auto":
            impl, check = self._backends[name]
            reason = check(device, *inputs)
            if reason is not None:
                raise RuntimeError(f"{source}={name!r} was requested but is unavailable: {reason}")
            return name, impl
        for candidate, (impl, check) in self._backends.items():
            reason = check(device, *inputs)
            if reason is None and candidate in self._auto_checks:
                reason = self._auto_checks[candidate](device, *inputs)
            if reason is None:
                return candidate, impl
            if (candidate, device.type) not in self._logged:
                self._logged.add((candidate, device.type))
                logger.info("genjo_fast: %s %r unavailable on %s (%s); falling back",
                            self.what, candidate, device.type, reason)
        raise RuntimeError(f"no {self.what} can run on {device}")
