"""Construction-time checks of hyperparameters.

A hyperparameter is one real number: a Python ``int``/``float``, a NumPy or JAX real scalar,
or a 0-d NumPy/JAX array. Anything else (``None`` where it has no documented meaning, strings,
bools, complex numbers, lists, arrays with several elements) is rejected when the
transformation is built, with an error naming the argument, its value and the valid range.
Traced values (inside ``jax.jit``, or the arrays ``optax.inject_hyperparams`` passes when the
step is jitted) are never inspected, so checking can never break tracing; schedules
(callables) are accepted unevaluated where the argument takes one, and rejected elsewhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import types
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "argument_names",
    "check_decay",
    "check_float_dtype",
    "check_in_range",
    "check_learning_rate",
    "check_nonneg",
    "display_name",
    "is_concrete",
]

_NAMES: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "rmsjax_argument_names", default=types.MappingProxyType({})
)


@contextlib.contextmanager
def argument_names(names: Mapping[str, str]) -> Iterator[None]:
    """Inside the block, errors call an argument by the name a framework preset gives it.

    A preset such as ``rmsjax.compat.keras.adam`` builds its chain from rmsjax transforms, and
    the transforms validate their own arguments (each range is written once, there). Wrapping
    the construction in ``with argument_names({"eps": "epsilon", "b1": "beta_1"}):`` makes a
    bad ``epsilon`` reported as ``epsilon``, the name the user typed. Nested blocks compose:
    the inner mapping is applied first, then the outer one.
    """
    outer = _NAMES.get()
    merged = {k: outer.get(v, v) for k, v in names.items()}
    merged.update({k: v for k, v in outer.items() if k not in merged})
    token = _NAMES.set(merged)
    try:
        yield
    finally:
        _NAMES.reset(token)


def display_name(name: str) -> str:
    """``name`` as the user knows it (see :func:`argument_names`)."""
    return _NAMES.get().get(name, name)


def is_int(value: Any) -> bool:
    """True for a Python or NumPy integer (not a bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_concrete(value: Any) -> bool:
    """True when ``value`` can be read on the host: not None, a tracer or a callable."""
    return not (value is None or callable(value) or isinstance(value, jax.core.Tracer))


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{lo}, {hi}{right}"


def _real_scalar(name: str, value: Any, expected: str) -> float:
    """``value`` as a Python float, or a ``TypeError``/``ValueError`` saying what it is.

    Accepted: Python ``int``/``float`` (not ``bool``), NumPy and JAX real scalars, and 0-d
    NumPy/JAX arrays of an integer or floating dtype. A complex value is accepted only with an
    imaginary part of exactly 0: ``optax.inject_hyperparams`` hands the hyperparameters over in
    the parameters' widest dtype, complex64 for a complex model. Everything else (``None``,
    strings, which NumPy would silently parse, bools, complex numbers, lists, arrays with more
    than one element) is rejected: a hyperparameter is one real number.
    """
    got = f"got {value!r} of type {type(value).__name__}"
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be {expected}, {got}: a bool is not a number.")
    if isinstance(value, numbers.Number) and not isinstance(value, np.generic):
        arr = np.asarray(value)  # Python int/float/complex, Fraction, ...
        if arr.dtype == object:  # an int beyond the float range, or an exotic number type
            try:
                return float(value)  # type: ignore[arg-type]
            except (OverflowError, TypeError):
                return math.inf if value > 0 else -math.inf  # type: ignore[operator]
    elif isinstance(value, np.ndarray | np.generic | jax.Array):
        arr = np.asarray(value)
    else:
        raise TypeError(f"`{name}` must be {expected}, {got}.")
    dtype = arr.dtype
    if arr.ndim != 0:
        raise ValueError(
            f"`{name}` must be {expected}, got an array of shape {arr.shape}: "
            "hyperparameters are scalars (one value for every parameter)."
        )
    if jnp.issubdtype(dtype, jnp.complexfloating):
        if arr.imag != 0:
            raise TypeError(f"`{name}` must be {expected}, {got}: a complex number is not real.")
        arr = arr.real
    elif not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"`{name}` must be {expected}, {got} (dtype {dtype}).")
    return float(arr)


def check_in_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    schedule: bool = False,
    hint: str = "",
) -> None:
    """Raise unless ``value`` is one finite real number in the interval (or is traced).

    The interval is ``[low, high]`` with each end made open by ``low_open`` / ``high_open``; a
    ``None`` end is unbounded. ``schedule=True`` also accepts a callable (a schedule
    ``count -> value``, not evaluated); elsewhere a callable is a ``TypeError``.

    Raises:
      TypeError: ``value`` is not a real number: ``None``, a string, a bool, a complex
        number, a list, an array of a non-numeric dtype, or a callable where no schedule is
        allowed.
      ValueError: ``value`` is an array with more than one element, or is NaN, infinite or
        outside the interval.

    Tracers (inside ``jax.jit``, or what ``optax.inject_hyperparams`` passes under jit) pass
    unchecked; concrete NumPy and JAX scalars are checked like Python numbers. The message
    names the argument as the user typed it (see :func:`argument_names`).
    """
    if isinstance(value, jax.core.Tracer):
        return
    name = display_name(name)
    interval = _describe(low, high, low_open, high_open)
    expected = f"a finite real number in {interval}" + (" or a schedule" if schedule else "")
    if callable(value):
        if schedule:
            return
        raise TypeError(
            f"`{name}` must be {expected}, got the callable {value!r}: only learning rates "
            "and weight decays take a schedule."
        )
    x = _real_scalar(name, value, expected)
    bad = not math.isfinite(x)
    if low is not None:
        bad |= (x <= low) if low_open else (x < low)
    if high is not None:
        bad |= (x >= high) if high_open else (x > high)
    if bad:
        raise ValueError(
            f"`{name}` must be {expected}, got {value!r}." + (f" {hint}" if hint else "")
        )


def check_decay(name: str, value: Any) -> None:
    """A moving-average decay rate: in [0, 1)."""
    check_in_range(
        name,
        value,
        low=0.0,
        high=1.0,
        high_open=True,
        hint="It is the decay rate of a moving average; 1 would never forget (use AdaGrad).",
    )


def check_nonneg(name: str, value: Any, *, schedule: bool = False) -> None:
    """A finite number >= 0 (or a schedule, when ``schedule``)."""
    check_in_range(name, value, low=0.0, schedule=schedule)


def check_learning_rate(name: str, value: Any) -> None:
    """A learning rate: a finite number >= 0, or a schedule (callable, not evaluated).

    ``None`` is rejected with a ``ValueError``: ``optax.scale_by_learning_rate(None)`` is the
    identity, so an optimizer built with it would step UP the gradient.
    """
    if value is None:
        raise ValueError(
            f"`{display_name(name)}` is None; pass a learning rate: a non-negative number "
            "(e.g. 1e-3) or a schedule `count -> rate`. (None would mean no scaling at all, "
            "and the optimizer would climb the gradient instead of descending it.)"
        )
    check_in_range(
        name,
        value,
        low=0.0,
        schedule=True,
        hint="Pass a non-negative step size or a schedule (a callable).",
    )


def check_float_dtype(name: str, dtype: Any) -> None:
    """A state dtype (``mu_dtype``, ``accumulator_dtype``): ``None`` or a floating dtype.

    Moments are averages of gradients; in an integer or boolean dtype they round to nothing.
    """
    if dtype is None:
        return
    name = display_name(name)
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"`{name}` must be None or a floating dtype, got {dtype!r}.") from err
    if not jnp.issubdtype(dt, jnp.inexact):
        raise ValueError(
            f"`{name}` must be None or a floating dtype (e.g. jnp.float32, jnp.bfloat16), got "
            f"{dt}: a moment stored as {dt} rounds every update away."
        )
