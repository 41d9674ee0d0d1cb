"""Sphinx extension: every public name must be in the API reference.

The public names are the entries of ``__all__`` of the modules in the ``api_coverage_modules``
setting and, recursively, of every submodule that such an ``__all__`` names (``rmsjax.compat``
names ``pytorch``, ``keras`` and ``tf1``). After all pages are read, each public name
``<module>.<name>`` must have been documented under exactly that path (``.. autofunction::
rmsjax.scale_by_rms``, an ``automodule``, a ``py:function`` entry, ...); every missing one is a
warning, which ``-W`` turns into a failed build. Objects documented through an internal path
(``rmsjax.transforms.scale_by_rms``: the internal modules are not public) are warnings too.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


def public_names(roots: list[str]) -> tuple[set[str], set[str]]:
    """(the dotted path of every public name, the public modules), from ``__all__``."""
    names: set[str] = set()
    modules: set[str] = set()
    todo = list(roots)
    while todo:
        modname = todo.pop()
        if modname in modules:
            continue
        modules.add(modname)
        module = importlib.import_module(modname)
        exported = getattr(module, "__all__", None)
        if exported is None:
            logger.warning("api_coverage: public module %s has no __all__", modname)
            continue
        for name in exported:
            names.add(f"{modname}.{name}")
            if isinstance(getattr(module, name, None), types.ModuleType):
                todo.append(f"{modname}.{name}")
    return names, modules


def check_coverage(app: Sphinx, env: Any) -> None:
    expected, modules = public_names(list(app.config.api_coverage_modules))
    # Aliases (autodoc's ``:canonical:`` entries for a class's defining module) are not
    # documentation of their own.
    objects = env.get_domain("py").objects
    documented = {name for name, entry in objects.items() if not entry.aliased}
    for name in sorted(expected - documented):
        logger.warning(
            "api_coverage: public name %s (in __all__) is not in the API reference; add it to "
            "the page of its module under docs/api/",
            name,
        )
    for name in sorted(documented):
        owner = max((m for m in modules if name.startswith(m + ".")), key=len, default=None)
        if name in modules or owner is None:
            continue  # a public module itself, or outside rmsjax (an optax canonical name)
        top = f"{owner}.{name[len(owner) + 1 :].split('.')[0]}"
        if top not in expected:
            logger.warning(
                "api_coverage: %s is documented but is not a public name (not in %s.__all__); "
                "document names through their public path",
                name,
                owner,
            )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("api_coverage_modules", [], "env")
    app.connect("env-check-consistency", check_coverage)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
