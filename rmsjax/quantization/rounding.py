"""Rounding rules (nearest, bitsandbytes' CPU kernel, torchao), turned into float32 breakpoints.

Each rule maps a normalised value v in [-1, 1] to a code. Every rule is monotone in v, so it is
pinned down by the float32 numbers where the code changes; :func:`breakpoints` finds them once on
the host and :func:`lookup` applies them in JAX with comparisons only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CONVENTIONS", "breakpoints", "lookup", "stochastic_codes"]

_F32 = np.float32
_BNB_GRID = 65536  # bitsandbytes' CPU kernel rounds onto this many points of [-1, 1]
CONVENTIONS = ("nearest", "bitsandbytes", "torchao")  # a codec's choices; "floor" is internal


def _ordinal(v: np.ndarray) -> np.ndarray:
    """Float32 values as integers in the same order (both zeros map to 0)."""
    bits = np.asarray(v, _F32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_ordinal(o: np.ndarray) -> np.ndarray:
    o = np.asarray(o, np.int64)
    bits = np.where(o >= 0, o, (-o) | 0x80000000).astype(np.uint32)
    return bits.view(_F32)


def _nearest_rule(qmap: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mids = (qmap[:-1].astype(np.float64) + qmap[1:].astype(np.float64)) / 2  # exact in float64
    return lambda v: np.searchsorted(mids, v.astype(np.float64), side="right")


def _torchao_rule(qmap: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    top = qmap.size - 1

    def rule(v: np.ndarray) -> np.ndarray:
        down = np.clip(np.searchsorted(qmap, v, side="right") - 1, 0, top)
        up = np.minimum(down + 1, top)
        residual = v - qmap[down]  # float32 arithmetic, as torch does it
        half_gap = (qmap[up] - qmap[down]) * _F32(0.5)
        return np.where(residual >= half_gap, up, down)

    return rule


def _bitsandbytes_rule(qmap: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    # The kernel's table: grid point g_i = -1 + 2i / 65535 (float32) takes the number of
    # float32 midpoints 0.5 * (Q_k + Q_{k+1}) below it.
    mids = _F32(0.5) * (qmap[:-1] + qmap[1:])
    i = np.arange(_BNB_GRID).astype(_F32)
    grid = _F32(-1.0) + (_F32(2.0) * i) / _F32(_BNB_GRID - 1)
    table = np.searchsorted(mids, grid, side="left")

    def rule(v: np.ndarray) -> np.ndarray:
        v = np.clip(v.astype(_F32), _F32(-1), _F32(1))
        t = ((v + _F32(1)) * _F32(0.5)) * _F32(_BNB_GRID - 1) + _F32(0.5)  # each step float32
        return table[t.astype(np.int64)]

    return rule


def _floor_rule(qmap: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    # The largest code whose value is <= v (the lower neighbour of stochastic rounding).
    return lambda v: np.clip(np.searchsorted(qmap, v, side="right") - 1, 0, qmap.size - 1)


_RULES = {
    "nearest": _nearest_rule,
    "torchao": _torchao_rule,
    "bitsandbytes": _bitsandbytes_rule,
    "floor": _floor_rule,
}


@functools.lru_cache(maxsize=64)
def breakpoints(qmap: tuple[float, ...], convention: str) -> tuple[np.ndarray, np.ndarray]:
    """``(points, codes)``: the code of a normalised value v is ``codes[#(points <= v)]``.

    Every rule is monotone in v, so its step function over the float32 numbers of [-1, 1] is
    pinned down by the places where it changes; bisection over the float32 ordinals finds each
    of them exactly (at most 255 changes, 31 halvings each).
    """
    q = np.asarray(qmap, _F32)
    rule = _RULES[convention](q)
    code = lambda o: rule(_from_ordinal(o)).astype(np.int64)
    lo = np.array([_ordinal(np.array(-1.0, _F32))], np.int64)
    hi = np.array([_ordinal(np.array(1.0, _F32))], np.int64)
    first = code(lo)
    c_lo, c_hi = first, code(hi)
    points: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    while lo.size:
        changing = c_lo != c_hi
        lo, hi, c_lo, c_hi = lo[changing], hi[changing], c_lo[changing], c_hi[changing]
        found = hi - lo == 1
        points.append(hi[found])
        codes.append(c_hi[found])
        lo, hi, c_lo, c_hi = lo[~found], hi[~found], c_lo[~found], c_hi[~found]
        mid = (lo + hi) // 2
        c_mid = code(mid)
        lo, hi = np.concatenate([lo, mid]), np.concatenate([mid, hi])
        c_lo, c_hi = np.concatenate([c_lo, c_mid]), np.concatenate([c_mid, c_hi])
    where = np.concatenate(points)
    order = np.argsort(where)
    table = np.concatenate([first, np.concatenate(codes)[order]]).astype(np.uint8)
    return _from_ordinal(where[order]), table


def lookup(qmap: tuple[float, ...], convention: str, v: jax.Array) -> jax.Array:
    """The codes of normalised values ``v``: ``table[#(points <= v)]``, elementwise in ``v``.

    The count is found with comparisons against constants (which XLA fuses into one
    vectorised loop) and as few table gathers as possible (gathers are the slow part on the
    CPU): a 4-bit map's 15 breakpoints are all compared; for an 8-bit map, comparing with every
    16th breakpoint gives the count's high 4 bits and a branchless binary search of depth 4
    (4 gathers from a 256-entry constant) the low ones. Both give exactly ``#(points <= v)``.
    """
    points, table = breakpoints(qmap, convention)
    size = 16 if points.size < 16 else 256
    padded = np.full(size, np.inf, _F32)
    padded[: points.size] = points
    padded_table = np.zeros(size + 1, np.uint8)
    padded_table[: table.size] = table
    count = jnp.zeros(v.shape, jnp.int32)
    # The final table gather is skipped where the table is the identity (every breakpoint
    # moves to the next code: "nearest" and torchao's rounding).
    identity = np.array_equal(padded_table[:size], np.arange(size))
    finish = lambda c: c.astype(jnp.uint8) if identity else jnp.asarray(padded_table)[c]
    if size == 16:
        for point in padded[:15]:
            count = count + (jnp.float32(point) <= v).astype(jnp.int32)
        return finish(count)
    for point in padded[15 : size - 1 : 16]:  # the last point of each block of 16
        count = count + 16 * (jnp.float32(point) <= v).astype(jnp.int32)
    step = 8
    while step:
        probe = jnp.asarray(padded)[count + (step - 1)]
        count = jnp.where(probe <= v, count + step, count)
        step //= 2
    return finish(count)


def stochastic_codes(qmap: tuple[float, ...], v: jax.Array, bits: jax.Array) -> jax.Array:
    r"""Codes of normalised values ``v`` rounded stochastically between their two neighbours.

    With :math:`Q_k \le v < Q_{k+1}` (``v`` clipped to :math:`[Q_0, Q_{last}]`; at the top,
    :math:`k` is the second-to-last code), :math:`r = v - Q_k` and :math:`d = Q_{k+1} - Q_k` in
    float32, and :math:`u = \lfloor b / 2^8 \rfloor \cdot 2^{-24}` from the entry's 32 random
    bits :math:`b`, the code is :math:`k + 1` when :math:`u \cdot d < r` (a float32 product
    compared, no fused multiply-add) and :math:`k` otherwise: :math:`P(k + 1) = r / d` up to
    :math:`2^{-24}`, so the decoded value is :math:`v` in expectation (for ``v`` inside the
    map's range). A value equal to a map value is kept exactly (:math:`r = 0`).
    """
    q = np.asarray(qmap, _F32)
    lo = jnp.asarray(q[:-1])
    gap = jnp.asarray(q[1:] - q[:-1])  # float32 differences, as the rule computes them
    v = jnp.clip(v, jnp.float32(q[0]), jnp.float32(q[-1]))
    k = jnp.minimum(lookup(qmap, "floor", v).astype(jnp.int32), q.size - 2)
    u = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
    up = u * gap[k] < v - lo[k]
    return (k + up.astype(jnp.int32)).astype(jnp.uint8)
