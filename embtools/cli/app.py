"""The ``embtools`` click group: registers the commands and turns user errors into exit code 1.

Errors are handled in one place (:class:`EmbtoolsGroup`): an :class:`~embtools.errors.EmbtoolsError`,
an unreadable file or a polars error becomes ``Error: <one line>`` on stderr and exit code 1.

Examples
--------
>>> from click.testing import CliRunner
>>> CliRunner().invoke(cli, ["hash", "--help"]).exit_code
0
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from embtools import __version__
from embtools.cli import admin, ingest, query, seed
from embtools.cli import index as index_command
from embtools.cli import verify as verify_command
from embtools.cli.common import printable
from embtools.errors import EmbtoolsError

__all__ = ["EmbtoolsGroup", "cli", "main", "one_line"]


def one_line(err: BaseException) -> str:
    """The error's message on one line (newlines collapsed, terminal controls escaped)."""
    text = printable(" ".join(str(err).split()))
    return text or type(err).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EmbtoolsError, OSError]
    if "polars" in sys.modules:
        from polars.exceptions import PolarsError

        errors.append(PolarsError)
    return tuple(errors)


class EmbtoolsGroup(click.Group):
    """A click group whose commands report user errors as one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except Exception as err:
            if not isinstance(err, _user_errors()) or os.environ.get("EMBTOOLS_DEBUG"):
                raise
            raise click.ClickException(one_line(err)) from err


@click.group(cls=EmbtoolsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embtools")
def cli() -> None:
    """embtools: a Parquet-backed embedding store with exact search under a memory cap.

    Start with `embtools demo`, then `embtools ingest`, `embtools search` and `embtools info`.
    """


for _command in (*admin.COMMANDS, *ingest.COMMANDS, *query.COMMANDS, *verify_command.COMMANDS,
                 *seed.COMMANDS, *index_command.COMMANDS):
    cli.add_command(_command)


@cli.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Build the demo store here (default: a temporary directory, removed afterwards).",
)
@click.option("--no-model", is_flag=True, help="Use random vectors instead of the MiniLM model.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=2000,
    show_default=True,
    help="Number of docstrings to embed (an even spread of the corpus); 0 for all (~3,500).",
)
@click.option("--device", default=None, help="Device for the model and the torch backend.")
def demo(directory: str | None, no_model: bool, limit: int | None, device: str | None) -> None:
    """Build a store from Python's standard library docstrings and tour embtools on it.

    Embeds the corpus with the offline all-MiniLM-L6-v2 (when `embtools[embed]` is installed),
    stores dims 64/128/384, then runs text queries, a filtered search, a Matryoshka funnel, a polars
    metadata query, a near-duplicate self-join, a search under a tiny memory cap and an IVF index.
    """
    from embtools.demo import run_demo

    run_demo(directory=directory, use_model=not no_model, limit=limit or None, device=device)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="embtools")
