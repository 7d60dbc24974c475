"""Index commands: ``index`` (build, optimise or drop an IVF index).

Examples
--------
>>> [c.name for c in COMMANDS]
['index']
"""

from __future__ import annotations

import time

import click

from embtools.cli.common import open_store

__all__ = ["COMMANDS"]


def _codes(value: str) -> str | int:
    return int(value) if value.isdigit() else value


@click.command()
@click.argument("store", type=click.Path())
@click.option("--dim", type=int, default=None, help="Dimension to index (default: the largest stored).")
@click.option("--partitions", type=int, default=None, help="IVF partitions (default: about 4*sqrt(rows)).")
@click.option("--codes", default="int8", show_default=True,
              help="Probe codes: int8, binary, float, or a Matryoshka prefix dimension such as 64.")
@click.option("--metric", type=click.Choice(["cosine", "dot", "l2"]), default="cosine", show_default=True)
@click.option("--sample-rows", type=int, default=None, help="Training rows (default: 64 per partition, >= 100,000).")
@click.option("--soar-lambda", type=float, default=None,
              help="Also write each row to a second partition chosen by SOAR (1.0 is a good start).")
@click.option("--optimize", is_flag=True, help="Index the rows added since the build (or rebuild).")
@click.option("--drop", is_flag=True, help="Remove the index of --dim and --metric.")
@click.option("--backend", default=None, help="Compute backend: numpy, torch or mlx (default: auto).")
@click.option("--device", default=None, help="Device for the backend.")
@click.option("--max-memory-gb", type=float, default=None, help="Cap on embedding bytes held at once.")
def index(store: str, dim: int | None, partitions: int | None, codes: str, metric: str,
          sample_rows: int | None, soar_lambda: float | None, optimize: bool, drop: bool,
          backend: str | None, device: str | None, max_memory_gb: float | None) -> None:
    """Build an IVF index over STORE (a new version); searches then probe it (--nprobe)."""
    if optimize and drop:
        raise click.UsageError("give --optimize or --drop, not both")
    s = open_store(store, backend=backend, device=device, max_memory_gb=max_memory_gb)
    start = time.perf_counter()
    if drop:
        version = s.drop_index(dim, None if dim is None and metric == "cosine" else metric)
        click.echo(f"dropped; version {version}")
        return
    if optimize:
        version = s.optimize_index(dim, None if dim is None else metric)
    else:
        d = dim if dim is not None else (max(s.dimensions) if s.dimensions else 384)
        version = s.create_index(dimension=d, partitions=partitions, codes=_codes(codes),
                                 sample_rows=sample_rows, metric=metric, soar_lambda=soar_lambda)
    for info in s.indexes():
        soar = "" if info["soar_lambda"] is None else f", SOAR lambda {info['soar_lambda']:g}"
        click.echo(f"index {info['name']}: {info['partitions']} partitions, codes {info['codes']}{soar}, "
                   f"{info['indexed_rows']:,} rows indexed, {info['unindexed_rows']:,} searched exactly")
    click.echo(f"version {version} ({time.perf_counter() - start:.1f} s)")


COMMANDS = [index]
