"""``embtools search`` (text or vector queries against a store) and ``embtools join`` (batch top-k).

Examples
--------
>>> read_queries_file  # doctest: +ELLIPSIS
<function read_queries_file at ...>
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from embtools.cli.cluster import ray_option
from embtools.cli.common import (
    err_console,
    open_store,
    out_console,
    parse_funnel_option,
    table_cell,
)
from embtools.errors import InvalidArgumentError

__all__ = ["COMMANDS", "read_queries_file", "write_results"]


def read_queries_file(path: Path) -> list[str] | np.ndarray:
    """Queries from a file: ``.npy`` -> a float array of vectors; anything else -> one text per line."""
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as err:  # EOFError: an empty or truncated file
            raise InvalidArgumentError(
                f"{path} is not a numeric .npy array: {err or 'the file is empty or truncated'}"
            ) from None
        return np.atleast_2d(arr)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise InvalidArgumentError(
            f"{path} is not UTF-8 text (byte {err.start}); give one query per line in UTF-8, or "
            "a .npy array of vectors"
        ) from None
    texts = [line for line in lines if line]
    if not texts:
        raise InvalidArgumentError(f"{path} holds no queries (one query per line)")
    return texts


def write_results(df: Any, out: Path | None, fmt: str) -> None:
    """Write ``df`` to ``out`` (format from its suffix: .parquet, .csv, .json) or print it as ``fmt``."""
    if out is not None:
        suffix = out.suffix.lower()
        if suffix == ".csv":
            df.write_csv(out)
        elif suffix == ".json":
            df.write_json(out)
        else:
            df.write_parquet(out)
        err_console().print(f"wrote {df.height:,} rows to {out}")
        return
    # color=True: click would otherwise strip escape sequences from the data when not on a tty
    if fmt == "json":
        click.echo(df.write_json(), color=True)
    elif fmt == "csv":
        click.echo(df.write_csv(), nl=False, color=True)
    else:
        _print_table(df)


def _print_table(df: Any) -> None:
    from rich.table import Table

    table = Table(show_lines=False)
    shown = [c for c in df.columns if c not in {"row_id"}]
    for name in shown:
        table.add_column(
            name, overflow="fold", max_width=70 if name in {"text", "query_text"} else None
        )
    for row in df.select(shown).iter_rows():  # stored ids and labels: escaped, never markup
        table.add_row(*[table_cell(v) for v in row])
    out_console().print(table)


def _metadata_columns(store: Any) -> list[str]:
    return list(store.metadata().collect_schema().names())


@click.command()
@click.argument("store", type=click.Path())
@click.option("--query", "-q", "queries", multiple=True, help="A query text (repeatable).")
@click.option(
    "--queries",
    "queries_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A file of queries: one text per line, or a .npy array of vectors.",
)
@click.option("-k", "k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option(
    "--dim", type=int, default=None, help="Dimension to search (default: the largest stored)."
)
@click.option(
    "--metric", type=click.Choice(["cosine", "dot", "l2"]), default="cosine", show_default=True
)
@click.option(
    "--where",
    default=None,
    help="SQL predicate on metadata, e.g. \"label = 'json' AND n_words > 5\".",
)
@click.option(
    "--funnel", default=None,
    help="Funnel STAGE:SHORTLIST pairs: Matryoshka dimensions (64:400,128:100) and/or quantized "
         "stages first (binary:400,int8:40).",
)
@click.option(
    "--precision", type=click.Choice(["float32", "int8", "binary"]), default="float32",
    show_default=True,
    help="int8/binary: shortlist by the quantized codes (embtools quantize), then exact scores.",
)
@click.option(
    "--rescore", type=int, default=None,
    help="With --precision int8/binary: rows shortlisted per result (default: binary 10, int8 4).",
)
@click.option("--nprobe", type=int, default=None,
              help="Partitions probed per query when the store has an index (default: about sqrt).")
@click.option("--refine", type=int, default=None, help="Index shortlist: k * REFINE rows re-ranked exactly.")
@click.option("--exact", is_flag=True, help="Search every row even when an index serves the search.")
@click.option(
    "--backend", default=None, help="Compute backend: numpy, torch or mlx (default: auto)."
)
@click.option("--device", default=None, help="Device for the backend: cpu, cuda, cuda:1, mps, gpu.")
@click.option(
    "--max-memory-gb", type=float, default=None, help="Cap on embedding bytes held at once."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the results to a file (.parquet, .csv or .json) instead of printing them.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="How to print the results.",
)
def search(
    store: str,
    queries: tuple[str, ...],
    queries_file: Path | None,
    k: int,
    dim: int | None,
    metric: str,
    where: str | None,
    funnel: str | None,
    nprobe: int | None,
    refine: int | None,
    exact: bool,
    precision: str,
    rescore: int | None,
    backend: str | None,
    device: str | None,
    max_memory_gb: float | None,
    out: Path | None,
    fmt: str,
) -> None:
    """Top-k search of STORE for text queries (embedded with the store's model) or vectors: exact,
    or through the store's IVF index when it has one (see `embtools index`; --exact to skip it)."""
    import polars as pl

    from embtools.embed import embed_queries

    if bool(queries) == (queries_file is not None):
        raise click.UsageError(
            "give --query TEXT (repeatable) or --queries FILE, not both or neither"
        )
    if k <= 0:
        raise InvalidArgumentError(f"-k must be a positive integer, got {k}")
    stages = parse_funnel_option(funnel)
    s = open_store(store, backend=backend, device=device, max_memory_gb=max_memory_gb)
    items: list[str] | np.ndarray = list(queries) if queries else read_queries_file(queries_file)  # type: ignore[arg-type]
    texts: list[str] | None = None
    start = time.perf_counter()
    if isinstance(items, np.ndarray):
        vectors = items
    else:
        texts = items
        search_dim = dim if dim is not None else (max(s.dimensions) if s.dimensions else None)
        vectors = embed_queries(s, texts, dimension=search_dim, device=device)
    embedded = time.perf_counter()
    columns = [c for c in ("text",) if c in _metadata_columns(s)]
    df = s.search(
        vectors,
        k=k,
        dimension=dim,
        metric=metric,
        where=where,
        funnel=stages,
        columns=columns or None,
        nprobe=nprobe,
        refine=refine,
        exact=exact,
        precision=precision,
        rescore=rescore,
    )
    done = time.perf_counter()
    if texts is not None:
        df = df.with_columns(
            pl.col("query")
            .replace_strict(list(range(len(texts))), texts, return_dtype=pl.String)
            .alias("query_text")
        )
        df = df.select(
            "query", "query_text", *[c for c in df.columns if c not in {"query", "query_text"}]
        )
    write_results(df, out, fmt)
    if fmt == "table" or out is not None:
        timing = f"search {1000 * (done - embedded):.1f} ms"
        if texts is not None:
            timing = f"embedding {1000 * (embedded - start):.1f} ms, " + timing
        err_console().print(f"{len(vectors)} queries over {s.num_rows:,} rows: {timing}")


@click.command()
@click.argument("left", type=click.Path())
@click.argument("right", type=click.Path())
@click.option(
    "--k", "-k", "k", type=int, default=10, show_default=True, help="Neighbours per left row."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the Parquet result parts (re-running resumes the job).",
)
@click.option("--exclude-self", is_flag=True, help="Self-join: drop each row's match with itself.")
@click.option(
    "--dim", type=int, default=None, help="Dimension to compare (default: the largest shared)."
)
@click.option(
    "--metric", type=click.Choice(["cosine", "dot", "l2"]), default="cosine", show_default=True
)
@click.option("--where", default=None, help="SQL predicate selecting the RIGHT rows searched.")
@click.option("--overwrite", is_flag=True, help="Replace an existing result with other parameters.")
@click.option(
    "--max-memory-gb", type=float, default=None, help="Cap on embedding bytes held at once."
)
@click.option(
    "--backend", default=None, help="Compute backend: numpy, torch or mlx (default: auto)."
)
@click.option("--device", default=None, help="Device for the backend.")
@click.option("--nprobe", type=int, default=None,
              help="Approximate join through RIGHT's IVF index, probing NPROBE partitions per row.")
@ray_option
def join(
    left: str,
    right: str,
    k: int,
    out: Path,
    exclude_self: bool,
    dim: int | None,
    metric: str,
    where: str | None,
    overwrite: bool,
    max_memory_gb: float | None,
    backend: str | None,
    device: str | None,
    nprobe: int | None,
    ray_address: str | None,
) -> None:
    """Top-k rows of RIGHT for every row of LEFT, written as Parquet under --out (resumable);
    exact, or approximate through RIGHT's index with --nprobe.

    With --ray, each chunk of LEFT rows is a Ray task under --max-memory-gb (default 1 GB).
    """
    import polars as pl

    from embtools.search import similarity_join

    if k <= 0:
        raise InvalidArgumentError(f"--k must be a positive integer, got {k}")
    if ray_address is not None:
        _ray_join(left, right, k, out, exclude_self, dim, metric, where, overwrite,
                  max_memory_gb, nprobe, ray_address)
        return
    lstore = open_store(left, backend=backend, device=device, max_memory_gb=max_memory_gb)
    same = Path(right).resolve() == Path(left).resolve()
    rstore = (
        lstore
        if same
        else open_store(right, backend=backend, device=device, max_memory_gb=max_memory_gb)
    )
    start = time.perf_counter()
    path = similarity_join(
        lstore,
        rstore,
        k,
        out=out,
        dimension=dim,
        where=where,
        exclude_self=exclude_self,
        metric=metric,
        overwrite=overwrite,
        progress=sys.stderr.isatty(),
        nprobe=nprobe,
    )
    elapsed = time.perf_counter() - start
    rows = pl.scan_parquet(str(Path(path) / "*.parquet")).select(pl.len()).collect().item()
    click.echo(f"wrote {rows:,} pairs for {lstore.num_rows:,} rows to {path} in {elapsed:.1f} s")


def _ray_join(left: str, right: str, k: int, out: Path, exclude_self: bool, dim: int | None,
              metric: str, where: str | None, overwrite: bool, max_memory_gb: float | None,
              nprobe: int | None, address: str) -> None:
    """``embtools join --ray``: :func:`embtools.ray.similarity_join` on the cluster."""
    import polars as pl

    from embtools.cli.cluster import connect

    lstore = open_store(left, max_memory_gb=max_memory_gb)
    rstore = open_store(right, max_memory_gb=max_memory_gb)
    connect(address)
    from embtools.ray import similarity_join as ray_join

    start = time.perf_counter()
    path = ray_join(lstore, rstore, k, out=out, dimension=dim, where=where,
                    exclude_self=exclude_self, metric=metric, overwrite=overwrite,
                    max_memory_gb=max_memory_gb, progress=sys.stderr.isatty(), nprobe=nprobe)
    elapsed = time.perf_counter() - start
    rows = pl.scan_parquet(str(Path(path) / "*.parquet")).select(pl.len()).collect().item()
    click.echo(f"wrote {rows:,} pairs for {lstore.num_rows:,} rows to {path} in {elapsed:.1f} s "
               "(Ray tasks)")


COMMANDS = [search, join]
