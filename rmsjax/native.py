"""The optional native CPU kernel behind :mod:`rmsjax.fused`: build, load, report.

The kernel (``rmsjax/_native/fused_step.cc``) is an XLA FFI handler written in C++. It is
compiled on first use, with the system C++ compiler, against the FFI headers that ship with
jaxlib (``jax.ffi.include_dir()``), and cached as a shared library keyed by the source, the
jaxlib version, the compiler and the CPU. Nothing is compiled at ``pip install`` time, so
installing rmsjax never needs a compiler; without one (or when the build fails) every fused
step runs the pure-JAX path and :func:`available` says why the native path is off.

Environment variables:

* ``RMSJAX_NATIVE=0`` turns the native path off (the pure-JAX path is used everywhere).
* ``RMSJAX_NATIVE_CACHE=<dir>`` where the compiled library is kept (default
  ``$XDG_CACHE_HOME/rmsjax`` or ``~/.cache/rmsjax``).
* ``CXX`` the compiler to use (default ``c++``, then ``g++``, then ``clang++``).
* ``RMSJAX_NATIVE_THREADS=<n>`` threads the kernel may use (default: all cores).

Build ahead of time, and check the status, with ``python -m rmsjax.native``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

__all__ = ["TARGET", "available", "build", "library_path", "status"]

TARGET = "rmsjax_fused_step"
_SOURCE = Path(__file__).with_name("_native") / "fused_step.cc"
_FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    "-w",
)

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "why": "not built yet", "path": None}


def _compiler() -> str | None:
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env) or None
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cache_dir() -> Path:
    env = os.environ.get("RMSJAX_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rmsjax"


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def library_path() -> Path:
    """Where the compiled kernel for this source, jaxlib, compiler and CPU is cached."""
    import jaxlib

    key = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes() if _SOURCE.exists() else b"",
        jaxlib.__version__.encode(),
        str(_compiler()).encode(),
        " ".join(_FLAGS).encode(),
        _cpu_tag().encode(),
        platform.machine().encode(),
    ):
        key.update(part)
        key.update(b"\0")
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return _cache_dir() / f"fused_step-{key.hexdigest()[:16]}{suffix}"


def build(*, force: bool = False, verbose: bool = False) -> Path:
    """Compile the kernel into the cache (if not there yet) and return the library's path.

    Raises ``RuntimeError`` saying what went wrong when there is no compiler or it fails.

    Args:
      force: recompile even when a cached library exists.
      verbose: print the compiler command (to stderr); its errors are in the exception.
    """
    import jax

    if not _SOURCE.exists():
        raise RuntimeError(f"the kernel source {_SOURCE} is missing from this installation")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(
            "no C++ compiler found (tried $CXX, c++, g++, clang++); install one (e.g. g++) "
            "to enable the native CPU path"
        )
    out = library_path()
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private file, then rename: concurrent first uses never see a partial file.
    fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".tmp", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    if verbose:
        print("rmsjax.native: " + " ".join(cmd), file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"compiling the native kernel failed ({cxx} exit {proc.returncode}):\n"
                + proc.stderr[-2000:]
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> None:
    import jax

    if os.environ.get("RMSJAX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _state.update(ok=False, why="disabled by RMSJAX_NATIVE=0")
        return
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.RmsjaxFusedStep), platform="cpu")
    except Exception as err:  # any failure means: stay on the pure-JAX path, and say why
        _state.update(ok=False, why=f"{type(err).__name__}: {err}")
        return
    _state.update(ok=True, why="native CPU kernel loaded", path=str(path), lib=lib)


def available() -> bool:
    """True when the native CPU kernel is built (building it now if needed) and registered.

    The first call may take several seconds (compilation); later calls, and later processes
    on the same machine, reuse the cached library. ``False`` means every fused step runs the
    pure-JAX path; :func:`status` says why.
    """
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _load()
        return bool(_state["ok"])


def status() -> str:
    """One line: whether the native path is active, and the library path or the reason not."""
    ok = available()
    return f"native: {_state['path']}" if ok else f"pure-JAX only: {_state['why']}"


if __name__ == "__main__":
    print(status())
    sys.exit(0 if available() else 1)
