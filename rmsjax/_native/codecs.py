"""The native kernel's 8-bit codec operands: built from :mod:`rmsjax.quantization`, and read back.

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

The operand's fields and sections, and how its cell table finds a code, are defined in
:mod:`rmsjax._native.table` (``CODEC_FIELDS``, ``CODEC_SECTIONS``, ``codec_spans``);
:func:`operand` writes them, :func:`parse` reads them back (as the kernel's ``ParseCodec``
does), and :func:`lookup_model` restates the kernel's lookup in NumPy. :func:`operand` checks
that every cell holds at most one breakpoint, and checks the lookup against a plain count on
every breakpoint, its float32 neighbours, every cell boundary and random values, before
returning the operand.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from rmsjax._native import table
from rmsjax.quantization import BlockCodec
from rmsjax.quantization.rounding import breakpoints

__all__ = ["ParsedOperand", "lookup_model", "operand", "parse", "unsupported"]

_ONE_BITS = 0x3F800000  # the bits of 1.0f
_F32 = np.float32
# The NumPy type of each section type of the table (little-endian, as the kernel reads them).
_DTYPES: dict[str, np.dtype[Any]] = {
    "int32": np.dtype("<i4"),
    "float32": np.dtype("<f4"),
    "uint8": np.dtype(np.uint8),
}


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


def _half(lo_bits: int, shift: int) -> int:
    """The cells per sign of a cell table from ``lo_bits`` up to 1.0 in steps of ``2**shift``."""
    return ((_ONE_BITS - lo_bits) >> shift) + 1


def _cells(points: np.ndarray, lo_bits: int, shift: int) -> np.ndarray | None:
    """The cell table for ``shift``, or ``None`` when a cell would hold two breakpoints."""
    half = _half(lo_bits, shift)
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
    """The kernel's uint8 operand for ``codec``: the sections of
    :data:`rmsjax._native.table.CODEC_SECTIONS`, read-only.

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
    values = {
        "fields": [fields[name] for name in table.CODEC_FIELDS],
        "qmap": codec.qmap,
        "points": padded,
        "cells": cells,
        "padding": np.zeros(3, np.uint8),
    }
    spans = table.codec_spans(fields)
    blob = np.zeros(max(stop for _, stop in spans.values()), np.uint8)
    for section in table.CODEC_SECTIONS:
        start, stop = spans[section.name]
        data = np.asarray(values[section.name], _DTYPES[section.dtype]).view(np.uint8)
        assert data.size == stop - start, section.name
        blob[start:stop] = data
    blob.setflags(write=False)
    return blob


class ParsedOperand(NamedTuple):
    """A codec operand read back by :func:`parse`."""

    fields: dict[str, int]  # the header, by the names of table.CODEC_FIELDS
    sections: dict[str, np.ndarray]  # every other section of table.CODEC_SECTIONS, typed


def parse(blob: np.ndarray) -> ParsedOperand:
    """The fields and sections of a codec operand, checked as the kernel's ``ParseCodec``
    checks them.

    Raises:
      ValueError: ``blob`` is not a 1-D uint8 array, or is not a codec operand: a wrong magic
        number, a block size outside 1 .. ``MAX_BLOCK``, a shift outside 0 .. 23, a cell count
        that is not ``2 * half`` or whose cells do not cover [-1, 1], or a size that does not
        match the cell count. The message says which.
    """
    blob = np.asarray(blob)
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError(f"a codec operand is a 1-D uint8 array, got {blob.dtype}{blob.shape}")
    empty = table.codec_spans(dict.fromkeys(table.CODEC_FIELDS, 0))  # the fixed offsets
    head_start, head_stop = empty["fields"]
    fixed = empty["cells"][0]
    if blob.size < fixed:
        raise ValueError(f"a codec operand has at least {fixed} bytes, got {blob.size}")
    head = blob[head_start:head_stop].view(_DTYPES["int32"])
    fields = {name: int(v) for name, v in zip(table.CODEC_FIELDS, head, strict=True)}
    problems = [
        (fields["magic"] != table.CODEC_MAGIC, f"magic number {fields['magic']:#x}"),
        (not 1 <= fields["block_size"] <= table.MAX_BLOCK, f"block size {fields['block_size']}"),
        (not 0 <= fields["shift"] <= 23, f"shift {fields['shift']}"),
        (
            fields["half"] < 1 or fields["cells"] != 2 * fields["half"],
            f"{fields['cells']} cells for half = {fields['half']}",
        ),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"not a codec operand of this kernel: {what}")
    spans = table.codec_spans(fields)
    size = max(stop for _, stop in spans.values())
    if blob.size != size:
        raise ValueError(
            f"a codec operand with {fields['cells']} cells has {size} bytes, got {blob.size}"
        )
    lo_bits = fields["lo_bits"] & 0xFFFFFFFF
    if not 0 < lo_bits <= _ONE_BITS or _half(lo_bits, fields["shift"]) != fields["half"]:
        raise ValueError("not a codec operand of this kernel: its cells do not cover [-1, 1]")
    sections = {
        s.name: blob[slice(*spans[s.name])].view(_DTYPES[s.dtype])
        for s in table.CODEC_SECTIONS
        if s.name != "fields"
    }
    return ParsedOperand(fields, sections)
