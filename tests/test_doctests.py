"""Every docstring example in the package runs: doctest over each module of ``edgepack`` and
``runtime_shim`` (examples that need real files or hardware say ``# doctest: +SKIP``). A module whose
docstrings doctest cannot even parse fails here too."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import edgepack
import runtime_shim


def _modules() -> list[str]:
    names = []
    for pkg in (edgepack, runtime_shim):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if info.name.rsplit(".", 1)[-1] != "__main__":  # importing it runs the command line
                names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_the_package_has_docstring_examples():
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name)))
    assert examples > 100, examples


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False,
                             verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (run " \
                               f"python -m doctest -v on the module to see which)"
