"""The ``>>>`` examples in the docstrings of the public modules run and print what they say.

One test per docstring that has examples (``rmsjax.optimizers.rmsprop``, ...), found with
:mod:`doctest` in every public module (those whose names the docs' API reference covers) and in
the modules that define public objects. The examples are shown in the API reference, so a wrong
one would mislead readers: this keeps them true.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import types

import pytest

import rmsjax

PUBLIC_ROOTS = ["rmsjax", "rmsjax.schedules", "rmsjax.compat.pytorch.lr_scheduler"]


def defining_modules() -> list[types.ModuleType]:
    """The public modules and every rmsjax module that defines an object they export."""
    seen: dict[str, types.ModuleType] = {}
    todo = list(PUBLIC_ROOTS)
    while todo:
        module = importlib.import_module(todo.pop())
        if module.__name__ in seen:
            continue
        seen[module.__name__] = module
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                todo.append(obj.__name__)
                continue
            home = inspect.getmodule(obj)
            if home is not None and home.__name__.startswith("rmsjax"):
                todo.append(home.__name__)
    return sorted(seen.values(), key=lambda m: m.__name__)


def examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    tests = [t for m in defining_modules() for t in finder.find(m) if t.examples]
    return sorted(tests, key=lambda t: t.name)


EXAMPLES = examples()


def test_main_optimizers_have_examples():
    names = {t.name for t in EXAMPLES}
    for fn in (rmsjax.rmsprop, rmsjax.adam, rmsjax.adamw, rmsjax.sgd):
        assert f"{fn.__module__}.{fn.__name__}" in names


@pytest.mark.parametrize("test", EXAMPLES, ids=lambda t: t.name)
def test_docstring_example(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=True)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
