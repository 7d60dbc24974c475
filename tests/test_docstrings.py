"""Every example in the package's docstrings runs and prints what it shows (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import embtools

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(embtools.__path__, "embtools.") if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
