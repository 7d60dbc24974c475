"""Shared pieces of the command line: opening stores, parsing lists, consoles, user errors.

Examples
--------
>>> parse_int_list("64,128,384", "--dims")
[64, 128, 384]
>>> parse_funnel_option("64:400,128:100")
[(64, 400), (128, 100)]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from embtools.errors import InvalidArgumentError, StoreNotFoundError

__all__ = [
    "err_console",
    "open_store",
    "out_console",
    "parse_funnel_option",
    "parse_int_list",
    "split_names",
]


def out_console() -> Any:
    """A rich console on stdout (what the command produces)."""
    from rich.console import Console

    return Console(soft_wrap=False)


def err_console() -> Any:
    """A rich console on stderr (progress and status lines)."""
    from rich.console import Console

    return Console(stderr=True)


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    """``"64,128"`` -> ``[64, 128]``; raises a click usage error on anything else."""
    if text is None or not text.strip():
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=option
        ) from None
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter(f"expected positive integers, got {text!r}", param_hint=option)
    return values


def parse_funnel_option(text: str | None) -> list[tuple[int, int]] | None:
    """``"64:400,128:100"`` -> ``[(64, 400), (128, 100)]`` (dimension:shortlist pairs)."""
    if text is None or not text.strip():
        return None
    stages = []
    for part in text.split(","):
        dim, sep, short = part.strip().partition(":")
        if not sep or not dim.strip().isdigit() or not short.strip().isdigit():
            raise click.BadParameter(
                f"expected DIM:SHORTLIST pairs such as 64:400,128:100, got {text!r}",
                param_hint="--funnel",
            )
        stages.append((int(dim), int(short)))
    return stages


def split_names(text: str | None) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]``."""
    if not text:
        return []
    return [name.strip() for name in text.split(",") if name.strip()]


def open_store(
    path: str | os.PathLike[str],
    *,
    create: bool = False,
    backend: str | None = None,
    device: str | None = None,
    max_memory_gb: float | None = None,
    version: int | None = None,
) -> Any:
    """Open the store at ``path``; StoreNotFoundError when it does not exist (unless ``create``)."""
    from embtools.store import EmbeddingStore

    p = Path(path)
    if not create and not p.exists():
        raise StoreNotFoundError(f"no store at {p} (the path does not exist)")
    if p.exists() and not p.is_dir():
        raise StoreNotFoundError(f"{p} is a file, not an embtools store directory")
    kwargs: dict[str, Any] = {}
    if backend is not None:
        kwargs["backend"] = backend
    if device is not None:
        kwargs["device"] = device
    if max_memory_gb is not None:
        if max_memory_gb <= 0:
            raise InvalidArgumentError(f"--max-memory-gb must be > 0, got {max_memory_gb}")
        kwargs["max_memory_gb"] = max_memory_gb
    if version is not None:
        kwargs["version"] = version
    return EmbeddingStore(str(p), **kwargs)
