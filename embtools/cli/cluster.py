"""``--ray [ADDRESS]``: run ``embtools ingest`` and ``embtools join`` as Ray jobs.

``--ray`` alone starts a local Ray cluster on this machine (bound to 127.0.0.1); ``--ray auto``
joins the cluster this machine belongs to (as in a ``ray job submit`` entrypoint);
``--ray ray://head:10001`` connects a Ray client. Needs ``pip install embtools[ray]``.

Examples
--------
>>> LOCAL
'local'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import click

from embtools.errors import BackendUnavailableError

__all__ = ["LOCAL", "connect", "ray_option"]

#: The value of a bare ``--ray``: start a local cluster.
LOCAL = "local"


def ray_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--ray [ADDRESS]`` option (``ray_address``: None, ``"local"`` or an address)."""
    return click.option(
        "--ray", "ray_address", is_flag=False, flag_value=LOCAL, default=None,
        metavar="[ADDRESS]",
        help="Run as a Ray job: alone, on a local cluster; with an ADDRESS (auto, "
             "ray://head:10001), on that cluster. Needs embtools[ray].")(fn)


def connect(address: str) -> None:
    """Start (``"local"``) or join the Ray cluster at ``address``; quiet progress output."""
    if address == LOCAL:  # read when ray is imported: the local node binds 127.0.0.1
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        import ray.data
    except ImportError:
        raise BackendUnavailableError(
            "--ray needs Ray Data: pip install 'embtools[ray]'") from None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False} if address == LOCAL else {
            "address": address}
        ray.init(log_to_driver=False, logging_level=logging.ERROR, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False
