"""The one dispatch rule of genjo_fast, shared by every op that has several implementations.

A :class:`Registry` maps backend names to an implementation and a function telling why the
backend cannot run on a device (``None`` when it can). The choice comes from the ``backend=``
argument, else the registry's env variable, else ``"auto"``. ``"auto"`` takes the first
available backend in preference order and logs once per (backend, device type) when it falls
back; an explicit request for an unavailable backend is an error naming the reason. A backend
may add an ``auto_reason`` that only ``"auto"`` applies: it runs on some devices when asked
for by name but is not picked there by default (the Triton kernels on CPU tensors through the
slow interpreter).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger("genjo_fast")

#: ``reason(device, *inputs) -> Optional[str]``: why a backend cannot run, ``None`` when it can.
Reason = Callable[..., Optional[str]]


def _always(device: torch.device, *inputs: Any) -> Optional[str]:
    return None


@dataclass(frozen=True)
class BackendStatus:
    """Whether one backend of one op can run on a device.

    Attributes:
        op: the op family, ``"sampling"`` or ``"attention"``.
        name: the backend's name, as ``backend=`` and the env variable accept it.
        usable: it runs on the device when asked for by name.
        reason: why it cannot (``None`` when ``usable``).
        auto: ``"auto"`` picks it on the device.
    """
    op: str
    name: str
    usable: bool
    reason: Optional[str]
    auto: bool


class Registry:
    """Backends of one op.

    Args:
        what: the argument's name in messages (``"backend"``, ``"attention backend"``).
        env_var: the env variable read when no backend is passed.
    """

    def __init__(self, what: str, env_var: str):
        self.what = what
        self.env_var = env_var
        self._backends: Dict[str, Tuple[Any, Reason]] = {}
        self._auto_reasons: Dict[str, Reason] = {}
        self._logged = set()

    def register(self, name: str, impl: Any, reason: Reason = _always, *,
                 auto_reason: Optional[Reason] = None) -> None:
        """Adds a backend, most preferred first. ``reason(device, *inputs)`` tells why the
        backend cannot run on ``device`` (and on these inputs, when the caller passes them),
        ``None`` when it can. ``auto_reason`` (same signature), when given, must also return
        ``None`` for ``"auto"`` to pick the backend; an explicit request skips it."""
        self._backends[name] = (impl, reason)
        if auto_reason is not None:
            self._auto_reasons[name] = auto_reason

    def names(self) -> Tuple[str, ...]:
        """The registered backends' names, most preferred first."""
        return tuple(self._backends)

    def _known(self, name: str, source: str) -> None:
        if name != "auto" and name not in self._backends:
            raise ValueError(f"{source}={name!r} is not known; expected 'auto' or one of "
                             f"{self.names()}")

    def unavailable_reason(self, name: str, device, *inputs: Any) -> Optional[str]:
        """Why backend ``name`` cannot run on ``device`` (and ``inputs``) when asked for by
        name; ``None`` when it can."""
        self._known(name, self.what)
        return self._backends[name][1](torch.device(device), *inputs)

    def is_available(self, name: str, device, *inputs: Any) -> bool:
        """Whether backend ``name`` runs on ``device`` (and ``inputs``) when asked for by name."""
        return self.unavailable_reason(name, device, *inputs) is None

    def _auto_unavailable_reason(self, name: str, device: torch.device,
                                 *inputs: Any) -> Optional[str]:
        reason = self._backends[name][1](device, *inputs)
        if reason is None and name in self._auto_reasons:
            reason = self._auto_reasons[name](device, *inputs)
        return reason

    def resolve(self, requested: Optional[str], device: torch.device,
                *inputs: Any) -> Tuple[str, Any]:
        """Returns ``(name, impl)`` of the backend to use on ``device`` for ``inputs``."""
        name = requested if requested is not None else os.environ.get(self.env_var, "auto")
        source = self.what if requested is not None else self.env_var
        self._known(name, source)
        if name != "auto":
            impl, reason_of = self._backends[name]
            reason = reason_of(device, *inputs)
            if reason is not None:
                raise RuntimeError(f"{source}={name!r} was requested but is unavailable: {reason}")
            return name, impl
        for candidate, (impl, _) in self._backends.items():
            reason = self._auto_unavailable_reason(candidate, device, *inputs)
            if reason is None:
                return candidate, impl
            if (candidate, device.type) not in self._logged:
                self._logged.add((candidate, device.type))
                logger.info("genjo_fast: %s %r unavailable on %s (%s); falling back",
                            self.what, candidate, device.type, reason)
        raise RuntimeError(f"no {self.what} can run on {device}")

    def status(self, op: str, device) -> Tuple[BackendStatus, ...]:
        """:class:`BackendStatus` of every backend on ``device``, most preferred first, without
        inputs (conditions on them, such as a head size, are not known here)."""
        device = torch.device(device)
        out, auto_taken = [], False
        for name, (_, reason_of) in self._backends.items():
            reason = reason_of(device)
            auto = not auto_taken and self._auto_unavailable_reason(name, device) is None
            auto_taken = auto_taken or auto
            out.append(BackendStatus(op, name, reason is None, reason, auto))
        return tuple(out)
