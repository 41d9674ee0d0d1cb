"""Build step for the optional native CPU kernel; all metadata lives in pyproject.toml.

``pip install .`` and ``pip install -e .`` compile ``rmsjax/_native/fused_step.cc`` into
``rmsjax/_native/_fused_step.so`` with the recipe in ``rmsjax/_native/build.py`` (the same one
:mod:`rmsjax.native` uses for its first-use build). The library is a plain shared library
loaded with ctypes, not a Python extension module: it has no Python ABI, so its file name
carries none and a wheel holding it is tagged ``py3-none-<platform>`` (``auditwheel repair``
turns ``linux_x86_64`` into a ``manylinux`` tag). setuptools' extension machinery is only used to
put it in the right place (the wheel, or the source tree for an editable install).

The extension is optional: when there is no C++ compiler, no jaxlib headers in the build
environment, or the compiler fails, setuptools prints a warning (which pip shows only with
``-v``) and the install goes on without it; the wheel is then pure Python, ``py3-none-any``
(rmsjax builds the kernel on first use, or runs the pure-JAX path).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent
KERNEL = "rmsjax._native._fused_step"


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

    def get_ext_filename(self, fullname: str) -> str:
        # No interpreter suffix (.cpython-311-x86_64-linux-gnu): the library has no Python ABI.
        return str(Path(*fullname.split("."))) + ".so"

    def build_extension(self, ext: Extension) -> None:
        recipe = _load_recipe()
        out = Path(self.get_ext_fullpath(ext.name))
        # A library left in the build folder by an earlier build must not reach this wheel
        # when this compile fails.
        out.unlink(missing_ok=True)
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


class HonestWheel(bdist_wheel):
    """Tag the wheel by what it holds: ``py3-none-<platform>`` with the compiled kernel,
    ``py3-none-any`` (a pure-Python wheel) when the optional compile did not happen."""

    def run(self) -> None:
        # Build first, as bdist_wheel.run would, to know whether the kernel was compiled before
        # bdist_wheel lays the wheel out as purelib or platlib; then skip its own build, which
        # would compile the kernel a second time.
        if not self.skip_build:
            build_scripts = self.reinitialize_command("build_scripts")
            build_scripts.executable, build_scripts.force = "python", True
            self.reinitialize_command("build_ext").inplace = False
            self.run_command("build")
            self.skip_build = True
        built = Path(self.get_finalized_command("build_ext").get_ext_fullpath(KERNEL))
        self.root_is_pure = not built.is_file()
        if self.root_is_pure:
            # Without the kernel the distribution has no extension: install then lays the
            # package out as purelib, matching the wheel's root.
            self.distribution.ext_modules = []
        super().run()

    def get_tag(self) -> tuple[str, str, str]:
        if self.root_is_pure:
            return ("py3", "none", "any")
        return ("py3", "none", super().get_tag()[2])


setup(
    ext_modules=[Extension(KERNEL, sources=["rmsjax/_native/fused_step.cc"], optional=True)],
    cmdclass={"build_ext": BuildNativeKernel, "bdist_wheel": HonestWheel},
)
