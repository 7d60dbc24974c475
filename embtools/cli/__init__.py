"""The ``embtools`` command line: store administration, ingestion, search, joins and the demo.

Every command has ``--help``. Exit codes: 0 on success, 1 on a user error (a one-line message on
stderr, no traceback; set ``EMBTOOLS_DEBUG=1`` for the traceback), 2 on a usage error.

Examples
--------
>>> from click.testing import CliRunner
>>> CliRunner().invoke(cli, ["--help"]).exit_code
0
"""

from __future__ import annotations

from embtools.cli.app import cli, main

__all__ = ["cli", "main"]
