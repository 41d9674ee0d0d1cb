"""The native kernel's 8-bit codec operands, built from :mod:`rmsjax.quantization`.

The kernel requantises each block of 8-bit state itself, so it needs the codec's map and its
rounding. Both come from here, computed from the codec's own definition (the map of the
:class:`~rmsjax.quantization.BlockCodec`, and the float32 breakpoints where its rounding
changes code, :func:`rmsjax.quantization.rounding.breakpoints`): nothing about a codec is
written twice.

The kernel takes the codec rmsjax uses by default (:func:`rmsjax.quantization.moment_codec`:
8 bits, blocks along the last axis, ``"nearest"`` rounding, true division by the block's
largest magnitude) with any map and any block size up to
:data:`rmsjax._native.table.MAX_BLOCK`; :func:`unsupported` says why it does not take another
one (4-bit codes, the bitsandbytes or torchao conventions, the flat layout), whose state then
stays on the pure-JAX path.

The operand (layout in :mod:`rmsjax._native.table`): the header fields, the map, the
breakpoints padded with +inf to 256, and a *cell table*. The code of a normalised value
:math:`v` is the number of breakpoints :math:`\\le v`. The cell table finds that number with
one table read and one comparison: the float32 numbers of :math:`[-1, 1]` are cut, by their bit
patterns, into ranges of :math:`2^{\\text{shift}}` consecutive magnitudes above ``lo`` (a power of
two below the smallest breakpoint magnitude; smaller magnitudes join the first range of their
sign), each range holding at most one breakpoint; the table holds, per range, the number of
breakpoints below it. :func:`operand` builds the table, checks that every range holds at most
one breakpoint, and checks the lookup against a plain count on every breakpoint, its float32
neighbours, every range boundary and random values before returning it.
"""

from __future__ import annotations

import functools

import numpy as np

from rmsjax._native import table
from rmsjax.quantization import BlockCodec
from rmsjax.quantization.rounding import breakpoints

__all__ = ["lookup_model", "operand", "unsupported"]

_ONE_BITS = 0x3F800000  # the bits of 1.0f
_F32 = np.float32


def unsupported(codec: BlockCodec) -> str | None:
    """Why the kernel cannot run state stored by ``codec``, or ``None`` when it can."""
    if codec.bits != 8:
        return f"{codec.bits}-bit codes (the kernel has 8-bit state only)"
    if codec.layout != "last_axis":
        return f"the {codec.layout!r} block layout (the kernel blocks the last axis)"
    if codec.convention != "nearest" or codec.normalize != "divide":
        return (
            f"the {codec.convention!r} rounding with {codec.normalize!r} normalisation (the "
            "kernel rounds to the nearest code after a true division, rmsjax's own codec)"
        )
    if codec.block_size > table.MAX_BLOCK:
        return f"blocks of {codec.block_size} entries (the kernel takes up to {table.MAX_BLOCK})"
    return _layout(codec.qmap)[1]


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, _F32).view(np.uint32).astype(np.int64)


def _floats(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, np.int64).astype(np.uint32).view(_F32)


def lookup_model(
    v: np.ndarray, lo_bits: int, shift: int, half: int, cells: np.ndarray, points: np.ndarray
) -> np.ndarray:
    """The kernel's code lookup (``Lookup`` in ``fused_step.cc``), restated in NumPy."""
    b = _bits(v)
    a = np.clip(b & 0x7FFFFFFF, lo_bits, _ONE_BITS)
    k = (a - lo_bits) >> shift
    cell = np.where(b >> 31 == 1, half - 1 - k, half + k)
    base = cells[cell].astype(np.int64)
    return base + (points[base] <= np.asarray(v, _F32))


def _cells(points: np.ndarray, lo_bits: int, shift: int) -> np.ndarray | None:
    """The cell table for ``shift``, or ``None`` when a cell would hold two breakpoints."""
    half = ((_ONE_BITS - lo_bits) >> shift) + 1
    k = np.arange(half, dtype=np.int64)
    mag_lo = _floats(lo_bits + (k << shift))
    mag_lo[0] = 0.0  # the first cell of each sign takes every smaller magnitude
    mag_hi = _floats(np.minimum(lo_bits + ((k + 1) << shift) - 1, _ONE_BITS))
    # negative cells half - 1 - k hold [-mag_hi, -mag_lo], positive cells half + k [mag_lo, mag_hi]
    low = np.concatenate([-mag_hi[::-1], mag_lo])
    high = np.concatenate([-mag_lo[::-1], mag_hi])
    below = np.searchsorted(points, low, side="left")  # breakpoints < the cell
    upto = np.searchsorted(points, high, side="right")  # breakpoints <= the cell's top
    if np.any(upto - below > 1):
        return None
    return below.astype(np.uint8)


@functools.lru_cache(maxsize=32)
def _layout(
    qmap: tuple[float, ...],
) -> tuple[tuple[int, int, np.ndarray, np.ndarray] | None, str | None]:
    """``((lo_bits, shift, cells, padded points), None)``, or ``(None, why not)``."""
    points, codes = breakpoints(qmap, "nearest")
    if len(qmap) != table.MAP_SIZE or not np.array_equal(codes, np.arange(codes.size)):
        return None, "a map whose codes are not the breakpoint counts"
    points = np.asarray(points, _F32)
    smallest = float(np.min(np.abs(points)))
    if not smallest >= np.finfo(_F32).tiny:
        return None, "a map with a rounding breakpoint at 0"
    lo_bits = int(_bits(_F32(2.0 ** np.floor(np.log2(smallest))))[()])
    for shift in range(23, -1, -1):
        cells = _cells(points, lo_bits, shift)
        if cells is not None:
            padded = np.full(table.MAP_SIZE, np.inf, _F32)
            padded[: points.size] = points
            return (lo_bits, shift, cells, padded), None
    return None, "a map whose breakpoints are closer than one float32 step"  # pragma: no cover


def _check(lo_bits: int, shift: int, cells: np.ndarray, padded: np.ndarray) -> None:
    """The lookup must count the breakpoints <= v exactly: on every breakpoint, its float32
    neighbours, every cell boundary, +-0, +-1 and random values of [-1, 1]."""
    points = padded[np.isfinite(padded)]
    half = cells.size // 2
    k = np.arange(half + 1, dtype=np.int64)
    edges = _floats(np.minimum(lo_bits + (k << shift), _ONE_BITS))
    near = np.concatenate([points, edges, -edges, [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]])
    near = near.astype(_F32)
    values = np.concatenate(
        [
            near,
            np.nextafter(near, _F32(np.inf)),
            np.nextafter(near, _F32(-np.inf)),
            np.random.default_rng(0).uniform(-1, 1, 20000).astype(_F32),
        ]
    )
    values = np.clip(values, _F32(-1), _F32(1))
    want = np.searchsorted(points, values, side="right")
    got = lookup_model(values, lo_bits, shift, half, cells, padded)
    if not np.array_equal(got, want):  # pragma: no cover - a bug in the table construction
        raise AssertionError("the kernel's code lookup disagrees with the codec's rounding")


@functools.lru_cache(maxsize=32)
def operand(codec: BlockCodec) -> np.ndarray:
    """The kernel's uint8 operand for ``codec`` (see the module docstring).

    Raises:
      ValueError: the kernel cannot run this codec (:func:`unsupported` says why).
    """
    why = unsupported(codec)
    if why is not None:
        raise ValueError(f"the native kernel cannot run this codec: {why}")
    layout, _ = _layout(codec.qmap)
    assert layout is not None
    lo_bits, shift, cells, padded = layout
    _check(lo_bits, shift, cells, padded)
    half = cells.size // 2
    fields = {
        "magic": table.CODEC_MAGIC,
        "block_size": codec.block_size,
        "lo_bits": lo_bits,
        "shift": shift,
        "half": half,
        "cells": cells.size,
    }
    head = np.array([fields[name] for name in table.CODEC_FIELDS], "<i4")
    qmap = np.asarray(codec.qmap, "<f4")
    blob = np.concatenate(
        [
            head.view(np.uint8),
            qmap.view(np.uint8),
            padded.astype("<f4").view(np.uint8),
            cells,
            np.zeros(3, np.uint8),  # the kernel may read a 4-byte word at the last cell
        ]
    )
    blob.setflags(write=False)
    return blob
