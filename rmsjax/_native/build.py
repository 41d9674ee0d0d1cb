"""The one compile recipe for the native kernel, shared by ``setup.py`` and :mod:`rmsjax.native`.

``setup.py`` runs it at ``pip install`` time (loading this file by path, so that neither jax nor
the ``rmsjax`` package is imported in the build environment), and :mod:`rmsjax.native` runs it
on first use when no library was installed with the package. Standard library only, on purpose.

The library is portable across x86-64 CPUs: it is compiled without ``-march=native`` (a wheel
built here may run elsewhere) and the kernel source compiles every loop twice, for the baseline
instruction set and for AVX2+FMA (and the loops for 8-bit state a third time, for AVX-512),
choosing at run time.

The kernel's operands are defined by the table in ``table.py`` (next to this file); before
compiling, the recipe writes that table as the C++ header ``rmsjax_kernel_table.h`` into a
temporary folder on the include path (``python build.py --header`` prints it), and the header
is part of the library's source id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

__all__ = [
    "FLAGS",
    "HEADER_NAME",
    "SOURCE",
    "BuildError",
    "compile_kernel",
    "compiler_command",
    "ffi_include_dir",
    "find_compiler",
    "header",
    "require_compiler",
    "source_id",
]

SOURCE = Path(__file__).with_name("fused_step.cc")
HEADER_NAME = "rmsjax_kernel_table.h"


def _load_table() -> ModuleType:
    """``table.py`` from this folder: imported normally inside the package, else (setup.py, or
    this file run as a script) loaded by path, so that the ``rmsjax`` package (and jax) is
    never imported by a build."""
    if __package__:
        from rmsjax._native import table as module

        return module
    path = Path(__file__).with_name("table.py")
    spec = importlib.util.spec_from_file_location("_rmsjax_native_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # NamedTuple needs its module while defined
    spec.loader.exec_module(module)
    return module


_table = _load_table()

# GCC/Clang flags. No -march: the source selects AVX2+FMA (and, for 8-bit state, AVX-512) loops
# at run time where the CPU has them. -ffp-contract=off: the compiler fuses no multiply-add on
# its own; the kernel writes each fused multiply-add where XLA's CPU code has one (its Arith, an
# FMA instruction in the AVX2 and AVX-512 loops, a rounded product and sum in the baseline loops,
# as XLA on a CPU without FMA), so GCC and Clang round alike, as the pure-JAX path on the same
# CPU. -fno-math-errno lets sqrt vectorise (it cannot set errno); neither it nor
# -fno-trapping-math changes any result.
FLAGS: tuple[str, ...] = (
    "-O3",
    "-std=c++17",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-shared",
    "-fPIC",
    "-pthread",
    "-w",
)


class BuildError(RuntimeError):
    """The kernel could not be compiled; the message says why (no compiler, no headers, ...)."""


def find_compiler() -> list[str] | None:
    """The C++ compiler command: ``$CXX`` (may carry arguments, e.g. ``ccache g++``), else the
    first of ``c++``, ``g++``, ``clang++`` on ``PATH``; ``None`` when there is none."""
    env = os.environ.get("CXX", "").strip()
    if env:
        parts = shlex.split(env)
        found = shutil.which(parts[0])
        return [found, *parts[1:]] if found else None
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def require_compiler() -> list[str]:
    """:func:`find_compiler`, raising :class:`BuildError` with what was tried when none is found."""
    cxx = find_compiler()
    if cxx is None:
        env = os.environ.get("CXX", "").strip()
        tried = f"$CXX={env!r} is not an executable" if env else "tried c++, g++, clang++"
        raise BuildError(
            f"no C++ compiler found ({tried}); install one (e.g. g++) to enable the native CPU path"
        )
    return cxx


def ffi_include_dir() -> Path | None:
    """The XLA FFI headers shipped inside the jaxlib wheel (what ``jax.ffi.include_dir()``
    returns), found without importing jax or jaxlib; ``None`` when jaxlib is not installed or
    lacks them."""
    try:
        spec = importlib.util.find_spec("jaxlib")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        include = Path(location) / "include"
        if (include / "xla" / "ffi" / "api" / "ffi.h").is_file():
            return include
    return None


def header() -> str:
    """The generated C++ header ``rmsjax_kernel_table.h`` (the operand table, see ``table.py``)."""
    text: str = _table.cpp_header()
    return text


def source_id(source: Path = SOURCE) -> str:
    """A short hash of the kernel source and the generated table header; compiled into the
    library (``RmsjaxSourceId``) so a library built from another version of either can be
    recognised and skipped."""
    digest = hashlib.sha256(source.read_bytes() + b"\0" + header().encode())
    return digest.hexdigest()[:16]


def compiler_command(
    cxx: list[str],
    include_dir: Path,
    out: Path | str,
    source: Path = SOURCE,
    *,
    header_dir: Path | str,
) -> list[str]:
    """The full command line that compiles ``source`` into the shared library ``out``;
    ``header_dir`` holds the generated :func:`header` as ``rmsjax_kernel_table.h``."""
    return [
        *cxx,
        *FLAGS,
        f"-DRMSJAX_SOURCE_ID={source_id(source)}",
        f"-I{header_dir}",
        f"-I{include_dir}",
        str(source),
        "-o",
        str(out),
    ]


def compile_kernel(
    out: Path | str,
    *,
    include_dir: Path | None = None,
    source: Path = SOURCE,
    verbose: bool = False,
) -> Path:
    """Compile the kernel into the shared library ``out`` and return its path.

    The library is written under a private name and renamed into place, so concurrent builds
    and readers never see a partial file.

    Args:
      out: the library to write (its folder is created if needed).
      include_dir: the XLA FFI headers; default :func:`ffi_include_dir`.
      source: the kernel source; default the ``fused_step.cc`` next to this file.
      verbose: print the compiler command to stderr.

    Raises:
      BuildError: no C++ compiler, no FFI headers, missing source, or the compiler failed (the
        message carries the end of its output).
    """
    out = Path(out)
    if not source.is_file():
        raise BuildError(f"the kernel source {source} is missing from this installation")
    cxx = require_compiler()
    include = include_dir if include_dir is not None else ffi_include_dir()
    if include is None or not (Path(include) / "xla" / "ffi" / "api" / "ffi.h").is_file():
        raise BuildError(
            "the XLA FFI headers were not found (they ship with jaxlib, in <jaxlib>/include); "
            "install jaxlib to build the native CPU path"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    generated = tempfile.mkdtemp(prefix="rmsjax-table-")
    Path(generated, HEADER_NAME).write_text(header())
    cmd = compiler_command(cxx, Path(include), tmp, source, header_dir=generated)
    if verbose:
        print("rmsjax: " + shlex.join(cmd), file=sys.stderr)
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            raise BuildError(f"could not run the C++ compiler {cxx[0]}: {err}") from err
        if proc.returncode != 0:
            output = (proc.stderr + proc.stdout).strip()
            raise BuildError(
                f"compiling the native kernel failed ({shlex.join(cxx)} exited with status "
                f"{proc.returncode}):\n" + (output[-2000:] or "(the compiler printed nothing)")
            )
        if os.path.getsize(tmp) == 0:
            raise BuildError(f"the C++ compiler {cxx[0]} exited 0 but wrote no library")
        os.chmod(tmp, 0o755)  # mkstemp made it private; installed libraries must be readable
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        shutil.rmtree(generated, ignore_errors=True)
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["--header"]:
        sys.exit("usage: python rmsjax/_native/build.py --header   (print the generated header)")
    print(header(), end="")
