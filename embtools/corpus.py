"""A real text corpus that needs no download: docstrings of the Python standard library.

:func:`stdlib_corpus` imports a fixed list of pure-Python standard library modules (ones with no side
effects on import), walks their public modules, classes, functions and methods, and keeps the first
paragraph of each docstring, whitespace-collapsed and deduplicated. Each text is labelled by its
top-level module (``json``, ``email``, ...) and identified by its qualified name. The order is
deterministic (sorted by text id) for a given Python version.

Examples
--------
>>> corpus = stdlib_corpus(limit=50)
>>> len(corpus) == 50 and corpus.text_ids == sorted(corpus.text_ids)
True
>>> sorted(corpus.columns())
['kind', 'label', 'module', 'n_words', 'text', 'text_id']
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["STDLIB_MODULES", "Corpus", "first_paragraph", "stdlib_corpus"]

#: Pure-Python standard library modules that are safe to import (no I/O, no GUI, no side effects).
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bdb", "binascii", "bisect", "builtins",
    "bz2", "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections", "collections.abc",
    "colorsys", "concurrent.futures", "configparser", "contextlib", "contextvars", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email", "email.charset",
    "email.feedparser", "email.generator", "email.header", "email.headerregistry", "email.message",
    "email.mime.text", "email.policy", "email.utils", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http", "http.client", "http.cookiejar", "http.cookies",
    "http.server", "imaplib", "importlib", "importlib.abc", "importlib.metadata",
    "importlib.resources", "importlib.util", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "logging.config", "logging.handlers", "lzma",
    "mailbox", "math", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse",
    "os", "os.path", "pathlib", "pdb", "platform", "plistlib", "poplib", "pprint", "profile",
    "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib",
    "rlcompleter", "runpy", "sched", "secrets", "selectors", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string",
    "stringprep", "struct", "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "tomllib", "trace", "traceback",
    "tracemalloc", "types", "typing", "unicodedata", "unittest", "unittest.mock", "urllib.error",
    "urllib.parse", "urllib.request", "urllib.robotparser", "uuid", "warnings", "wave", "weakref",
    "wsgiref.handlers", "wsgiref.simple_server", "wsgiref.util", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils", "xmlrpc.client",
    "xmlrpc.server", "zipapp", "zipfile", "zlib", "zoneinfo",
)  # fmt: skip

_MIN_CHARS = 25


def first_paragraph(doc: str | None) -> str | None:
    """The first paragraph of a docstring with whitespace collapsed; None if empty or too short.

    Examples
    --------
    >>> first_paragraph("Return the sum.\\n\\n    More details here.")
    >>> first_paragraph("Return the sum of two numbers,\\n    rounded down.\\n\\nDetails.")
    'Return the sum of two numbers, rounded down.'
    """
    if not doc:
        return None
    text = inspect.cleandoc(doc).strip()
    para = re.split(r"\n\s*\n", text, maxsplit=1)[0]
    para = " ".join(para.split())
    return para if len(para) >= _MIN_CHARS else None


@dataclass
class Corpus:
    """Parallel lists: ``texts``, ``text_ids`` (qualified names), ``labels`` (top-level module),
    and metadata ``kind`` (module/class/function/method), ``module`` and ``n_words``."""

    texts: list[str] = field(default_factory=list)
    text_ids: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    module: list[str] = field(default_factory=list)
    n_words: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def metadata(self) -> dict[str, list[Any]]:
        """The metadata columns for ``EmbeddingStore.add(metadata=...)``."""
        return {"kind": self.kind, "module": self.module, "n_words": self.n_words}

    def columns(self) -> dict[str, list[Any]]:
        """Every column (text, text_id, label and metadata), e.g. for ``polars.DataFrame``."""
        return {
            "text_id": self.text_ids,
            "text": self.texts,
            "label": self.labels,
            **self.metadata(),
        }

    def take(self, n: int) -> Corpus:
        """The first ``n`` entries."""
        return Corpus(*(getattr(self, f)[:n] for f in _FIELDS))


_FIELDS = ("texts", "text_ids", "labels", "kind", "module", "n_words")


def _import(name: str) -> ModuleType | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # a module missing on this platform or build is skipped
        return None


def _defined_in(obj: Any, module: str) -> bool:
    """True when ``obj`` comes from ``module`` or a private part of its package (``asyncio.events``)."""
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    top = module.split(".")[0]
    return owner in {module, f"_{top}", f"_{module}"} or owner.startswith(f"{top}.")


def _entries(mod: ModuleType) -> list[tuple[str, str, Any]]:
    """(qualified name, kind, object) for the module, its public classes, functions and methods."""
    out: list[tuple[str, str, Any]] = [(mod.__name__, "module", mod)]
    names = getattr(mod, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n in vars(mod) if not n.startswith("_")]
    for name in sorted({n for n in names if isinstance(n, str) and not n.startswith("_")}):
        obj = vars(mod).get(name)
        if obj is None or not _defined_in(obj, mod.__name__):
            continue  # re-exports from other packages are documented where they are defined
        if inspect.isclass(obj):
            out.append((f"{mod.__name__}.{name}", "class", obj))
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                func = (
                    member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                )
                if inspect.isroutine(func):
                    out.append((f"{mod.__name__}.{name}.{attr}", "method", func))
        elif inspect.isroutine(obj):
            out.append((f"{mod.__name__}.{name}", "function", obj))
    return out


def stdlib_corpus(limit: int | None = None, modules: tuple[str, ...] = STDLIB_MODULES) -> Corpus:
    """Docstring corpus of the standard library (several thousand texts), sorted by text id.

    ``limit`` keeps an evenly spread subset of that size (every k-th entry, still sorted), so a
    small corpus still covers many modules.
    """
    seen: set[str] = set()
    rows: list[tuple[str, str, str, str, str]] = []
    for name in modules:
        mod = _import(name)
        if mod is None:
            continue
        for qualname, kind, obj in _entries(mod):
            text = first_paragraph(getattr(obj, "__doc__", None))
            if text is None or text in seen:
                continue
            seen.add(text)
            rows.append((qualname, text, qualname.split(".")[0], kind, mod.__name__))
    rows.sort()
    if limit is not None and limit < len(rows):
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        step = len(rows) / limit
        rows = [rows[int(i * step)] for i in range(limit)]
    corpus = Corpus()
    for qualname, text, label, kind, module in rows:
        corpus.text_ids.append(qualname)
        corpus.texts.append(text)
        corpus.labels.append(label)
        corpus.kind.append(kind)
        corpus.module.append(module)
        corpus.n_words.append(len(text.split()))
    return corpus
