"""``embtools import-seed DIR STORE``: convert a directory written by embedding_tools' save_to_disk.

Examples
--------
>>> [c.name for c in COMMANDS]
['import-seed']
"""

from __future__ import annotations

import click

__all__ = ["COMMANDS"]


@click.command("import-seed")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("store", type=click.Path())
def import_seed(directory: str, store: str) -> None:
    """Convert DIRECTORY, written by embedding_tools' save_to_disk (embeddings_<d>d.npy,
    metadata.json, text_ids.txt, labels.txt), into the embtools store STORE (new or empty)."""
    from embtools.cli.common import open_store
    from embtools.errors import InvalidArgumentError
    from embtools.storage.seed_format import read_seed

    seed = read_seed(directory)
    if not seed.arrays:
        raise InvalidArgumentError(f"{directory!r} holds no embeddings to import")
    target = open_store(store, create=True, backend="numpy")
    try:
        if target.num_rows:
            raise InvalidArgumentError(
                f"{store!r} already holds {target.num_rows} rows; import into a new store")
        version = target.add(seed.arrays, text_ids=seed.text_ids, labels=seed.labels,
                             properties={"imported_from": "embedding_tools"})
        rows, dims = target.num_rows, target.dimensions
    finally:
        target.close()
    click.echo(f"Imported {rows} rows of dimensions {dims} into {store} (version {version}).")


COMMANDS = (import_seed,)
