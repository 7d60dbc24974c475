"""Which backends are installed, and which backend and device auto-detection picks.

Nothing here imports torch or mlx unless asked for the facts that need them (CUDA/MPS presence).
The decision itself (:func:`choose_backend`) is a pure function of the facts, so it can be tested
without the hardware.

Examples
--------
>>> from embtools.backends.detect import Facts, choose_backend
>>> choose_backend(Facts(system="Linux", machine="x86_64", has_mlx=False, has_torch=True,
...                      cuda=True, mps=False))
('torch', 'cuda:0')
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from dataclasses import dataclass

__all__ = [
    "BACKEND_NAMES",
    "Facts",
    "available_backends",
    "choose_backend",
    "gather_facts",
    "is_installed",
]

#: every backend embtools knows, in auto-detection preference order when usable
BACKEND_NAMES = ("numpy", "torch", "mlx")
_MODULE = {"numpy": "numpy", "torch": "torch", "mlx": "mlx.core"}


def is_installed(name: str) -> bool:
    """True when the framework of backend ``name`` can be found (imported already or importable).

    Uses ``sys.modules`` and ``importlib.util.find_spec``; does not import the framework.
    """
    module = _MODULE[name]
    if module in sys.modules:
        return True
    try:
        top = module.split(".")[0]
        if importlib.util.find_spec(top) is None:
            return False
        # mlx is a namespace package; the compiled core decides whether it is usable
        return top == module or importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """Names of the backends whose framework is installed, e.g. ``["numpy", "torch", "mlx"]``.

    Examples
    --------
    >>> "numpy" in available_backends()
    True
    """
    return [name for name in BACKEND_NAMES if is_installed(name)]


@dataclass(frozen=True)
class Facts:
    """What auto-detection looks at."""

    system: str  # platform.system()
    machine: str  # platform.machine()
    has_mlx: bool
    has_torch: bool
    cuda: bool  # torch sees a CUDA device
    mps: bool  # torch sees an MPS device


def gather_facts() -> Facts:
    """The facts of this machine; imports torch only when it is installed (to ask about CUDA/MPS)."""
    system, machine = platform.system(), platform.machine()
    has_torch = is_installed("torch")
    cuda = mps = False
    if has_torch:
        try:
            import torch

            cuda = bool(torch.cuda.is_available())
            mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        except Exception:  # a broken torch install: treat as absent
            has_torch = False
    return Facts(system, machine, is_installed("mlx"), has_torch, cuda, mps)


def apple_silicon(facts: Facts) -> bool:
    """True on macOS running on arm64."""
    return facts.system == "Darwin" and facts.machine.lower() in ("arm64", "aarch64")


def choose_backend(facts: Facts) -> tuple[str, str]:
    """``(backend name, device)`` that auto-detection picks for these facts.

    MLX on Apple silicon, else torch with CUDA, else torch with MPS, else NumPy on the CPU.
    """
    if apple_silicon(facts) and facts.has_mlx:
        return "mlx", "gpu"
    if facts.has_torch and facts.cuda:
        return "torch", "cuda:0"
    if facts.has_torch and facts.mps:
        return "torch", "mps"
    return "numpy", "cpu"
