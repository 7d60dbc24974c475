"""The embtools test suite (a package: tests import shared helpers as ``tests.helpers``)."""
