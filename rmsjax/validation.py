"""Construction-time checks of hyperparameters.

A value is checked only when it is concrete: a Python number, a NumPy array or a concrete
``jax.Array``. Traced values (inside ``jax.jit``, or the arrays ``optax.inject_hyperparams``
passes when the step is jitted) and schedules (callables) are never inspected, so checking can
never break tracing.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

__all__ = [
    "argument_names",
    "check_decay",
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


def is_concrete(value: Any) -> bool:
    """True when ``value`` can be read on the host: not None, a tracer or a callable."""
    return not (value is None or callable(value) or isinstance(value, jax.core.Tracer))


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{lo}, {hi}{right}"


def check_in_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """Raise ``ValueError`` if a concrete ``value`` is non-finite or outside the interval.

    The interval is ``[low, high]`` with each end made open by ``low_open`` / ``high_open``; a
    ``None`` end is unbounded. Every element of an array value is checked. Traced values and
    schedules pass unchecked.
    """
    if not is_concrete(value):
        return
    name = display_name(name)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`{name}` must be a real number (or a schedule where one is allowed), "
            f"got {value!r} of type {type(value).__name__}."
        ) from err
    interval = _describe(low, high, low_open, high_open)
    bad = ~np.isfinite(arr)
    if low is not None:
        bad |= (arr <= low) if low_open else (arr < low)
    if high is not None:
        bad |= (arr >= high) if high_open else (arr > high)
    if np.any(bad):
        first_bad = arr[bad].ravel()[0].item()
        shown = repr(arr.item()) if arr.ndim == 0 else f"an array holding {first_bad!r}"
        raise ValueError(
            f"`{name}` must be a finite number in {interval}, got {shown}."
            + (f" {hint}" if hint else "")
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


def check_nonneg(name: str, value: Any) -> None:
    """A finite number >= 0."""
    check_in_range(name, value, low=0.0)


def check_learning_rate(name: str, value: Any) -> None:
    """A learning rate: a finite number >= 0, or a schedule (callable, not checked)."""
    check_in_range(
        name, value, low=0.0, hint="Pass a non-negative step size or a schedule (a callable)."
    )
