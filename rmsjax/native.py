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

This module is the kernel's public face; the kernel's whole interface lives in
:mod:`rmsjax._native`: the operand table (``table``), the codec operands (``codecs``), the FFI
call (``call``), this look-up (``loader``), the compile recipe (``build``) and the contract
table (``contracts``).
"""

from __future__ import annotations

import sys

from rmsjax._native.loader import (
    TARGET,
    available,
    build,
    enabled,
    library_path,
    reset,
    status,
)

__all__ = ["TARGET", "available", "build", "enabled", "library_path", "reset", "status"]


if __name__ == "__main__":
    print(status())
    sys.exit(0 if available() else 1)
