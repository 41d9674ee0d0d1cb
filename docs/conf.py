"""Sphinx configuration of the rmsjax documentation.

Build (from the repository root, with the ``docs`` extra installed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

``-W`` turns every warning into an error, and the ``api_coverage`` extension (docs/_ext) warns
about every public name (an entry of a public module's ``__all__``) that the API reference does
not document, so an undocumented name fails the build.
"""

import os
import re
import sys

import rmsjax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))

project = "rmsjax"
author = "rmsjax developers"
copyright = "rmsjax developers"
version = release = rmsjax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # A copy of MathJax 3 in _static/mathjax (no CDN): the math renders offline.
    "sphinx-mathjax-offline",
    "sphinx.ext.doctest",
    "myst_parser",
    "api_coverage",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Docstrings are Google style (Args:, Returns:, Raises:) with reST math.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# Not preserve_defaults: the fused factories carry a computed __signature__ (rmsjax.fused.fuse)
# whose defaults are not in their source, which that option reads.
# Type aliases shown by name instead of expanded into long unions.
autodoc_type_aliases = {
    "ScalarOrSchedule": "ScalarOrSchedule",
    "T.ScalarOrSchedule": "ScalarOrSchedule",
    "Schedule": "Schedule",
    "T.Schedule": "Schedule",
}

# Markdown pages: $...$ math, ::: fences, heading anchors for links between pages.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# The public modules whose ``__all__`` must be documented (api_coverage): submodules named in
# an ``__all__`` (rmsjax.compat.pytorch, ...) are followed from these; list a public module
# that no ``__all__`` names (imported as ``from rmsjax.compat.pytorch import lr_scheduler``).
api_coverage_modules = [
    "rmsjax",
    "rmsjax.schedules",
    "rmsjax.compat.pytorch.lr_scheduler",
    "rmsjax.fused.nnx",
]

html_theme = "furo"
html_title = f"rmsjax {release}"
html_static_path: list[str] = []

# autodoc prints jax's ArrayLike and DTypeLike expanded into long unions; show their names.
# (Sphinx also prints an aliased name inside a union as TypeAliasForwardRef('name').)
_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([^']+)'\)")
_DTYPE_LIKE = re.compile(
    r"str \| type\[~?typing\.Any\] \| ~?numpy\.dtype \| ~?jax\.\S*SupportsDType"
)
_ARRAY_LIKE = re.compile(
    r"~?jax(?:\.jaxlib\._jax)?\.Array \| ~?numpy\.ndarray \| ~?numpy\.bool \| ~?numpy\.number"
    r" \| bool \| int \| float \| complex"
)


def _short_array_like(app, what, name, obj, options, signature, return_annotation):
    if signature is None:
        return None

    def shorten(text):
        for pattern, short in ((_ARRAY_LIKE, "ArrayLike"), (_DTYPE_LIKE, "DTypeLike")):
            text = text and pattern.sub(short, text)
        return text and _FORWARD_REF.sub(r"\1", text)

    return shorten(signature), shorten(return_annotation)


def setup(app):
    app.connect("autodoc-process-signature", _short_array_like)
