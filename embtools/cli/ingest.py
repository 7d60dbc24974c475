"""``embtools ingest STORE FILE``: add rows from Parquet, CSV or JSONL, resumably.

Rows come with precomputed vectors (``--vector-column``) or texts embedded with ``--model``
(``--text-column``). Rows are committed in chunks (``--commit-rows``); rows whose text id is already
in the store are skipped, so re-running after an interruption finishes the job with every row once.
An unfinished ingest is recorded as a resumable job (:class:`embtools.storage.jobs.Job`) in
``<store>/_jobs/ingest-<hash>/``: the chunks committed so far are not read again.

Examples
--------
>>> read_table_file  # doctest: +ELLIPSIS
<function read_table_file at ...>
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from embtools.cli.cluster import ray_option
from embtools.cli.common import err_console, open_store, parse_int_list, split_names
from embtools.errors import (
    DuplicateTextIdError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
)
from embtools.storage.jobs import progress as job_progress

__all__ = ["COMMANDS", "JOBS_DIR", "prefixes", "read_table_file", "vectors_from_column"]

#: Folder of a store that holds the records of unfinished ingest jobs (removed when they finish).
JOBS_DIR = "_jobs"

_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


def read_table_file(path: Path, fmt: str = "auto") -> Any:
    """Read a Parquet, CSV or JSONL file into a polars DataFrame (format from the suffix by default)."""
    import polars as pl

    kind = _FORMATS.get(path.suffix.lower()) if fmt == "auto" else fmt
    if kind is None:
        raise InvalidArgumentError(
            f"cannot tell the format of {path} from its suffix; pass --format parquet|csv|jsonl"
        )
    if kind == "parquet":
        return pl.read_parquet(path)
    if kind == "csv":
        return pl.read_csv(path)
    return pl.read_ndjson(path)


def _check_columns(df: Any, names: list[str], path: Path) -> None:
    for name in names:
        if name not in df.columns:
            raise InvalidArgumentError(
                f"column {name!r} is not in {path.name} (its columns: {', '.join(df.columns)})"
            )


def vectors_from_column(series: Any) -> np.ndarray:
    """A polars list/array column of numbers as a float32 ``(n, d)`` array (errors if ragged)."""
    import polars as pl

    if series.null_count():
        raise InvalidEmbeddingsError(
            f"vector column {series.name!r} has {series.null_count()} null rows"
        )
    if isinstance(series.dtype, pl.Array):
        width = series.dtype.size
    elif isinstance(series.dtype, pl.List):
        lengths = series.list.len()
        width = int(lengths.min() or 0)
        if width != int(lengths.max() or 0):
            raise InvalidEmbeddingsError(
                f"vector column {series.name!r} is ragged (lengths {width}..{lengths.max()})"
            )
    else:
        raise InvalidEmbeddingsError(
            f"vector column {series.name!r} has type {series.dtype}, not a list of numbers"
        )
    if width == 0:
        raise InvalidEmbeddingsError(f"vector column {series.name!r} holds empty vectors")
    flat = series.cast(pl.Array(pl.Float32, width)).to_numpy()
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(series), width)


def prefixes(vectors: np.ndarray, dims: list[int] | None) -> dict[int, np.ndarray]:
    """``{d: vectors[:, :d]}`` for each Matryoshka dim (the full width when ``dims`` is None)."""
    width = vectors.shape[1]
    wanted = dims or [width]
    for d in wanted:
        if d > width:
            raise InvalidArgumentError(f"--dims {d} is larger than the vectors' dimension {width}")
    return {d: np.ascontiguousarray(vectors[:, :d]) for d in sorted(set(wanted))}


def _existing_ids(store: Any) -> set[str]:
    if not store.num_rows:
        return set()
    ids = store.metadata().select("text_id").collect()["text_id"]
    return set(ids.to_list())


def _job_params(file: Path, options: dict[str, Any]) -> dict[str, Any]:
    """What identifies an ingest job: the input file (path, size, mtime) and the options."""
    st = file.stat()
    return {"kind": "ingest", "file": str(file.resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, **options}


def _open_job(store: Any, params: dict[str, Any]) -> Any:
    """The resumable job record of this ingest: ``<store>/_jobs/ingest-<param hash>/``."""
    from embtools.config import compute_param_hash
    from embtools.storage.io import is_url
    from embtools.storage.jobs import Job

    # a store on object storage keeps its job records in its local cache folder (cache_dir)
    base = Path(store._state.storage.local_root) if is_url(store.path) else Path(store.path)
    folder = base / JOBS_DIR / f"ingest-{compute_param_hash(**params)}"
    return Job(folder, params, part_files=False)


def _close_job(job: Any) -> None:
    """Remove a finished job's record, and those of earlier ingests of the same file with other
    options (their rows are in the store now), and ``_jobs/`` when it is left empty."""
    import shutil

    from embtools.storage.jobs import JOB_FILE, read_json

    for folder in job.path.parent.glob("ingest-*"):
        record = read_json(folder / JOB_FILE)
        if folder == job.path or (record is not None and record.get("file") == job.params["file"]):
            shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        job.path.parent.rmdir()


@click.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "parquet", "csv", "jsonl"]),
    default="auto",
    show_default=True,
    help="Input format (default: from the file's suffix).",
)
@click.option(
    "--id-column", default=None, help="Column of unique text ids (default: the row number)."
)
@click.option("--label-column", default=None, help="Column of labels.")
@click.option("--text-column", default=None, help="Column of texts to embed with --model.")
@click.option(
    "--vector-column", default=None, help="Column of precomputed vectors (lists of numbers)."
)
@click.option(
    "--metadata-columns", default=None, help="Comma-separated columns to keep as metadata."
)
@click.option(
    "--model",
    default=None,
    help="Embedding model for --text-column: a name or a local directory "
    "(default: the store's recorded model, else all-MiniLM-L6-v2).",
)
@click.option(
    "--dims", default=None, help="Matryoshka dims to store, e.g. 64,128,384 (default: full)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Texts per model batch.",
)
@click.option("--device", default=None, help="Device for the model (cpu, cuda, mps).")
@click.option(
    "--commit-rows",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Rows per commit; an interrupted ingest keeps every committed chunk.",
)
@click.option(
    "--store-text/--no-store-text",
    default=True,
    show_default=True,
    help="Keep --text-column as a 'text' metadata column (shown by search).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Embedding cache directory (default: $EMBTOOLS_CACHE_DIR or ~/.cache/embtools).",
)
@ray_option
def ingest(
    store: str,
    file: Path,
    fmt: str,
    id_column: str | None,
    label_column: str | None,
    text_column: str | None,
    vector_column: str | None,
    metadata_columns: str | None,
    model: str | None,
    dims: str | None,
    batch_size: int,
    device: str | None,
    commit_rows: int,
    store_text: bool,
    cache_dir: str | None,
    ray_address: str | None,
) -> None:
    """Add the rows of FILE (Parquet, CSV or JSONL) to STORE, creating it if needed.

    Give either --vector-column (precomputed vectors) or --text-column (texts embedded with
    --model). Rows whose id is already in the store are skipped, so re-running an interrupted
    ingest finishes it. With --ray the file is read and embedded by a Ray job (an actor pool
    loading the model once per actor) and committed as one version; it needs --id-column.
    """
    import polars as pl

    from embtools.embed import add_texts

    if (text_column is None) == (vector_column is None):
        raise click.UsageError("give exactly one of --text-column and --vector-column")
    if model is not None and vector_column is not None:
        raise click.UsageError("--model applies to --text-column, not to --vector-column")
    dim_list = parse_int_list(dims, "--dims")
    meta_cols = split_names(metadata_columns)
    options = {"format": fmt, "id_column": id_column, "label_column": label_column,
               "text_column": text_column, "vector_column": vector_column,
               "metadata_columns": meta_cols, "model": model, "dims": dim_list,
               "commit_rows": commit_rows, "store_text": store_text}
    if ray_address is not None:
        _ray_ingest(store, file, options, batch_size, device, ray_address)
        return
    df = read_table_file(file, fmt)
    named = [c for c in (id_column, label_column, text_column, vector_column) if c] + meta_cols
    _check_columns(df, named, file)
    ids = (
        df[id_column].cast(pl.String)
        if id_column
        else pl.Series(np.arange(len(df))).cast(pl.String)
    )
    if ids.null_count():
        raise InvalidArgumentError(f"id column {id_column!r} has {ids.null_count()} null values")
    if ids.n_unique() != len(ids):
        dup = ids.filter(ids.is_duplicated()).head(3).to_list()
        raise DuplicateTextIdError(f"{file.name} repeats text ids, e.g. {dup}")
    if vector_column is not None and len(df):
        prefixes(
            vectors_from_column(df[vector_column].head(1)), dim_list
        )  # type and --dims, up front
    target = open_store(store, create=True, backend="numpy")
    job = _open_job(target, _job_params(file, options))
    existing = _existing_ids(target)
    keep = ~ids.is_in(list(existing)) if existing else pl.Series([True] * len(df))
    n_todo = int(keep.sum())
    skipped = len(df) - n_todo
    console = err_console()
    if job.done:
        console.print(f"resuming: {len(job.done):,} chunks of {file.name} were committed before")
    if skipped:
        console.print(f"skipping {skipped:,} rows whose text id is already in {store}")
    start = time.perf_counter()
    version = target.version
    # chunks of --commit-rows input rows; a chunk is recorded in the job once it is committed
    # (rows of a chunk committed but not recorded are skipped by their text ids)
    with job_progress(n_todo, "ingest", unit="rows") as advance:
        for part in job.todo(-(-len(df) // commit_rows)):
            lo = part * commit_rows
            rows = keep.slice(lo, commit_rows)
            chunk = df.slice(lo, commit_rows).filter(rows)
            chunk_ids = ids.slice(lo, commit_rows).filter(rows).to_list()
            if not chunk_ids:  # committed before: nothing to do or to record
                continue
            labels = chunk[label_column].cast(pl.String).to_list() if label_column else None
            metadata = {c: chunk[c].to_list() for c in meta_cols if c != text_column}
            if text_column is not None:
                texts = chunk[text_column].cast(pl.String).fill_null("").to_list()
                if store_text:
                    metadata["text"] = texts
                version = add_texts(
                    target,
                    texts,
                    text_ids=chunk_ids,
                    labels=labels,
                    metadata=metadata or None,
                    model=model,
                    dims=dim_list,
                    batch_size=batch_size,
                    device=device,
                    cache_dir=cache_dir,
                    progress=advance,
                )
            else:
                vectors = vectors_from_column(chunk[vector_column])
                version = target.add(
                    prefixes(vectors, dim_list),
                    text_ids=chunk_ids,
                    labels=labels,
                    metadata=metadata or None,
                )
                advance(len(chunk))
            job.record(part)
    _close_job(job)
    elapsed = time.perf_counter() - start
    rate = n_todo / elapsed if elapsed > 0 else float("inf")
    click.echo(
        f"ingested {n_todo:,} rows ({skipped:,} already present) in {elapsed:.1f} s "
        f"({rate:,.0f} rows/s); {store} is at version {version}"
    )


def _read_dataset(file: Path, fmt: str) -> Any:
    """FILE as a Ray dataset (its path must be readable by the cluster's workers)."""
    import ray.data

    kind = _FORMATS.get(file.suffix.lower()) if fmt == "auto" else fmt
    if kind is None:
        raise InvalidArgumentError(
            f"cannot tell the format of {file} from its suffix; pass --format parquet|csv|jsonl")
    path = str(file.resolve())
    if kind == "parquet":
        return ray.data.read_parquet(path)
    if kind == "csv":
        return ray.data.read_csv(path)
    return ray.data.read_json(path, lines=True)


def _as_strings(table: Any, column: str) -> Any:
    """Labels and ids as strings, as the local ingest stores them."""
    import pyarrow as pa

    i = table.column_names.index(column)
    return table.set_column(i, column, table.column(column).cast(pa.string()))


def _ray_ingest(store: str, file: Path, options: dict[str, Any], batch_size: int,
                device: str | None, address: str) -> None:
    """``embtools ingest --ray``: one Ray job, one version (a re-run commits nothing)."""
    from embtools.cli.cluster import connect
    from embtools.config import compute_param_hash

    id_column = options["id_column"]
    if id_column is None:
        raise click.UsageError("--ray needs --id-column (rows of a distributed read have no "
                               "stable row numbers to use as ids)")
    target = open_store(store, create=True, backend="numpy")
    before = target.num_rows
    connect(address)
    from embtools.ray import embed_to_store, vectors_to_store

    ds = _read_dataset(file, options["format"])
    _check_columns_ray(ds, [c for c in (id_column, options["label_column"],
                                        options["text_column"], options["vector_column"]) if c]
                       + options["metadata_columns"], file)
    for column in (id_column, options["label_column"]):
        if column is not None:
            ds = ds.map_batches(_as_strings, fn_args=(column,), batch_format="pyarrow")
    job_id = f"ingest-{compute_param_hash(**_job_params(file, options))}"
    start = time.perf_counter()
    text_column = options["text_column"]
    meta = [c for c in options["metadata_columns"] if c != text_column]
    if text_column is not None:
        version = embed_to_store(
            ds, target, text_column=text_column, id_column=id_column,
            label_column=options["label_column"], metadata_columns=meta,
            model=options["model"], dims=options["dims"], batch_size=batch_size, device=device,
            store_text=options["store_text"], job_id=job_id)
    else:
        version = vectors_to_store(
            ds, target, vector_column=options["vector_column"], id_column=id_column,
            label_column=options["label_column"], metadata_columns=meta, dims=options["dims"],
            job_id=job_id)
    elapsed = time.perf_counter() - start
    added = target.num_rows - before
    click.echo(f"ingested {added:,} rows with Ray in {elapsed:.1f} s "
               f"({added / elapsed if elapsed > 0 else 0:,.0f} rows/s); {store} is at version {version}")


def _check_columns_ray(ds: Any, names: list[str], file: Path) -> None:
    have = ds.columns()
    for name in names:
        if name not in have:
            raise InvalidArgumentError(
                f"column {name!r} is not in {file.name} (its columns: {', '.join(have)})")


COMMANDS = [ingest]
