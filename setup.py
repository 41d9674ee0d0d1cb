"""Build step for the optional native CPU kernel; all metadata lives in pyproject.toml.

``pip install .`` and ``pip install -e .`` compile ``rmsjax/_native/fused_step.cc`` into
``rmsjax/_native/_fused_step*.so`` with the recipe in ``rmsjax/_native/build.py`` (the same one
:mod:`rmsjax.native` uses for its first-use build). The library is a plain shared library
loaded with ctypes, not a Python extension module; setuptools' extension machinery is only used
to put it in the right place (the wheel, or the source tree for an editable install).

The extension is optional: when there is no C++ compiler, no jaxlib headers in the build
environment, or the compiler fails, setuptools prints a warning and the install goes on without
it (rmsjax then builds the kernel on first use, or runs the pure-JAX path).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent


def _load_recipe() -> ModuleType:
    """rmsjax/_native/build.py, loaded by path: importing the package would import jax."""
    path = HERE / "rmsjax" / "_native" / "build.py"
    spec = importlib.util.spec_from_file_location("_rmsjax_native_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildNativeKernel(build_ext):
    """Compile the kernel with rmsjax's own recipe instead of as a CPython extension."""

    def build_extension(self, ext: Extension) -> None:
        recipe = _load_recipe()
        out = Path(self.get_ext_fullpath(ext.name))
        source = HERE / ext.sources[0]
        print(f"rmsjax: compiling the native CPU kernel into {out}", file=sys.stderr)
        try:
            recipe.compile_kernel(out, source=source, verbose=True)
        except Exception as err:  # anything at all: the install must go on without the kernel
            # CompileError on an optional extension: setuptools warns and skips it.
            raise CompileError(
                f"{err}\n(rmsjax installs without the native kernel; it will try to build it "
                "on first use, else use the pure-JAX path)"
            ) from err


setup(
    ext_modules=[
        Extension(
            "rmsjax._native._fused_step",
            sources=["rmsjax/_native/fused_step.cc"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildNativeKernel},
)
