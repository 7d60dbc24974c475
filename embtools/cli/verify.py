"""``embtools verify STORE``: check every data file of a store, page CRCs included.

Exit code 0 when every file is intact, 1 when damage is found (each damaged file is printed with
what is wrong) or the store cannot be opened.

Examples
--------
>>> [c.name for c in COMMANDS]
['verify']
"""

from __future__ import annotations

import sys

import click

from embtools.cli.common import open_store

__all__ = ["COMMANDS"]


@click.command()
@click.argument("store", type=click.Path())
@click.option("--version", "version", type=int, default=None,
              help="Check this version (default: the latest).")
def verify(store: str, version: int | None) -> None:
    """Check every data file of STORE (paths, footers, every page's CRC-32); exit 1 on damage."""
    report = open_store(store, backend="numpy", version=version).verify()
    for path, reason in report.damaged:
        click.echo(f"DAMAGED {path}: {reason}".encode("unicode_escape").decode("ascii"), err=True)
    if report.damaged:
        click.echo(f"{len(report.damaged)} of {report.files_checked} files damaged "
                   f"(version {report.version})", err=True)
        sys.exit(1)
    click.echo(f"ok: {report.files_checked} files checked (version {report.version})")


COMMANDS = [verify]
