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

__all__ = ["CONVENTIONS", "breakpoints", "lookup"]

_F32 = np.float32
_BNB_GRID = 65536  # bitsandbytes' CPU kernel rounds onto this many points of [-1, 1]
CONVENTIONS = ("nearest", "bitsandbytes", "torchao")


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


_RULES = {"nearest": _nearest_rule, "torchao": _torchao_rule, "bitsandbytes": _bitsandbytes_rule}


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
    """The codes of normalised values ``v``: ``table[#(points <= v)]``, by a branchless binary
    search of fixed depth (8 gathers from a 256-entry constant, elementwise in ``v``)."""
    points, table = breakpoints(qmap, convention)
    padded = np.full(256, np.inf, _F32)
    padded[: points.size] = points
    padded_table = np.zeros(257, np.uint8)
    padded_table[: table.size] = table
    count = jnp.zeros(v.shape, jnp.int32)
    step = 128
    while step:
        probe = jnp.asarray(padded)[count + (step - 1)]
        count = jnp.where(probe <= v, count + step, count)
        step //= 2
    return jnp.asarray(padded_table)[count]
