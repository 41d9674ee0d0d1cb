r"""Stochastic rounding to bfloat16 / float16.

Round-to-nearest loses every update smaller than half a unit in the last place (ulp) of the
parameter: a bfloat16 weight of 1.0 has an ulp of :math:`2^{-7}`, so ``1.0 + 1e-3`` is 1.0
again, every step, and training stalls. Stochastic rounding rounds :math:`x` up to the next
representable value :math:`x_\uparrow` with probability :math:`(x - x_\downarrow) / (x_\uparrow
- x_\downarrow)` and down to :math:`x_\downarrow` otherwise, so :math:`E[\mathrm{round}(x)] = x`
exactly: small updates accumulate in expectation (Gupta et al., Deep Learning with Limited
Numerical Precision, 2015). The randomness comes from an explicit ``jax.random`` key; nothing is
global. :func:`rmsjax.apply_updates_stochastic` (in :mod:`rmsjax.updates`) applies updates to
bfloat16/float16 parameters with it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from rmsjax._types import HALF_FLOATS

__all__ = ["counter_bits", "mix32", "round_with_bits", "stochastic_round"]

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: consecutive indices land far apart before mixing


def mix32(x: jax.Array) -> jax.Array:
    """A bijective mix of ``uint32`` values (Wellons' "lowbias32": xor-shift, multiply,
    xor-shift, multiply, xor-shift), whose output bits each depend on every input bit.

    ``x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15``, in
    ``uint32`` arithmetic (products modulo :math:`2^{32}`).
    """
    x = jnp.asarray(x, jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x735A2D97)
    return x ^ (x >> 15)


def counter_bits(shape: tuple[int, ...], seed: ArrayLike, counter: ArrayLike) -> jax.Array:
    r"""32 random bits per entry of an array of ``shape``, from a hash of (index, seed, counter).

    .. math::  b_i = \mathrm{mix32}(i \cdot \mathtt{0x9E3779B9} + k), \qquad
               k = \mathrm{mix32}(\mathit{seed} \oplus \mathrm{mix32}(\mathit{counter}))

    with :math:`i` the entry's C-order index modulo :math:`2^{32}` and all arithmetic in
    ``uint32`` (:func:`mix32`). A counter-based generator: no state but ``seed`` and
    ``counter`` (advance the counter once per use), the same bits on every backend and for
    every sharding of the array (the index is the entry's global position), and a few integer
    operations per entry (``jax.random.bits`` costs several times more). The bits are not of
    cryptographic quality; they are for unbiased rounding decisions.

    Args:
      shape: the array's shape.
      seed: a ``uint32`` scalar (e.g. derived from a moment's name and parameter path).
      counter: a ``uint32`` scalar, advanced by the caller at every use.
    """
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    key = mix32(jnp.asarray(seed, jnp.uint32) ^ mix32(jnp.asarray(counter, jnp.uint32)))
    return mix32(index * jnp.uint32(_GOLDEN) + key)


def _round_bfloat16(x: jax.Array, random: jax.Array) -> jax.Array:
    # bfloat16 is the upper half of a float32. Truncating the lower 16 bits rounds toward zero;
    # adding one to the upper half moves one bfloat16 step away from zero (a carry into the
    # exponent is the correct next number). Doing so when 16 random bits r < the lower 16 bits
    # f happens with probability f / 2^16: exactly the fractional distance. In integers on the
    # magnitude m (no float conversion, which XLA's CPU backend computes slowly): beyond the
    # largest finite bfloat16 the value is converted as by astype (to the largest below
    # 0x7F7F8000, else to infinity, ties to even), NaN stays NaN (its upper half, quietened).
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    sign = (bits >> 16) & 0x8000
    m = bits & 0x7FFFFFFF
    up = (random >> 16) < (m & 0xFFFF)
    rounded = jnp.minimum((m >> 16) + up.astype(jnp.uint32), jnp.uint32(0x7F7F))
    beyond = jnp.where(m > 0x7F800000, (m >> 16) | 0x40, jnp.uint32(0x7F80))
    upper = jnp.where(m >= 0x7F7F8000, beyond, rounded) | sign
    return lax.bitcast_convert_type(upper.astype(jnp.uint16), jnp.bfloat16)


def _round_float16(x: jax.Array, random: jax.Array) -> jax.Array:
    # float16 keeps 11 significant bits down to 2^-14 and a fixed step of 2^-24 below. With u
    # that step for |x|, t = |x| / u is exact (a power-of-two scaling), floor(t) * u rounds
    # toward zero and the fraction t - floor(t) (exact, at most 24 bits) is the probability of
    # taking the next step; 24 random bits decide.
    mag = jnp.abs(x)
    _, exponent = jnp.frexp(mag)  # mag = m * 2^exponent with m in [0.5, 1)
    step_exp = jnp.maximum(exponent - 11, -24)
    t = jnp.ldexp(mag, -step_exp)
    whole = jnp.floor(t)
    noise = (random >> 8).astype(jnp.float32) * 2.0**-24
    rounded = jnp.ldexp(whole + (noise < t - whole).astype(jnp.float32), step_exp)
    return jnp.copysign(rounded, x).astype(jnp.float16)


def stochastic_round(x: ArrayLike, key: jax.Array, dtype: DTypeLike = jnp.bfloat16) -> jax.Array:
    r"""``x`` rounded to ``dtype`` (bfloat16 or float16) up or down at random, unbiased.

    For each entry, with :math:`x_\downarrow, x_\uparrow` the neighbouring ``dtype`` values
    toward and away from zero,

    .. math::

        \mathrm{round}(x) = x_\uparrow \text{ with probability }
        \frac{|x - x_\downarrow|}{|x_\uparrow - x_\downarrow|}, \text{ else } x_\downarrow,

    so :math:`E[\mathrm{round}(x)] = x` for every float32 ``x`` in range (for float16, up to
    :math:`2^{-24}` of a step when ``|x|`` is below float16's smallest subnormal scale). Values
    already representable come back unchanged, signs and both zeros are kept. NaN, ±inf and
    values beyond the largest finite ``dtype`` number are converted as by
    ``x.astype(dtype)`` (round to nearest: NaN stays NaN, an overflow gives inf), so a finite
    value within range never becomes infinite.

    Args:
      x: a real array, read in float32 (a float64 input is first rounded to float32).
      key: a ``jax.random`` key; the same key gives the same rounding. Use a fresh one per call
        (``jax.random.fold_in(key, step)``).
      dtype: ``jnp.bfloat16`` or ``jnp.float16``.

    Differences from torchao's ``_fp32_to_bf16_sr`` (``bf16_stochastic_round=True``): the same
    rule and bit trick for bfloat16, with the random bits from an explicit key instead of
    torch's global generator; torchao can round a float32 above the largest bfloat16 up to inf,
    here such values round to nearest; float16 is supported too. optax has no stochastic
    rounding.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in HALF_FLOATS:
        raise ValueError(f"`dtype` must be bfloat16 or float16, got {dtype}.")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`x` must be a real floating-point array, got dtype {x.dtype}.")
    return _stochastic_round(x, key, dtype)


@functools.partial(jax.jit, static_argnums=2)
def _stochastic_round(x: jax.Array, key: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return round_with_bits(x, jax.random.bits(key, x.shape, jnp.uint32), dtype)


def round_with_bits(x: ArrayLike, bits: ArrayLike, dtype: DTypeLike = jnp.bfloat16) -> jax.Array:
    r""":func:`stochastic_round` with the random bits given: ``bits``, ``uint32`` of ``x``'s
    shape, 32 per entry (:func:`counter_bits`, or ``jax.random.bits``, which
    :func:`stochastic_round` uses).

    bfloat16: with :math:`f` the low 16 bits of the float32 :math:`x`, the entry rounds away
    from zero when ``bits >> 16`` :math:`< f` (probability :math:`f / 2^{16}`), else toward
    zero (the upper 16 bits of :math:`x`). float16: with :math:`t = |x| / u` for the float16
    step :math:`u` at :math:`|x|`, away from zero when :math:`(\mathtt{bits} \gg 8) \cdot
    2^{-24} < t - \lfloor t \rfloor`. Values beyond the finite range of ``dtype``,
    infinities and NaN are converted as by ``x.astype(dtype)``. Elementwise: XLA fuses it with the
    computation of ``x`` and of ``bits``.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in HALF_FLOATS:
        raise ValueError(f"`dtype` must be bfloat16 or float16, got {dtype}.")
    x32 = jnp.asarray(x).astype(jnp.float32)
    bits = jnp.asarray(bits, jnp.uint32)
    if dtype == HALF_FLOATS[0]:
        return _round_bfloat16(x32, bits)
    in_range = jnp.abs(x32) <= jnp.finfo(dtype).max  # False for NaN and inf
    return jnp.where(in_range, _round_float16(x32, bits), x32.astype(dtype))
