"""The numba-compiled kernels, where numba is installed (the ``[jit]`` extra).

Compiled kernels fuse loops that NumPy runs as many small calls: an IVF partition scan keeps each
query's running top candidates while it reads the codes; a Hamming scan counts bits and keeps the
best rows in one pass. :func:`jit_kernels` imports such a module only when numba is importable
and ``EMBTOOLS_JIT`` is not ``0``; callers keep their NumPy path for when it returns None. The
kernels are compiled on first use and cached on disk by numba (``cache=True``), and release the
GIL (``nogil=True``): callers split work over their own thread pools, which stay fork-safe
(:mod:`embtools.kernels.threads`), rather than numba's OpenMP-style layer, whose thread team
costs milliseconds to wake for one small query.

Call :func:`warm` at start-up (a server, a benchmark) to compile or load them before the first
search.

Examples
--------
>>> import os
>>> os.environ["EMBTOOLS_JIT"] = "0"
>>> jit_kernels("ivf_jit") is None
True
>>> del os.environ["EMBTOOLS_JIT"]
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

__all__ = ["JIT_ENV", "KERNEL_MODULES", "jit_kernels", "warm"]

#: set to ``0`` to use the NumPy kernels even where numba is installed
JIT_ENV = "EMBTOOLS_JIT"

#: the compiled kernel modules, each with a ``warm()`` that runs its kernels once on tiny inputs
KERNEL_MODULES = ("hamming_jit", "int8_jit", "ivf_jit", "ivf_few_jit", "rerank_jit")

_loaded: dict[str, ModuleType] = {}


def jit_kernels(name: str) -> ModuleType | None:
    """The compiled kernel module ``embtools.kernels.<name>``, or None where numba is missing
    or ``$EMBTOOLS_JIT`` is ``0`` (read on every call, so tests can switch it)."""
    if os.environ.get(JIT_ENV, "1") == "0":
        return None
    mod = _loaded.get(name)
    if mod is None:
        if importlib.util.find_spec("numba") is None:
            return None
        mod = _loaded[name] = importlib.import_module(f"embtools.kernels.{name}")
    return mod


def warm() -> bool:
    """Load and run every compiled kernel once (compiling it, or reading numba's cache), so that
    the first search pays none of it; False where the kernels are off. Numba and LLVM take about
    130 MiB of resident memory once per process, a fixed cost like an imported library's, which
    ``EMBTOOLS_JIT=0`` avoids (the NumPy kernels then run)."""
    mods = [jit_kernels(name) for name in KERNEL_MODULES]
    for mod in mods:
        if mod is None:
            return False
        mod.warm()
    return True
