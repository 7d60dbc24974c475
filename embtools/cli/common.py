"""Shared pieces of the command line: opening stores, parsing lists, consoles, user errors.

Examples
--------
>>> parse_int_list("64,128,384", "--dims")
[64, 128, 384]
>>> parse_funnel_option("64:400,128:100")
[(64, 400), (128, 100)]
>>> print(printable("id\\x1b[31m\\u202e"))
id\\x1b[31m\\u202e
"""

from __future__ import annotations

import json
import os
import unicodedata
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
    "printable",
    "split_names",
    "table_cell",
]

#: characters that reorder or hide text on a terminal (bidi controls, line separators)
_INVISIBLE = frozenset("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
                       "\u2066\u2067\u2068\u2069\ufeff")


def printable(text: str) -> str:
    """``text`` with terminal control characters (ESC, other C0/C1 controls, bidi overrides)
    written as escapes such as ``\\x1b``, so stored data cannot drive the terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def table_cell(value: Any) -> Any:
    """A value for a rich table cell: printable text, never read as rich markup."""
    from rich.text import Text

    return Text(printable(f"{value:.4f}" if isinstance(value, float) else str(value)))


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


def parse_funnel_option(text: str | None) -> list[tuple[int | str, int]] | None:
    """``"64:400,128:100"`` -> ``[(64, 400), (128, 100)]`` (dimension:shortlist pairs; a stage
    may also be ``binary`` or ``int8``: ``"binary:400,int8:40"``)."""
    if text is None or not text.strip():
        return None
    stages: list[tuple[int | str, int]] = []
    for part in text.split(","):
        dim, sep, short = part.strip().partition(":")
        dim = dim.strip()
        if not sep or not (dim.isdigit() or dim in ("binary", "int8")) or not short.strip().isdigit():
            raise click.BadParameter(
                f"expected DIM:SHORTLIST pairs such as 64:400,128:100 or binary:400,int8:40, "
                f"got {text!r}",
                param_hint="--funnel",
            )
        stages.append((int(dim) if dim.isdigit() else dim, int(short)))
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
    """Open the store at ``path`` (a directory or a URL); StoreNotFoundError when it does not exist
    (unless ``create``). For URLs, ``$EMBTOOLS_STORAGE_OPTIONS`` (a JSON object) gives the
    storage options and ``$EMBTOOLS_CACHE_DIR`` a cache folder; the usual environment variables
    (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...) are read too."""
    from embtools.storage.io import is_url
    from embtools.store import EmbeddingStore

    kwargs: dict[str, Any] = {}
    if is_url(os.fspath(path)):
        target = os.fspath(path)
        kwargs.update(url_settings())
        if not create:
            from embtools.storage.manifest import is_store
            from embtools.storage.state import open_storage

            storage = open_storage(target, kwargs.get("storage_options"))
            try:
                if not is_store(storage):
                    raise StoreNotFoundError(f"no store at {target} (no committed version there)")
            finally:
                storage.close()
    else:
        p = Path(path)
        if not create and not p.exists():
            raise StoreNotFoundError(f"no store at {p} (the path does not exist)")
        if p.exists() and not p.is_dir():
            raise StoreNotFoundError(f"{p} is a file, not an embtools store directory")
        target = str(p)
    if backend is not None:
        kwargs["backend"] = backend
    if device is not None:
        kwargs["device"] = device
    if max_memory_gb is not None:
        if not 0 < max_memory_gb < float("inf"):
            raise InvalidArgumentError(
                f"--max-memory-gb must be a finite number > 0 (leave it out for no cap), got {max_memory_gb}")
        kwargs["max_memory_gb"] = max_memory_gb
    if version is not None:
        kwargs["version"] = version
    return EmbeddingStore(target, **kwargs)


def url_settings() -> dict[str, Any]:
    """``storage_options`` and ``cache_dir`` of URL stores from the environment (see open_store)."""
    out: dict[str, Any] = {}
    raw = os.environ.get("EMBTOOLS_STORAGE_OPTIONS")
    if raw:
        try:
            options = json.loads(raw)
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise InvalidArgumentError("$EMBTOOLS_STORAGE_OPTIONS must be a JSON object of settings")
        out["storage_options"] = options
    if os.environ.get("EMBTOOLS_CACHE_DIR"):
        out["cache_dir"] = os.environ["EMBTOOLS_CACHE_DIR"]
    return out
