r"""Codes of a rounding rule with one table lookup per entry: :func:`bucket_table`, :func:`codes`.

:func:`rmsjax.quantization.rounding.lookup` finds ``#(points <= v)`` by comparisons and a
binary search (15 comparisons and 4 table gathers per entry for an 8-bit map). Here the count
comes from the float's bits instead, with the same result on every input:

* **Positions.** A float32 :math:`q` in :math:`[-1, 1]` has the integer *position*
  :math:`P(q) = (m - L) \oplus n`, where :math:`m` is its magnitude bits
  (``bits & 0x7FFFFFFF``) clamped to :math:`[L, \mathrm{bits}(1.0)]`, :math:`L` the bits of
  a power of two :math:`2^{e}` below every breakpoint, and :math:`n = -1` for a negative sign
  (so :math:`P = -(m - L) - 1`), else 0. :math:`P` is non-decreasing in :math:`q` (it is the
  float's order, with the values of magnitude below :math:`2^e` merged into :math:`P = 0` and
  :math:`-1`, between which no breakpoint lies).
* **Buckets.** Positions are cut into buckets of :math:`2^s` consecutive positions,
  :math:`b = \lfloor (P + c) / 2^s \rfloor` (clamped to the table), with :math:`s` and the
  offset :math:`c` chosen on the host so that every bucket holds at most ONE breakpoint,
  and no breakpoint lies within :data:`DRIFT` positions of a bucket's ends.
* **Codes.** Each bucket stores the code below its breakpoint (``low``), the code from it on
  (``high``) and the breakpoint itself (float32, :math:`+\infty` if none):
  :math:`c = \mathrm{high}_b` if :math:`v \ge \mathrm{point}_b` else :math:`\mathrm{low}_b`.
  For the rules whose code is the count itself (rmsjax's ``"nearest"``, torchao's),
  :math:`\mathrm{high} = \mathrm{low} + 1` and only ``low`` and ``point`` are read: two
  gathers from tables of a few thousand entries.

The bucket may come from an approximation ``q`` of the normalised value ``v`` (``x`` times the
float32 reciprocal of the scale, within 2 positions of the correctly rounded ``x / s``) while
the comparison uses ``v`` itself: as no breakpoint lies within :data:`DRIFT` positions of a
bucket's end, ``q``'s bucket is ``v``'s or a neighbour with no breakpoint between them, and the
code is still exactly ``#(points <= v)``'s. That keeps the one division per entry, which XLA
does not recompute, to a single use, so that XLA fuses the whole encoding into one loop
(:meth:`rmsjax.quantization.BlockCodec.codes_of`). A native kernel reproduces the same codes
with the same tables or with any exact search.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsjax.quantization.rounding import breakpoints

__all__ = ["DRIFT", "BucketTable", "bucket_table", "codes"]

_F32 = np.float32
_ONE = 0x3F800000  # bits of 1.0
DRIFT = 4
"""Positions by which the bucketed value may differ from the compared one (the reciprocal's
product is within 2 of the correctly rounded quotient); no breakpoint lies this close to a
bucket's end."""
_MAX_BUCKETS = 8192
_NONE = 2**31 - 1  # the position of no breakpoint
_FIELD = 1 << 24  # the low code's unit in a packed entry


@dataclasses.dataclass(frozen=True, eq=False)
class BucketTable:
    """The host-side tables of one rounding rule (see the module docstring)."""

    low_bits: int  # L: magnitudes below it are clamped to it
    shift: int  # s: 2^s positions per bucket
    offset: int  # c, added to the position before bucketing
    first: int  # bucket index of the table's first entry
    low: np.ndarray  # uint8 code below the bucket's breakpoint
    high: np.ndarray  # uint8 code from the breakpoint on
    point: np.ndarray  # float32 breakpoint (+inf if the bucket has none)
    point_position: np.ndarray  # int32 position of the breakpoint (_NONE if none)
    packed: np.ndarray  # uint32: low code * 2^24 + 2^24 - (breakpoint position - bucket start)

    @property
    def counts(self) -> bool:
        """Whether ``high == low + 1`` wherever a bucket has a breakpoint (the code is the
        count of breakpoints, so ``high`` need not be read)."""
        has = np.isfinite(self.point)
        return bool(np.all(self.high[has].astype(int) == self.low[has].astype(int) + 1))


def _host_position(bits: np.ndarray, low_bits: int) -> np.ndarray:
    bits = np.asarray(bits, np.int64)
    mag = np.clip(bits & 0x7FFFFFFF, low_bits, _ONE) - low_bits
    return np.where(bits & 0x80000000, -mag - 1, mag)


@functools.lru_cache(maxsize=64)
def bucket_table(qmap: tuple[float, ...], convention: str) -> BucketTable | None:
    """The bucket tables of ``qmap`` under ``convention`` (see the module docstring), or
    ``None`` when no bucketing of at most :data:`_MAX_BUCKETS` entries separates the
    breakpoints (then :func:`rmsjax.quantization.rounding.lookup` is used)."""
    points, table = breakpoints(qmap, convention)
    if points.size == 0:
        return None
    smallest = float(np.min(np.abs(points)))
    if smallest == 0.0:
        return None  # a breakpoint at zero: the clamped magnitudes would merge it
    # L: the largest power of two at most a quarter of the smallest breakpoint magnitude, so
    # that every breakpoint lies far above the merged band.
    low_bits = int(np.asarray(_F32(2.0 ** np.floor(np.log2(smallest) - 2))).view(np.uint32))
    bits = np.asarray(points, _F32).view(np.uint32).astype(np.int64)
    pos = _host_position(bits, low_bits)
    span = int(_host_position(np.array([_ONE]), low_bits)[0]) + 1  # positions per sign
    codes = table.astype(np.int64)  # codes[k]: the code of a value with k points <= it
    for shift in range(22, 7, -1):
        size = 1 << shift
        if (2 * span) // size + 2 > _MAX_BUCKETS:
            break
        for offset in _offsets(shift):
            inside = (pos + offset) & (size - 1)
            if np.any(inside <= DRIFT) or np.any(inside >= size - DRIFT):
                continue
            bucket = (pos + offset) >> shift
            if np.any(np.diff(bucket) == 0):
                continue  # two breakpoints in one bucket
            first = int(bucket[0]) - 1
            last = int(bucket[-1]) + 1
            n = last - first + 1
            point = np.full(n, np.inf, _F32)
            point[bucket - first] = points
            point_position = np.full(n, _NONE, np.int64)
            point_position[bucket - first] = pos
            # k(b): the number of points in buckets before b
            before = np.searchsorted(bucket, np.arange(first, last + 1), side="left")
            has = np.isfinite(point)
            low = codes[before]
            high = np.where(has, codes[np.minimum(before + 1, codes.size - 1)], low)
            starts = ((np.arange(n, dtype=np.int64) + first) << shift) - offset
            relative = np.where(point_position == _NONE, _FIELD - 1, point_position - starts)
            return BucketTable(
                low_bits=low_bits,
                shift=shift,
                offset=offset,
                first=first,
                low=low.astype(np.uint8),
                high=high.astype(np.uint8),
                point=point,
                point_position=point_position.astype(np.int32),
                packed=(low * _FIELD + _FIELD - relative).astype(np.uint32),
            )
    return None


def _offsets(shift: int) -> list[int]:
    """Candidate offsets: 0 first, then a deterministic spread over the bucket width."""
    size = 1 << shift
    return [0, *((k * 0x9E3779B1) % size for k in range(1, 64))]


def _position(magnitude: jax.Array, negative: jax.Array, t: BucketTable) -> jax.Array:
    """The position of the float32 values of ``magnitude`` (non-negative) and sign mask
    ``negative`` (int32 0 or -1), each intermediate used once (see :func:`codes`)."""
    mag = lax.bitcast_convert_type(magnitude, jnp.int32)
    return (jnp.clip(mag, t.low_bits, _ONE) - t.low_bits) ^ negative


def codes(
    magnitude: jax.Array, negative: jax.Array, approx: jax.Array, t: BucketTable
) -> jax.Array:
    r"""The uint8 codes ``table[#(points <= v)]`` of the float32 values ``v`` of magnitude
    ``magnitude`` (no NaN) and sign ``negative`` (an int32 mask: -1 for a negative sign, also
    for -0, else 0), given ``approx`` within :data:`DRIFT` positions of ``v``.

    ``approx`` picks the bucket (it may be read several times); ``magnitude`` is read once, so
    that XLA fuses the division that computes it into the same loop. With the count as the
    code (:attr:`BucketTable.counts`) that is one table lookup, read once too (XLA does not
    fuse a table lookup read twice): the bucket's entry is :math:`e = 2^{24}\,\mathrm{low} +
    2^{24} - r_b`, with :math:`r_b` its breakpoint's position relative to the bucket's start
    (:math:`2^{24} - 1` if none), and the code is :math:`\lfloor (e + r_v) / 2^{24} \rfloor`
    (uint32) for :math:`v`'s relative position :math:`r_v` (clamped to :math:`[0, 2^{23}]`):
    the low code, plus one when :math:`r_v \ge r_b`.
    """
    bits = lax.bitcast_convert_type(approx, jnp.int32)
    approx_position = (jnp.clip(bits & 0x7FFFFFFF, t.low_bits, _ONE) - t.low_bits) ^ (bits >> 31)
    bucket = jnp.clip(((approx_position + t.offset) >> t.shift) - t.first, 0, t.low.size - 1)
    start = ((bucket + t.first) << t.shift) - t.offset  # the bucket's first position
    if t.counts:
        entry = jnp.asarray(t.packed).at[bucket].get(mode="promise_in_bounds")
        # Clamped to [0, 2^23]: positions beyond the clamped edge buckets, and the drift below
        # a bucket's start, stay on the same side of every breakpoint (none lies within
        # DRIFT of a bucket's ends).
        relative = jnp.clip(_position(magnitude, negative, t) - start, 0, 1 << 23)
        return ((entry + relative.astype(jnp.uint32)) >> 24).astype(jnp.uint8)
    point = jnp.asarray(t.point_position).at[bucket].get(mode="promise_in_bounds")
    up = _position(magnitude, negative, t) >= point
    low = jnp.asarray(t.low).at[bucket].get(mode="promise_in_bounds")
    return jnp.where(up, jnp.asarray(t.high).at[bucket].get(mode="promise_in_bounds"), low)
