"""Test hook: make a Ray worker process exit once at a named point (a killed task or actor).

With ``$EMBTOOLS_RAY_FAULTS`` set to a directory (in the environment the cluster starts with),
:func:`crash_point` exits the worker process (``os._exit``) the first time it reaches ``name``
after a file ``<dir>/<name>`` was created (``embed_batch``, ``join_part``, ``sink_write``): the file is renamed away first, so exactly one worker
fires. Ray then retries the task or restarts the actor. Harmless in production: the variable is
never set.

Examples
--------
>>> crash_point("nothing-armed")   # no $EMBTOOLS_RAY_FAULTS: returns
"""

from __future__ import annotations

import os

__all__ = ["FAULTS_ENV", "crash_point"]

FAULTS_ENV = "EMBTOOLS_RAY_FAULTS"


def crash_point(name: str) -> None:
    """Exit this process when the fault ``name`` is armed (see the module docstring)."""
    directory = os.environ.get(FAULTS_ENV)
    if not directory:
        return
    armed = os.path.join(directory, name)
    try:
        os.rename(armed, f"{armed}.fired")
    except OSError:
        return
    os._exit(17)
