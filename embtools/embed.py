"""Embedding texts with sentence-transformers, recording the model in the store, caching embeddings.

``embed_texts`` turns texts into float32 vectors (optionally several Matryoshka prefixes, each
re-normalised). ``add_texts`` embeds texts into a store and records the model's configuration (name,
revision, normalisation, dims and their :func:`~embtools.config.compute_config_hash`) in
``store.properties["embedding_model"]``; texts embedded with another model are refused with
:class:`~embtools.errors.ModelMismatchError`. ``embed_queries`` embeds query strings with the model a
store records. A cache of the model's raw outputs, keyed by the model's hash and each text's SHA-256,
avoids embedding the same text twice (Parquet files, never pickle).

Examples
--------
>>> X = embed_texts(["a cat", "a dog"], dims=[64, 384])          # doctest: +SKIP
>>> X[64].shape, X[384].shape                                     # doctest: +SKIP
((2, 64), (2, 384))
>>> store = EmbeddingStore("docs.store")                           # doctest: +SKIP
>>> add_texts(store, ["a cat", "a dog"], text_ids=["c", "d"], dims=[64, 384])   # doctest: +SKIP
1
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embtools.errors import DimensionMismatchError, InvalidArgumentError, ModelMismatchError
from embtools.models import DEFAULT_MODEL, ModelSpec, load_model, resolve_model

__all__ = [
    "MODEL_PROPERTY",
    "EmbeddingCache",
    "add_texts",
    "default_cache_dir",
    "embed_queries",
    "embed_texts",
    "model_config",
    "recorded_model",
]

MODEL_PROPERTY = "embedding_model"
Dims = int | Sequence[int] | None
CacheDir = str | os.PathLike[str] | bool | None


def default_cache_dir() -> Path:
    """``$EMBTOOLS_CACHE_DIR``, else ``$XDG_CACHE_HOME/embtools/embeddings``, else ``~/.cache/...``."""
    explicit = os.environ.get("EMBTOOLS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embtools" / "embeddings"


def _spec(model: str | os.PathLike[str] | ModelSpec | None) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else resolve_model(model)


def _dims_list(dims: Dims) -> list[int] | None:
    if dims is None:
        return None
    values = [dims] if isinstance(dims, (int, np.integer)) else list(dims)
    if not values:
        raise InvalidArgumentError("dims is empty; pass None for the model's full dimension")
    out = []
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0:
            raise InvalidArgumentError(f"dims must be positive integers, got {d!r}")
        out.append(int(d))
    return sorted(set(out))


def model_config(
    model: str | os.PathLike[str] | ModelSpec | None = None,
    dims: Dims = None,
    normalize: bool = True,
) -> dict[str, Any]:
    """The model's configuration as recorded in a store, with its config hash under ``"hash"``.

    ``hash`` covers name, revision, normalisation and dims; ``model_hash`` only name and revision
    (it keys the embedding cache, which holds the model's raw full-size outputs).

    Examples
    --------
    >>> cfg = model_config("all-MiniLM-L6-v2", dims=[64, 384])      # doctest: +SKIP
    >>> cfg["name"], cfg["dims"], len(cfg["hash"])                   # doctest: +SKIP
    ('sentence-transformers/all-MiniLM-L6-v2', [64, 384], 16)
    """
    from embtools.config import compute_config_hash

    spec = _spec(model)
    core = {"name": spec.name, "revision": spec.revision}
    hashed = {**core, "normalize": bool(normalize), "dims": _dims_list(dims)}
    return {
        **hashed,
        "source": spec.source,
        "location": spec.location,
        "model_hash": compute_config_hash(core),
        "hash": compute_config_hash(hashed),
    }


class EmbeddingCache:
    """Raw model outputs keyed by model hash and text SHA-256, as Parquet files under ``root/<model_hash>/``.

    Each write is one new file written under a temporary name and renamed, so a crash never leaves a
    half-written entry.

    Examples
    --------
    >>> cache = EmbeddingCache(tmp_dir, "0123456789abcdef")          # doctest: +SKIP
    >>> cache.put(["hello"], np.ones((1, 4), np.float32)); cache.get(["hello"])   # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str], model_hash: str) -> None:
        self.directory = Path(root) / model_hash

    @staticmethod
    def key(text: str) -> str:
        """SHA-256 of the UTF-8 text, hex."""
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors for those of ``texts`` that are cached: text hash -> float32 vector."""
        if not self.directory.is_dir():
            return {}
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        wanted = {self.key(t) for t in texts}
        found: dict[str, np.ndarray] = {}
        for path in sorted(self.directory.glob("part-*.parquet")):
            try:
                table = pq.read_table(path)
            except Exception:
                continue
            table = table.filter(pc.is_in(table["text_hash"], value_set=pa.array(sorted(wanted))))
            if table.num_rows == 0:
                continue
            keys = table["text_hash"].to_pylist()
            vectors = _fixed_list_to_numpy(table["vector"])
            for key, row in zip(keys, vectors, strict=True):
                found[key] = row
        return found

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store ``vectors[i]`` as the model output for ``texts[i]``."""
        if len(texts) == 0:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        table = pa.table({"text_hash": pa.array([self.key(t) for t in texts]), "vector": column})
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.directory / f".tmp-{name}"
        pq.write_table(table, tmp)
        os.replace(tmp, self.directory / name)


def _fixed_list_to_numpy(column: Any) -> np.ndarray:
    chunks = []
    for chunk in column.chunks:
        width = chunk.type.list_size
        chunks.append(chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, width))
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    items = list(texts)
    if not items:
        raise InvalidArgumentError("texts is empty; pass at least one string")
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidArgumentError(f"texts[{i}] is {type(text).__name__}, not str")
    return items


def _normalize(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised as float32 by the NumPy backend's ``normalize``: tiny rows are rescaled
    before their squares underflow, zero rows stay zero.

    Examples
    --------
    >>> _normalize(np.array([[3e-30, 4e-30], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    from embtools.backends import get_backend

    return np.asarray(get_backend("numpy").normalize(x), dtype=np.float32)


def _raw_embeddings(
    texts: list[str],
    spec: ModelSpec,
    batch_size: int,
    device: str | None,
    cache_dir: CacheDir,
    progress: Callable[[int], None] | None,
) -> np.ndarray:
    """The model's raw (unnormalised, full-size) outputs, using and filling the cache."""
    cache = None
    cached: dict[str, np.ndarray] = {}
    if cache_dir is not False:
        root = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
        cache = EmbeddingCache(root, model_config(spec)["model_hash"])
        cached = cache.get(texts)
    keys = [EmbeddingCache.key(t) for t in texts]
    missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in cached}.items())
    if progress is not None and len(texts) > len(missing):
        progress(sum(1 for k in keys if k in cached))
    if missing:
        model = load_model(spec, device=device)
        todo = [t for _, t in missing]
        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            out = model.encode(
                part, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
            )
            vectors = np.asarray(out, dtype=np.float32)
            if cache is not None:
                cache.put(part, vectors)
            for text, row in zip(part, vectors, strict=True):
                cached[EmbeddingCache.key(text)] = row
            if progress is not None:
                progress(len(part))
    return np.stack([cached[k] for k in keys]).astype(np.float32, copy=False)


def embed_texts(
    texts: str | Sequence[str],
    model: str | os.PathLike[str] | ModelSpec | None = DEFAULT_MODEL,
    batch_size: int = 64,
    device: str | None = None,
    dims: Dims = None,
    normalize: bool = True,
    *,
    cache_dir: CacheDir = False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray | dict[int, np.ndarray]:
    """Embed texts with a sentence-transformers model.

    Returns a float32 ``(n, d)`` array for ``dims=None`` (the model's full size) or an int ``dims``;
    a ``{dim: array}`` dict for a list of dims (Matryoshka prefixes). With ``normalize`` each returned
    array is L2-normalised *after* slicing. ``cache_dir``: False (default) no cache, None the default
    cache directory, or a directory. ``progress(n)`` is called as texts are done.

    Examples
    --------
    >>> embed_texts(["hello world"]).shape                        # doctest: +SKIP
    (1, 384)
    >>> sorted(embed_texts(["hello"], dims=[64, 128]))             # doctest: +SKIP
    [64, 128]
    """
    items = _check_texts(texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    wanted = _dims_list(dims)
    raw = _raw_embeddings(items, _spec(model), batch_size, device, cache_dir, progress)
    full = raw.shape[1]
    out: dict[int, np.ndarray] = {}
    for d in wanted or [full]:
        if d > full:
            raise DimensionMismatchError(f"dims {d} is larger than the model's dimension {full}")
        part = np.ascontiguousarray(raw[:, :d])
        out[d] = _normalize(part) if normalize else part
    if dims is None or isinstance(dims, (int, np.integer)):
        return next(iter(out.values()))
    return out


def recorded_model(store: Any) -> dict[str, Any] | None:
    """The model configuration recorded in ``store.properties``, or None."""
    props = getattr(store, "properties", None) or {}
    record = props.get(MODEL_PROPERTY)
    return dict(record) if isinstance(record, Mapping) else None


def _spec_from_record(record: Mapping[str, Any]) -> ModelSpec:
    if record.get("source") == "local":
        return resolve_model(record["location"])
    if record.get("source") == "hub":
        return resolve_model(record["name"], revision=record.get("revision"))
    return resolve_model(record["name"])


def _describe(record: Mapping[str, Any]) -> str:
    return f"{record.get('name')} (revision {record.get('revision')}, dims {record.get('dims')}, normalize={record.get('normalize')})"


def _resolve_for_store(
    store: Any, model: str | os.PathLike[str] | ModelSpec | None, dims: Dims, normalize: bool | None
) -> tuple[ModelSpec, list[int] | None, bool, dict[str, Any] | None]:
    record = recorded_model(store)
    if record is None:
        if getattr(store, "num_rows", 0):
            raise ModelMismatchError(
                "the store holds vectors that were not embedded from texts by embtools (no model is recorded "
                "in its properties); add texts to a new store, or add precomputed vectors with store.add()"
            )
        return _spec(model), _dims_list(dims), True if normalize is None else normalize, None
    spec = _spec_from_record(record) if model is None else _spec(model)
    want_dims = _dims_list(dims) if dims is not None else record.get("dims")
    want_norm = bool(record.get("normalize", True)) if normalize is None else normalize
    candidate = model_config(spec, want_dims, want_norm)
    if candidate["hash"] != record.get("hash"):
        raise ModelMismatchError(
            f"the store's texts were embedded with {_describe(record)}; refusing to add texts embedded "
            f"with {_describe(candidate)}. Use the same model and dims, or a new store"
        )
    return spec, want_dims, want_norm, record


def add_texts(
    store: Any,
    texts: Sequence[str],
    text_ids: Sequence[str] | None = None,
    labels: Sequence[Any] | None = None,
    metadata: Mapping[str, Sequence[Any]] | None = None,
    model: str | os.PathLike[str] | ModelSpec | None = None,
    dims: Dims = None,
    batch_size: int = 64,
    device: str | None = None,
    cache_dir: CacheDir = None,
    normalize: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Embed ``texts`` and add them to ``store`` with the model recorded; returns the new version.

    The first call records the model (default all-MiniLM-L6-v2) and dims in
    ``store.properties["embedding_model"]``; later calls use the recorded model when ``model`` is None
    and refuse another model or other dims with ModelMismatchError. ``cache_dir=None`` uses
    :func:`default_cache_dir`, False disables the cache.

    Examples
    --------
    >>> add_texts(store, ["first text", "second"], text_ids=["a", "b"], dims=[64, 384])  # doctest: +SKIP
    1
    """
    items = _check_texts(texts)
    spec, wanted, norm, record = _resolve_for_store(store, model, dims, normalize)
    vectors = embed_texts(
        items,
        spec,
        batch_size=batch_size,
        device=device,
        dims=wanted,
        normalize=norm,
        cache_dir=cache_dir,
        progress=progress,
    )
    by_dim = vectors if isinstance(vectors, dict) else {int(vectors.shape[1]): vectors}
    properties = None
    if record is None:
        properties = {MODEL_PROPERTY: _record(model_config(spec, sorted(by_dim), norm))}
    return int(
        store.add(
            by_dim, text_ids=text_ids, labels=labels, metadata=metadata, properties=properties
        )
    )


def _record(config: dict[str, Any]) -> dict[str, Any]:
    return {
        k: config[k]
        for k in (
            "name",
            "revision",
            "source",
            "location",
            "normalize",
            "dims",
            "hash",
            "model_hash",
        )
    }


def embed_queries(
    store: Any,
    texts: str | Sequence[str],
    dimension: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    cache_dir: CacheDir = False,
) -> np.ndarray:
    """Embed query strings with the model recorded in ``store``: a float32 ``(n, dimension)`` array.

    ``dimension`` defaults to the largest recorded dim; it may be any prefix size up to the model's.
    Raises ModelMismatchError when the store records no model (its vectors did not come from texts).

    Examples
    --------
    >>> embed_queries(store, ["how do I parse json"], dimension=128).shape   # doctest: +SKIP
    (1, 128)
    """
    record = recorded_model(store)
    if record is None:
        raise ModelMismatchError(
            "this store records no embedding model (its vectors were added as arrays), so text queries "
            "cannot be embedded; pass query vectors instead, or build the store with add_texts / "
            "`embtools ingest --text-column`"
        )
    recorded_dims = record.get("dims") or []
    dim = dimension if dimension is not None else (max(recorded_dims) if recorded_dims else None)
    out = embed_texts(
        texts,
        _spec_from_record(record),
        batch_size=batch_size,
        device=device,
        dims=dim,
        normalize=bool(record.get("normalize", True)),
        cache_dir=cache_dir,
    )
    assert isinstance(out, np.ndarray)
    return out
