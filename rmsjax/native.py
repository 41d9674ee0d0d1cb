"""The optional native CPU kernel behind :mod:`rmsjax.fused`: find or build, load, report.

The kernel (``rmsjax/_native/fused_step.cc``) is an XLA FFI handler written in C++, compiled
by one recipe (:mod:`rmsjax._native.build`) against the FFI headers that ship with jaxlib. The
library is looked for, in this order:

1. ``RMSJAX_NATIVE=0`` turns the native path off (the pure-JAX path is used everywhere).
2. **Installed**: ``pip install`` (regular or editable) compiles the kernel when a C++
   compiler is available and puts ``rmsjax/_native/_fused_step.so`` next to this module. A
   failed compile never fails the install, and pip says nothing about it unless run with
   ``-v``; ``python -m rmsjax.native`` tells.
3. **Built on first use**: otherwise (or when the installed library cannot be loaded, was
   built from a different ``fused_step.cc``, or is refused by XLA because it was compiled
   against a newer jaxlib's FFI headers) the first fused step compiles the kernel with
   the same recipe and caches it, keyed by the source, the jaxlib version, the compiler and the
   flags. Without a compiler (or when that build fails too) every fused step runs the pure-JAX
   path and :func:`status` says why.

The kernel needs ``jax.ffi`` (``ffi_call`` with ``vmap_method`` and ``input_output_aliases``,
``register_ffi_target``, ``pycapsule``, ``include_dir``), which JAX has from 0.5.0 on: below
rmsjax's own jax floor (pyproject.toml), so every supported version can use it.

Both builds are portable (no ``-march=native``): the kernel carries a baseline and an AVX2+FMA
version of each loop, and an AVX-512 version (F, BW, DQ, VL, VBMI) of the loops for 8-bit state,
and picks the best the CPU has at run time (``"baseline"``, ``"avx2+fma"``, or
``"avx512+avx2+fma"``: AVX-512 for 8-bit state, AVX2+FMA for the rest); every version gives the
same results on a CPU with FMA. Like XLA's own CPU code, the kernel contracts ``a * b + c`` into
FMA where the CPU has FMA. :func:`status` says which version runs.

Environment variables:

* ``RMSJAX_NATIVE=0`` turns the native path off.
* ``RMSJAX_NATIVE_CACHE=<dir>`` where the first-use build is kept (default
  ``$XDG_CACHE_HOME/rmsjax`` or ``~/.cache/rmsjax``).
* ``CXX`` the compiler to use, at install time and on first use (default ``c++``, then
  ``g++``, then ``clang++``).
* ``RMSJAX_NATIVE_THREADS=<n>`` threads the kernel may use (default: all cores).
* ``RMSJAX_NATIVE_ISA=baseline`` makes the kernel use its baseline loops even where AVX2+FMA
  is available, ``RMSJAX_NATIVE_ISA=avx2`` its AVX2+FMA loops even where AVX-512 is (for
  testing; read once per process).

The kernel's operands (scalars, state slots, flags per kind) are defined once, in
``rmsjax/_native/table.py``; the build turns that table into a C++ header, and a library built
from another table is treated like one built from another source (not loaded).

Check which path is active (and build it if needed) with ``python -m rmsjax.native``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any

from rmsjax._native import build as _recipe

__all__ = ["TARGET", "available", "build", "enabled", "library_path", "reset", "status"]

TARGET = "rmsjax_fused_step"
_DEFAULT_DIR = Path(__file__).with_name("_native")
_NATIVE_DIR = _DEFAULT_DIR
_SOURCE = _recipe.SOURCE
_INSTALLED_STEM = "_fused_step"  # setup.py's extension rmsjax._native._fused_step

_lock = threading.Lock()
_INITIAL = {"tried": False, "ok": False, "why": "not built yet", "path": None}
_state: dict[str, Any] = dict(_INITIAL)


def _cache_dir() -> Path:
    env = os.environ.get("RMSJAX_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rmsjax"


def library_path() -> Path:
    """Where the first-use build for this source, jaxlib, compiler and flags is cached.

    (The library installed with the package, when there is one, is used instead; :func:`status`
    names the library actually loaded.)
    """
    import jaxlib

    cxx = _recipe.find_compiler()
    key = hashlib.sha256()
    for part in (
        _recipe.source_id(_SOURCE).encode() if _SOURCE.exists() else b"",
        jaxlib.__version__.encode(),
        " ".join(cxx or ["none"]).encode(),
        " ".join(_recipe.FLAGS).encode(),
        platform.machine().encode(),
    ):
        key.update(part)
        key.update(b"\0")
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return _cache_dir() / f"fused_step-{key.hexdigest()[:16]}{suffix}"


def build(*, force: bool = False, verbose: bool = False) -> Path:
    """Compile the kernel into the cache (if not there yet) and return the library's path.

    This is the first-use build; it runs the same recipe as ``pip install``
    (:func:`rmsjax._native.build.compile_kernel`). Raises ``RuntimeError`` saying what went
    wrong when there is no compiler, no FFI headers, or the compiler fails.

    Args:
      force: recompile even when a cached library exists.
      verbose: print the compiler command (to stderr); its errors are in the exception.
    """
    import jax

    if not _SOURCE.exists():
        raise RuntimeError(f"the kernel source {_SOURCE} is missing from this installation")
    _recipe.require_compiler()  # before the cache is looked at: no compiler, no build
    out = library_path()
    if out.exists() and not force:
        return out
    return _recipe.compile_kernel(out, include_dir=Path(jax.ffi.include_dir()), verbose=verbose)


def _installed_library() -> Path | None:
    """The library ``pip install`` put next to this module, if any (this interpreter's
    extension suffix first, then any other ``_fused_step*`` library: it has no Python ABI)."""
    suffixes = (".so", ".pyd", ".dll", ".dylib")
    found = sorted(
        p for p in _NATIVE_DIR.glob(_INSTALLED_STEM + "*") if p.suffix in suffixes and p.is_file()
    )
    preferred = _NATIVE_DIR / (_INSTALLED_STEM + (sysconfig.get_config_var("EXT_SUFFIX") or ""))
    if preferred in found:
        return preferred
    return found[0] if found else None


def _register(path: Path) -> ctypes.CDLL:
    """Load the library, check it was built from this ``fused_step.cc``, register the target."""
    import jax

    lib = ctypes.CDLL(str(path))
    source_id = getattr(lib, "RmsjaxSourceId", None)
    if source_id is None:
        raise RuntimeError("it has no RmsjaxSourceId (built from an older fused_step.cc)")
    source_id.restype = ctypes.c_char_p
    built_from = source_id().decode()
    if _SOURCE.exists() and built_from != _recipe.source_id(_SOURCE):
        raise RuntimeError(
            f"it was built from a different fused_step.cc or operand table (id {built_from})"
        )
    # Start the CPU backend first: registering before it exists only queues the handler, and
    # a handler XLA refuses (one compiled against the FFI headers of a newer jaxlib, as a
    # wheel or an isolated sdist build may be) would then fail the backend's start-up and
    # every later JAX call. With the backend up, the refusal raises here and the caller falls
    # back to the first-use build, compiled against this jaxlib's headers.
    jax.devices("cpu")
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.RmsjaxFusedStep), platform="cpu")
    return lib


def _kernel_isa(lib: ctypes.CDLL) -> str:
    fn = lib.RmsjaxKernelIsa
    fn.restype = ctypes.c_char_p
    return fn().decode()


def enabled() -> bool:
    """False when ``RMSJAX_NATIVE=0`` (or ``false``/``no``/``off``) turns the native path off
    on purpose; then :func:`available` is False too, and nothing is built or loaded."""
    return os.environ.get("RMSJAX_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _load() -> None:
    if not enabled():
        _state.update(ok=False, why="disabled by RMSJAX_NATIVE=0")
        return
    note = ""
    installed = _installed_library()
    if installed is not None:
        try:
            lib = _register(installed)
        except Exception as err:  # a broken or stale installed library: try the first-use build
            note = f"; the installed {installed} was not used: {type(err).__name__}: {err}"
        else:
            _state.update(ok=True, how="installed", path=str(installed), lib=lib, note="")
            return
    try:
        path = build()
        lib = _register(path)
    except Exception as err:  # any failure means: stay on the pure-JAX path, and say why
        _state.update(ok=False, why=f"{type(err).__name__}: {err}{note}")
        return
    _state.update(ok=True, how="built on first use", path=str(path), lib=lib, note=note)


def reset(installed_dir: Path | str | None = None) -> None:
    """Forget the outcome of the last look-up, so the next :func:`available` looks again.

    For tests of the look-up order: ``installed_dir`` replaces the folder searched for an
    installed library (default: ``rmsjax/_native``). A library already loaded stays loaded
    (and registered with jax) in this process.
    """
    global _NATIVE_DIR
    with _lock:
        _NATIVE_DIR = Path(installed_dir) if installed_dir is not None else _DEFAULT_DIR
        _state.clear()
        _state.update(_INITIAL)


def available() -> bool:
    """True when the native CPU kernel is loaded and registered (building it now if needed).

    Uses the library installed with the package when there is one; otherwise the first call
    may take several seconds (compilation), and later calls and processes reuse the cached
    library. ``False`` means every fused step runs the pure-JAX path; :func:`status` says why.
    """
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _load()
        return bool(_state["ok"])


def status() -> str:
    """Which native library is active and how it got there, or why the path is off (one line,
    plus the compiler's output when a build failed).

    ``"native (installed): <path> [avx2+fma kernels]"``, ``"native (built on first use):
    <path> [...]"`` (followed by why an installed library was not used, if there was one), or
    ``"pure-JAX only: <reason>"``.
    """
    if not available():
        return f"pure-JAX only: {_state['why']}"
    isa = _kernel_isa(_state["lib"])
    return f"native ({_state['how']}): {_state['path']} [{isa} kernels]{_state['note']}"


if __name__ == "__main__":
    print(status())
    sys.exit(0 if available() else 1)
