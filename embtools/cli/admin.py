"""Store administration commands: ``info``, ``delete``, ``compact``, ``vacuum``, ``quantize``,
``hash``, ``validate``.

Examples
--------
>>> [c.name for c in COMMANDS]
['info', 'delete', 'compact', 'vacuum', 'quantize', 'hash', 'validate']
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from embtools.cli.common import open_store, out_console, split_names, table_cell
from embtools.errors import InvalidArgumentError

__all__ = ["COMMANDS", "load_config_file", "quantized_summary", "store_summary"]


def _file_path(store_path: Path, name: Any) -> Path:
    p = Path(os.fspath(name))
    return p if p.is_absolute() else store_path / p


def store_summary(store: Any, path: str) -> dict[str, Any]:
    """What ``embtools info`` reports, as a JSON-ready dict."""
    files = [str(f) for f in store.files()]
    manifest = getattr(store.source, "manifest", None)
    sizes = ([f.bytes for f in manifest.files] if manifest is not None
             else [_file_path(Path(path), f).stat().st_size for f in files])
    schema = store.metadata().collect_schema()
    props = dict(store.properties or {})
    return {
        "path": str(path),
        "version": int(store.version),
        "versions": [int(v) for v in store.versions()],
        "rows": int(store.num_rows),
        "dimensions": [int(d) for d in store.dimensions],
        "files": len(files),
        "bytes": int(sum(sizes)),
        "schema": {name: str(dtype) for name, dtype in schema.items()},
        "properties": props,
        "embedding_model": (props.get("embedding_model") or {}).get("name"),
        "config_hash": str(store.config_hash),
        "indexes": store.indexes(),
        "quantized": quantized_summary(store, Path(path), files),
    }


def _index_line(info: dict[str, Any]) -> str:
    """One index as ``embtools info`` shows it: partitions, codes, and the rows it covers."""
    held, outside = info["indexed_rows"], info["unindexed_rows"]
    if held is None:
        return f"{info['partitions']} partitions, codes {info['codes']} (does not fit the memory cap)"
    share = held / max(1, held + outside)
    soar = "" if info.get("soar_lambda") is None else f", SOAR lambda {info['soar_lambda']:g}"
    return (f"{info['partitions']} partitions, codes {info['codes']}{soar}; covers {held:,} rows "
            f"({share:.0%}), {outside:,} added since are searched exactly")


def quantized_summary(store: Any, root: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """Per quantized column: its kind, dimension and bytes on disk (``{}`` when none)."""
    import pyarrow.parquet as pq

    from embtools.storage.quantspec import code_column

    out: dict[str, dict[str, Any]] = {}
    for dim, kinds in store.quantized.items():
        for kind in kinds:
            out[code_column(dim, kind)] = {"dimension": int(dim), "kind": kind, "bytes": 0}
    if not out:
        return out
    for f in files:
        if "://" in str(f):  # a store on object storage: sizes not read here
            for q in out.values():
                q["bytes"] = None
            return out
        md = pq.read_metadata(_file_path(root, f))
        for g in range(md.num_row_groups):
            group = md.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                if col.path_in_schema in out:
                    out[col.path_in_schema]["bytes"] += int(col.total_compressed_size)
    return out


@click.command()
@click.argument("store", type=click.Path())
@click.option(
    "--version", "version", type=int, default=None, help="Show this version (default: latest)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(store: str, version: int | None, as_json: bool) -> None:
    """Show a store's versions, rows, dimensions, files and bytes, schema and config hash."""
    from rich.table import Table

    from embtools.memory import format_bytes

    summary = store_summary(open_store(store, backend="numpy", version=version), store)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    table = Table(title=table_cell(f"embtools store {store}"), show_header=False)
    rows = [
        ("version", f"{summary['version']} (of {len(summary['versions'])} versions)"),
        ("rows", f"{summary['rows']:,}"),
        ("dimensions", ", ".join(map(str, summary["dimensions"])) or "-"),
        ("files", f"{summary['files']} ({format_bytes(summary['bytes'])})"),
        ("schema", ", ".join(f"{k}: {v}" for k, v in summary["schema"].items())),
        ("embedding model", str(summary["embedding_model"] or "- (vectors added directly)")),
        ("quantized", ", ".join(
            f"{name} ({'?' if q['bytes'] is None else format_bytes(q['bytes'])})"
            for name, q in summary["quantized"].items()) or "-"),
        ("config hash", summary["config_hash"]),
        *((f"index {i['name']}", _index_line(i)) for i in summary["indexes"]),
    ]
    for name, value in rows:  # names and properties come from the store: escaped, never markup
        table.add_row(name, table_cell(value))
    out_console().print(table)


@click.command()
@click.argument("store", type=click.Path())
@click.option(
    "--where", required=True, help="SQL predicate on the metadata, e.g. \"label = 'spam'\"."
)
def delete(store: str, where: str) -> None:
    """Delete the rows matching --where (a new version; vacuum reclaims the space)."""
    s = open_store(store, backend="numpy")
    before = s.num_rows
    version = s.delete(where)
    after = open_store(store, backend="numpy").num_rows
    click.echo(f"deleted {before - after:,} rows ({after:,} left); version {version}")


@click.command()
@click.argument("store", type=click.Path())
def compact(store: str) -> None:
    """Rewrite the store's data files into fewer, larger ones (a new version)."""
    s = open_store(store, backend="numpy")
    before = len(s.files())
    version = s.compact()
    after = len(open_store(store, backend="numpy").files())
    click.echo(f"compacted {before} files into {after}; version {version}")


@click.command()
@click.argument("store", type=click.Path())
@click.option("--grace-seconds", type=float, default=3600.0, show_default=True,
              help="Keep unreferenced files younger than this (a running writer's uploads).")
def vacuum(store: str, grace_seconds: float) -> None:
    """Delete files that no version needs any more (unfinished writes, old versions' files)."""
    s = open_store(store, backend="numpy")
    result = s.vacuum(grace_seconds=grace_seconds)
    versions, files = len(result.get("versions", [])), len(result.get("files", []))
    click.echo(
        f"removed {versions} old versions and {files} unreferenced files; version {s.version}"
    )


@click.command()
@click.argument("store", type=click.Path())
@click.option("--dim", "dim", type=int, required=True, help="The stored dimension to quantize.")
@click.option(
    "--kinds", default="int8,binary", show_default=True,
    help="Comma-separated kinds: int8 (1 byte a dimension), binary (1 bit a dimension).",
)
@click.option(
    "--sample-rows", type=int, default=100_000, show_default=True,
    help="Rows sampled for the int8 ranges.",
)
def quantize(store: str, dim: int, kinds: str, sample_rows: int) -> None:
    """Add quantized columns (emb_<dim>_i8, emb_<dim>_b1) for every row (a new version)."""
    from embtools.memory import format_bytes

    s = open_store(store, backend="numpy")
    version = s.quantize(dim, kinds=split_names(kinds), sample_rows=sample_rows)
    s = open_store(store, backend="numpy")
    sizes = quantized_summary(s, Path(store), [str(f) for f in s.files()])
    listed = ", ".join(f"{n} ({format_bytes(q['bytes'])})" for n, q in sizes.items()
                       if q["dimension"] == dim)
    click.echo(f"quantized dimension {dim} of {s.num_rows:,} rows: {listed}; version {version}")


def load_config_file(path: Path) -> Any:
    """Parse a JSON or TOML configuration file (TOML needs Python 3.11+ or ``tomli``)."""
    suffix = path.suffix.lower()
    try:
        return _load_config(path, suffix)
    except UnicodeDecodeError as err:
        raise InvalidArgumentError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise InvalidArgumentError(f"{path} is nested too deeply") from None


def _load_config(path: Path, suffix: str) -> Any:
    if suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise InvalidArgumentError(f"{path} is not valid JSON: {err}") from None
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise InvalidArgumentError(
                    "reading TOML needs Python 3.11+ or the tomli package (pip install tomli)"
                ) from None
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise InvalidArgumentError(f"{path} is not valid TOML: {err}") from None
    raise InvalidArgumentError(f"{path}: expected a .json or .toml file")


@click.command(name="hash")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def hash_command(config: Path) -> None:
    """Print the 16-hex-digit config hash of a JSON or TOML configuration file."""
    from embtools.config import compute_config_hash

    try:
        value = compute_config_hash(load_config_file(config))
    except TypeError as err:
        raise InvalidArgumentError(str(err)) from None
    except RecursionError:
        raise InvalidArgumentError(f"{config} is nested too deeply to hash") from None
    click.echo(value)


@click.command()
def validate() -> None:
    """Check the installation: imports, each backend, a store round trip, config hashing."""
    from embtools.validate import main as validate_main

    raise SystemExit(validate_main([]))


COMMANDS = [info, delete, compact, vacuum, quantize, hash_command, validate]
