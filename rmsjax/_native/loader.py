"""Finding, building, loading and registering the kernel's library: the mechanism behind
:mod:`rmsjax.native`, which re-exports the public functions and documents the look-up order and
the environment variables.

One process looks the library up once (under a lock, at the first :func:`available`): the
library installed next to this file, else the first-use build in the cache; the outcome, and
why, stays until :func:`reset`. jax is imported only when a library is built or registered.
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

from rmsjax._native import build as recipe

__all__ = [
    "TARGET",
    "available",
    "build",
    "enabled",
    "library_path",
    "reset",
    "status",
]

# The name the kernel is registered under with XLA, and called by (rmsjax._native.call).
TARGET = "rmsjax_fused_step"
_DEFAULT_DIR = Path(__file__).parent
_INSTALLED_STEM = "_fused_step"  # setup.py's extension rmsjax._native._fused_step

_lock = threading.Lock()
_INITIAL = {"tried": False, "ok": False, "why": "not built yet", "path": None}
_state: dict[str, Any] = dict(_INITIAL)
_installed_dir = _DEFAULT_DIR


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

    cxx = recipe.find_compiler()
    key = hashlib.sha256()
    for part in (
        recipe.source_id(recipe.SOURCE).encode() if recipe.SOURCE.exists() else b"",
        jaxlib.__version__.encode(),
        " ".join(cxx or ["none"]).encode(),
        " ".join(recipe.FLAGS).encode(),
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

    if not recipe.SOURCE.exists():
        raise RuntimeError(f"the kernel source {recipe.SOURCE} is missing from this installation")
    recipe.require_compiler()  # before the cache is looked at: no compiler, no build
    out = library_path()
    if out.exists() and not force:
        return out
    return recipe.compile_kernel(out, include_dir=Path(jax.ffi.include_dir()), verbose=verbose)


def _installed_library(folder: Path) -> Path | None:
    """The library ``pip install`` put into ``folder``, if any (this interpreter's extension
    suffix first, then any other ``_fused_step*`` library: it has no Python ABI)."""
    suffixes = (".so", ".pyd", ".dll", ".dylib")
    found = sorted(
        p for p in folder.glob(_INSTALLED_STEM + "*") if p.suffix in suffixes and p.is_file()
    )
    preferred = folder / (_INSTALLED_STEM + (sysconfig.get_config_var("EXT_SUFFIX") or ""))
    if preferred in found:
        return preferred
    return found[0] if found else None


def _register(path: Path) -> ctypes.CDLL:
    """Load the library at ``path``, check it was built from this ``fused_step.cc`` and operand
    table, and register its handler with XLA as :data:`TARGET`.

    Raises:
      RuntimeError: the library is not this source's (its ``RmsjaxSourceId`` differs or is
        missing).
      OSError: the file is not a loadable library. XLA's own error when it refuses the handler
        (one compiled against a newer jaxlib's FFI headers).
    """
    import jax

    lib = ctypes.CDLL(str(path))
    source_id = getattr(lib, "RmsjaxSourceId", None)
    if source_id is None:
        raise RuntimeError("it has no RmsjaxSourceId (built from an older fused_step.cc)")
    source_id.restype = ctypes.c_char_p
    built_from = source_id().decode()
    if recipe.SOURCE.exists() and built_from != recipe.source_id(recipe.SOURCE):
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
    installed = _installed_library(_installed_dir)
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
    global _installed_dir
    with _lock:
        _installed_dir = Path(installed_dir) if installed_dir is not None else _DEFAULT_DIR
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
