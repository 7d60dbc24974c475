"""The store-level operations on IVF indexes: create, find (for search), optimise, drop, describe.

Examples
--------
>>> import numpy as np, tempfile, embtools as et
>>> store = et.EmbeddingStore(tempfile.mkdtemp() + "/s", backend="numpy")
>>> x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
>>> _ = store.add(x)
>>> v = create_index(store, dimension=16, partitions=8, codes="float")
>>> [(i["name"], i["partitions"], i["indexed_rows"], i["unindexed_rows"]) for i in index_info(store)]
[('emb_16_cosine', 8, 500, 0)]
>>> store.search(x[:2], k=1, nprobe=8)["row_id"].to_list()
[0, 1]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embtools.backends.base import check_k, check_metric
from embtools.errors import CorruptStoreError, InvalidArgumentError, MemoryLimitError
from embtools.index.build import build_index, commit_index, finish_build
from embtools.index.files import raw_codes
from embtools.index.probe import IvfIndex
from embtools.index.soar import check_soar_lambda
from embtools.memory import format_bytes

__all__ = ["CODES", "create_index", "drop_index", "find_index", "index_info", "optimize_index"]

#: The kinds of probe codes (besides an int: a Matryoshka prefix dimension of float32 codes).
CODES = ("int8", "binary", "float")
#: optimize_index retrains (rebuilds) when more than this share of the rows is outside the index
#: or deleted since it was built; below it, new rows are assigned to the existing centroids.
RETRAIN_SHARE = 0.2


def _directory(store: Any, what: str) -> Any:
    if store.path is None:
        raise InvalidArgumentError(f"{what} needs a store directory (an in-memory store has no index)")
    if not getattr(store.source, "storage", None) or not store.source.storage.is_local:
        raise InvalidArgumentError(
            f"{what}: indexes of stores on object storage are not supported yet; build the index "
            "on a local copy of the store")
    return store.source


def _code_dim(codes: Any, dimension: int, metric: str) -> tuple[str, int]:
    if isinstance(codes, str):
        if codes == "binary" and metric == "l2":
            raise InvalidArgumentError("binary codes rank by sign agreement: use int8 or float codes for l2")
        if codes in CODES:
            return codes, dimension
        raise InvalidArgumentError(f"codes must be one of {CODES} or a Matryoshka dimension, got {codes!r}")
    if isinstance(codes, bool) or not isinstance(codes, (int, np.integer)) or not 1 <= codes <= dimension:
        raise InvalidArgumentError(
            f"codes must be one of {CODES} or a prefix dimension between 1 and {dimension}, got {codes!r}")
    return ("float" if int(codes) == dimension else str(int(codes))), int(codes)


def create_index(store: Any, dimension: int = 384, partitions: int | None = None,
                 codes: Any = "int8", sample_rows: int | None = None, metric: str = "cosine",
                 *, soar_lambda: float | None = None, progress: bool | None = None) -> int:
    """Train and commit an IVF index of ``dimension`` for ``metric``; the new version.

    See :meth:`embtools.store.EmbeddingStore.create_index`.
    """
    store._writable()
    src = _directory(store, "create_index")
    dim = check_k(dimension, "dimension")
    src.resolve(dim)
    metric = check_metric(metric)
    kind, code_dim = _code_dim(codes, dim, metric)
    if partitions is not None:
        partitions = check_k(partitions, "partitions")
    if sample_rows is not None:
        sample_rows = check_k(sample_rows, "sample_rows")
    soar = check_soar_lambda(soar_lambda)
    if src.num_rows == 0:
        raise InvalidArgumentError("the store has no rows to index")
    entry = build_index(src.root, src, store.backend, store.budget, dimension=dim, metric=metric,
                        code_dim=code_dim, codes=kind, partitions=partitions,
                        sample_rows=sample_rows, show=progress, soar=soar)
    commit_index(src.root, entry)
    finish_build(src.root, entry.name, entry.info.get("build"))
    return store.refresh()


def drop_index(store: Any, dimension: int | None = None, metric: str | None = None) -> int:
    """Remove the index of ``dimension`` and ``metric`` (None: every index) as a new version; the
    index files stay for older versions until vacuum."""
    store._writable()
    src = _directory(store, "drop_index")
    names = [i.name for i in src.manifest.indexes
             if (dimension is None or i.dimension == dimension) and (metric is None or i.metric == metric)]
    if not names:
        raise InvalidArgumentError(
            f"no index of dimension {dimension} and metric {metric} in version {store.version}; "
            f"indexes: {[i.name for i in src.manifest.indexes]}")
    for name in names:
        commit_index(src.root, None, drop=name, operation="drop_index")
    return store.refresh()


def find_index(store: Any, dim: int, metric: str) -> IvfIndex | None:
    """The index serving ``dim`` and ``metric`` in the open version, opened once per version (None
    when there is none; MemoryLimitError when its centroids and row maps, 24 bytes a row, do
    not fit half of the memory the cap leaves)."""
    src = store.source
    manifest = getattr(src, "manifest", None)
    if manifest is None:
        return None
    entry = next((i for i in manifest.indexes if i.dimension == dim and i.metric == metric), None)
    if entry is None:
        return None
    cache: dict[tuple[int, str], IvfIndex] = store.__dict__.setdefault("_index_cache", {})
    key = (int(src.version), entry.name)
    hit = cache.get(key)
    if hit is not None:
        return hit
    for old in [k for k in cache if k[0] != key[0]]:
        cache.pop(old).close()
    avail = store.budget.available_bytes
    n = int(src.num_rows)
    # row ids and positions; raw codes: each row's address in them (and, cosine, its norm and
    # inverse norm), as IvfIndex.resident_bytes counts them
    per_row = 24
    if raw_codes(entry.info.get("codes"), entry.info.get("code_dim"), entry.dimension):
        per_row += 8 + (12 if entry.metric == "cosine" else 0)
    copies = 1 if entry.info.get("soar_lambda") is None else 2  # row maps per entry: a SOAR row is two
    need = n * per_row * copies + entry.dimension * 4 * int(entry.info.get("partitions", 0))
    if avail is not None and need > avail // 2:
        raise MemoryLimitError(
            f"index {entry.name}: its centroids and row maps ({format_bytes(need)}) do not fit half "
            f"of the {format_bytes(avail)} the memory cap leaves; raise max_memory_gb or search "
            "with exact=True")
    row_ids = src.metadata().select("row_id").collect()["row_id"].to_numpy().astype(np.int64)
    if len(row_ids) != n or (n > 1 and (np.diff(row_ids) <= 0).any()):
        raise CorruptStoreError(f"{src.root}: the row ids of version {src.version} are not ascending")
    try:
        index = IvfIndex(src, entry, store.budget, row_ids)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"{src.root}: index {entry.name} is unreadable ({exc})") from None
    if avail is not None and index.resident_bytes() > avail // 2:
        index.close()
        raise MemoryLimitError(
            f"index {entry.name}: {format_bytes(index.resident_bytes())} kept in memory (codes this "
            f"installation cannot map, row maps, centroids) do not fit half of the "
            f"{format_bytes(avail)} the memory cap leaves; raise max_memory_gb or search with exact=True")
    cache[key] = index
    return index


def _soar_shown(value: Any) -> float | None:
    """SOAR's lambda as the manifest holds it, None where it is not a valid one."""
    try:
        return check_soar_lambda(value)
    except InvalidArgumentError:
        return None


def index_info(store: Any) -> list[dict[str, Any]]:
    """One dict per index of the open version: name, dimension, metric, codes, SOAR's lambda
    (None: one partition per row), partitions, rows indexed (live), rows outside it, rows
    deleted since it was built, files and bytes."""
    manifest = getattr(store.source, "manifest", None)
    out = []
    for entry in [] if manifest is None else manifest.indexes:
        try:
            idx = find_index(store, entry.dimension, entry.metric)
        except MemoryLimitError:
            idx = None
        built = int(entry.info.get("rows", 0)) + int(entry.info.get("delta_rows", 0))
        live = None if idx is None else idx.live_rows
        out.append({
            "name": entry.name, "dimension": entry.dimension, "metric": entry.metric,
            "codes": entry.info.get("codes"), "code_dim": entry.info.get("code_dim"),
            "soar_lambda": idx.soar if idx is not None else _soar_shown(entry.info.get("soar_lambda")),
            "partitions": entry.info.get("partitions"), "built_version": entry.info.get("built_version"),
            "indexed_rows": live,
            "unindexed_rows": None if idx is None else len(idx.uncovered),
            "deleted_rows": None if live is None else built - live,
            "files": len(entry.files), "bytes": sum(entry.file_bytes),
        })
    return out


def optimize_index(store: Any, dimension: int | None = None, metric: str | None = None, *,
                   retrain_share: float = RETRAIN_SHARE, progress: bool | None = None) -> int:
    """Bring the index up to date with the open version; the new version (or the open one when
    there is nothing to do). Rows added since the build are assigned to the existing centroids
    and written as more codes files (a delta); when rows outside the index or deleted since its
    build pass ``retrain_share`` of the rows, the index is trained and written again."""
    from embtools.index.build import assign_rows, delta_spill

    store._writable()
    src = _directory(store, "optimize_index")
    entries = [i for i in src.manifest.indexes
               if (dimension is None or i.dimension == dimension) and (metric is None or i.metric == metric)]
    if not entries:
        raise InvalidArgumentError(f"no index of dimension {dimension} and metric {metric} to optimise")
    if isinstance(retrain_share, bool) or not isinstance(retrain_share, (int, float)) or not 0 <= retrain_share <= 1:
        raise InvalidArgumentError(f"retrain_share must be a number in [0, 1], got {retrain_share!r}")
    for entry in entries:
        src = store.source
        idx = find_index(store, entry.dimension, entry.metric)
        if idx is None:
            raise InvalidArgumentError(f"index {entry.name} does not fit the memory cap to be optimised")
        built = int(entry.info.get("rows", 0)) + int(entry.info.get("delta_rows", 0))
        dead = built - idx.live_rows
        new = len(idx.uncovered)
        if new == 0 and dead == 0:
            continue
        if (new + dead) > retrain_share * max(1, src.num_rows):
            fresh = build_index(src.root, src, store.backend, store.budget, dimension=entry.dimension,
                                metric=entry.metric, code_dim=int(entry.info["code_dim"]),
                                codes=idx.codes, partitions=None,
                                sample_rows=None, show=progress, soar=idx.soar)
            commit_index(src.root, fresh, operation="optimize_index")
            finish_build(src.root, fresh.name, fresh.info.get("build"))
        elif new:
            pos = idx.uncovered
            row_ids = src.take_metadata(pos, ["row_id"])["row_id"].to_numpy().astype(np.int64)
            held = entry.info.get("int8_ranges")
            ranges = None if held is None else np.asarray(held, np.float32)
            spill = delta_spill(src.root, entry.name, pos, row_ids, idx.centroids,
                                int(entry.info["code_dim"]), entry.metric, idx.codes, store.budget,
                                ranges, idx.raw, idx.soar)  # the delta's codes are as the index's
            written = assign_rows(src.root, entry.name, src, pos, row_ids, idx.centroids,
                                  entry.dimension, int(entry.info["code_dim"]), entry.metric,
                                  store.backend, store.budget, progress, idx.codes, ranges, spill,
                                  idx.raw, idx.soar)
            from dataclasses import replace

            from embtools.storage.durable import fsync_dir
            from embtools.storage.manifest import crash_point

            fsync_dir(f"{src.root}/_index/{entry.name}")
            crash_point("after_index_files")
            info = {**entry.info, "delta_rows": int(entry.info.get("delta_rows", 0)) + len(pos)}
            covers = sorted({*entry.covers, *(f.path for f in src.manifest.files)})
            delta = replace(entry, files=[*entry.files, *(f for f, _ in written)],
                            file_bytes=[*entry.file_bytes, *(b for _, b in written)],
                            covers=covers, info=info)
            commit_index(src.root, delta, operation="optimize_index")
            spill.remove()
        store.refresh()
    return store.refresh()

