"""The quantization maps of bitsandbytes and torchao, and rmsjax's 4-bit power-of-two maps,
built in NumPy float32."""

from __future__ import annotations

import numpy as np

__all__ = ["dynamic_map", "linear_map", "power_of_two_map"]

_F32 = np.float32


def _linspace32(start: float, stop: float, num: int) -> np.ndarray:
    """``torch.linspace(start, stop, num)`` in float32, bit for bit.

    torch computes the first half as ``start + step * i`` and the second half as
    ``stop - step * (num - 1 - i)``, each with one rounding (a fused multiply-add), where
    ``step`` is the float32 quotient ``(stop - start) / (num - 1)``. In float64 both the product
    and the sum are exact here, so one rounding to float32 reproduces the fused result.
    """
    lo, hi = _F32(start), _F32(stop)
    if num == 1:
        return np.array([lo], _F32)
    step = np.float64((hi - lo) / _F32(num - 1))
    i = np.arange(num, dtype=np.float64)
    first = np.float64(lo) + step * i
    second = np.float64(hi) - step * (num - 1 - i)
    return np.where(i < num // 2, first, second).astype(_F32)


def dynamic_map(signed: bool = True, *, exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    r"""The dynamic quantization map of bitsandbytes and torchao, as float32, sorted.

    For each exponent :math:`j = 0, \dots, E - 1` (``E = exponent_bits``) the map holds the
    midpoints of an even split of :math:`[0.1, 1]` into :math:`2^{j + T - 1 - E}` parts
    (:math:`2^{j + T - E}` when unsigned; ``T = total_bits``), scaled by :math:`10^{j - E + 1}`
    (and their negatives when signed), plus 0 and 1: a wide range (:math:`5.5 \cdot 10^{-7}` to
    1 for 8 bits) with about two significant digits everywhere. ``dynamic_map(True)`` and
    ``dynamic_map(False)`` are bitsandbytes' ``create_dynamic_map(signed)`` (256 values, the
    signed map from :math:`-0.99297` to 1); ``dynamic_map(True, exponent_bits=3,
    total_bits=4)`` is torchao's 16-value map for 4-bit first moments. The float32 rounding of
    every step is the libraries' (``torch.linspace`` and float32 products), so the values are
    bit-identical to theirs.

    Args:
      signed: include the negative values (first moments) or not (second moments).
      exponent_bits: ``E``, at least 1 and at most ``total_bits - 1``.
      total_bits: ``T``, 4 or 8; the map has :math:`2^T` values.

    Differences: bitsandbytes pads a map shorter than 256 entries with zeros; this function
    never pads (the length is :math:`2^T` whenever the arguments are valid).
    """
    if total_bits not in (4, 8):
        raise ValueError(f"`total_bits` must be 4 or 8, got {total_bits!r}.")
    if not (isinstance(exponent_bits, int) and 1 <= exponent_bits <= total_bits - 1):
        raise ValueError(
            f"`exponent_bits` must be an integer in [1, {total_bits - 1}] for "
            f"total_bits={total_bits}, got {exponent_bits!r}."
        )
    non_sign = total_bits - 1
    values: list[np.ndarray] = [np.array([0.0, 1.0], _F32)]
    parts = [
        2 ** (j + non_sign - exponent_bits + (0 if signed else 1)) for j in range(exponent_bits)
    ]
    extra = 2 ** (non_sign - exponent_bits) - 1
    for j, n in [*enumerate(parts), *([(exponent_bits - 1, extra)] if extra > 0 else [])]:
        bounds = _linspace32(0.1, 1.0, n + 1)
        means = (bounds[:-1] + bounds[1:]) / _F32(2)
        magnitude = _F32(10.0 ** (j - exponent_bits + 1))
        values.append(magnitude * means)
        if signed:
            values.append(-magnitude * means)
    out = np.sort(np.concatenate(values).astype(_F32))
    if out.size != 2**total_bits:
        raise ValueError(
            f"exponent_bits={exponent_bits}, total_bits={total_bits}, signed={signed} gives "
            f"{out.size} values, not {2**total_bits}; bitsandbytes pads such a map with zeros, "
            "which this function does not. Use more exponent bits."
        )
    return out


def linear_map(levels: int, *, signed: bool = False, zero: bool = True) -> np.ndarray:
    r"""An evenly spaced map of ``levels`` float32 values ending at 1.

    ``zero=True``: :math:`k / (L - 1)` for :math:`k = 0, \dots, L - 1` (from :math:`-1` when
    ``signed``: :math:`-1 + 2k / (L - 1)`). ``zero=False``: :math:`k / L` for
    :math:`k = 1, \dots, L` (unsigned only). ``linear_map(16, zero=False)`` is torchao's map for
    4-bit second moments: without a zero code a small second moment is never stored as 0, so
    :math:`1 / \sqrt{\hat v}` never blows up (Li et al., Memory Efficient Optimizers with 4-bit
    States, 2023). ``levels`` must be 16 or 256.
    """
    if levels not in (16, 256):
        raise ValueError(f"`levels` must be 16 or 256, got {levels!r}.")
    if not zero:
        if signed:
            raise ValueError("`zero=False` needs `signed=False`: a signed linear map holds 0.")
        return (np.arange(1, levels + 1, dtype=np.float64) / levels).astype(_F32)
    k = np.arange(levels, dtype=np.float64)
    if signed:
        return (-1.0 + 2.0 * k / (levels - 1)).astype(_F32)
    return (k / (levels - 1)).astype(_F32)


def power_of_two_map(signed: bool) -> np.ndarray:
    r"""rmsjax's 4-bit maps: powers of two (16 float32 values, sorted).

    ``signed=False`` (second moments): :math:`2^{-15}, 2^{-14}, \dots, 2^{-1}, 1`, i.e. code
    :math:`c` is :math:`2^{c - 15}`; no zero, so a positive second moment is never stored as
    0, and five decades of range below the block's maximum. ``signed=True`` (first moments):
    :math:`-1, -2^{-1}, \dots, -2^{-6}, 0, 2^{-7}, 2^{-6}, \dots, 1`, i.e. code :math:`c < 7`
    is :math:`-2^{-c}`, code 7 is 0 and code :math:`c > 7` is :math:`2^{c - 15}` (the
    sixteenth value, :math:`2^{-7}`, sits on the positive side). Zero is exact, so a moment
    that is 0 stays 0 under stochastic rounding.

    Every value is a power of two (or 0): with a power-of-two block scale a code decodes by
    setting an exponent, and the code of a float is read from its exponent and mantissa bits
    (nearest: the exponent and the leading mantissa bit; stochastic: the exponent, the mantissa
    compared with random bits), see :func:`rmsjax.quantization.moment_codec`.
    """
    if signed:
        values = [-(2.0**-j) for j in range(7)] + [0.0] + [2.0 ** (c - 15) for c in range(8, 16)]
    else:
        values = [2.0 ** (c - 15) for c in range(16)]
    return np.asarray(values, _F32)
