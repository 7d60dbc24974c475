"""``python -m embtools.cli``: the ``embtools`` command."""

from embtools.cli.app import main

if __name__ == "__main__":
    main()
