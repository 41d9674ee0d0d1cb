"""Small numerical kernels shared by the per-array update rules (one array at a time).

Each function here is the single definition of a piece of arithmetic that several rules use:
the modulus squared, the moving average, the guarded divisions, the bias corrections and the
saturating step counter. The transformations in :mod:`rmsjax.transforms` and the fused step in
:mod:`rmsjax.fused` both call them, so the two paths cannot compute a constant differently.
"""

from __future__ import annotations

import math
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from rmsjax.validation import is_concrete

__all__ = [
    "abs_sq",
    "cast_to",
    "debias",
    "ema",
    "increment",
    "is_positive",
    "moment_div",
    "precise_debias",
    "rms_scale",
    "safe_div",
    "safe_rsqrt_scale",
    "select",
    "unbias",
    "zero_count",
]


def abs_sq(x: jax.Array) -> jax.Array:
    """:math:`|x|^2` as a real array (``x * x`` for real ``x``)."""
    if jnp.iscomplexobj(x):
        return jnp.real(x) ** 2 + jnp.imag(x) ** 2
    return x * x


def cast_to(x: ArrayLike, dtype: Any) -> jax.Array:
    """``x`` as an array of ``dtype`` (nothing emitted when it has it already).

    A complex ``x`` cast to a real dtype keeps its real part: a real quantity computed with
    complex-typed hyperparameters (``optax.inject_hyperparams`` hands them over as complex64,
    imaginary part 0, for a complex model) is real.
    """
    x = jnp.asarray(x)
    dtype = jnp.dtype(dtype)
    if x.dtype == dtype:
        return x
    if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = jnp.real(x)
    return x.astype(dtype)


def ema(new: jax.Array, old: jax.Array, decay: ArrayLike) -> jax.Array:
    """Exponential moving average ``(1 - decay) * new + decay * old`` (optax's operand order)."""
    # (cast: with an ArrayLike decay the type checker also sees NumPy results; the rules
    # always pass jax arrays, so the result is one)
    return cast(jax.Array, (1 - decay) * new + decay * old)


def select(ok: jax.Array, x: jax.Array, fill: float) -> jax.Array:
    """``where(ok, x, fill)``; a bare ``lax.select`` when shapes agree, which keeps the traced
    program (and so the compile time of trees with thousands of leaves) small."""
    if ok.shape != jnp.shape(x):
        return jnp.where(ok, x, fill)
    return jax.lax.select(ok, x, jax.lax.full_like(x, fill))


def safe_div(num: jax.Array, den: jax.Array, *, den_positive: bool = False) -> jax.Array:
    """``num / den``, and 0 where ``den == 0`` (no NaN/Inf from 0/0 or x/0, gradients too).

    A NaN divisor still gives NaN (a broken run must not look healthy). ``den_positive=True``
    says the caller knows ``den > 0`` (e.g. it adds a concrete positive eps): plain division.
    """
    if den_positive:
        return num / den
    ok = den != 0
    return select(ok, num / select(ok, den, 1), 0)


def moment_div(
    num: jax.Array, den: jax.Array, g: jax.Array, *, den_positive: bool = False
) -> jax.Array:
    """:func:`safe_div` for a first moment over the root of a second one (the Adam forms).

    Where the divisor is ``+inf`` (the second moment overflowed: float32 :math:`|g| \\ge
    2^{64}`) and the gradient ``g`` is finite, the result is 0, the documented zero step, even
    when the bias-corrected numerator overflowed too (``inf / inf`` would be NaN). A NaN or
    infinite gradient still gives NaN.
    """
    out = safe_div(num, den, den_positive=den_positive)
    return jnp.where((den == jnp.inf) & jnp.isfinite(g), 0, out)


def safe_rsqrt_scale(g: jax.Array, den2: jax.Array, *, den_positive: bool = False) -> jax.Array:
    """``g / sqrt(den2)`` computed as ``g * rsqrt(den2)``, and 0 where ``den2 == 0``."""
    if den_positive:
        return g * jax.lax.rsqrt(den2)
    ok = den2 != 0
    return select(ok, g * jax.lax.rsqrt(select(ok, den2, 1)), 0)


def is_positive(value: Any) -> bool:
    """True when ``value`` is concrete (not traced, not a schedule) and every element is > 0."""
    return is_concrete(value) and bool(np.all(np.asarray(value) > 0))


def rms_scale(g: jax.Array, second: jax.Array, eps: ArrayLike, *, eps_in_sqrt: bool) -> jax.Array:
    """Divide ``g`` by ``sqrt(second + eps)`` or by ``sqrt(second) + eps`` (``second >= 0``).

    A zero divisor (only possible with ``eps = 0``) gives 0; with a concrete ``eps > 0`` the
    divisor cannot be zero and no guard is emitted (same numbers, smaller program).
    """
    if eps_in_sqrt:
        return safe_rsqrt_scale(g, second + eps, den_positive=is_positive(eps))
    return safe_div(g, jnp.sqrt(second) + eps, den_positive=is_positive(eps))


def debias(decay: ArrayLike, count: jax.Array) -> jax.Array:
    """``1 - decay**count``: what a zero-started EMA is divided by to remove its bias."""
    return cast(jax.Array, 1 - decay**count)


def unbias(moment: jax.Array, correction: ArrayLike | None) -> jax.Array:
    """``moment / correction`` (see :func:`debias`); ``None`` means no correction."""
    return moment if correction is None else moment / correction


def increment(count: jax.Array) -> jax.Array:
    """``count + 1`` saturating at the int32 maximum instead of wrapping around."""
    top = jnp.iinfo(jnp.int32).max
    return jnp.where(count < top, count + 1, top).astype(jnp.int32)


def zero_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def precise_debias(decay: ArrayLike, count: jax.Array) -> jax.Array:
    r""":math:`1 - \beta^t` to the precision of the compute dtype, as ``-expm1(t log beta)``.

    ``1 - beta**t`` in float32 loses up to :math:`10^{-5}` relative for :math:`\beta = 0.999`:
    ``0.999`` itself rounds to ``0.99900001`` in float32, and the subtraction cancels. Here
    :math:`\log\beta` of a concrete :math:`\beta` is taken on the host in float64 (PyTorch
    computes the whole correction on the host in float64); a traced :math:`\beta` falls back
    to ``jnp.log`` in the compute dtype.

    Args:
      decay: :math:`\beta`, in [0, 1) (validated by the transformations that call this).
      count: :math:`t`, the int32 step count after increment (>= 1).
    """
    if is_concrete(decay):
        d = float(np.asarray(decay))
        log_decay: Any = math.log(d) if d > 0 else -math.inf
    else:
        log_decay = jnp.log(decay)
    return -jnp.expm1(count * log_decay)
