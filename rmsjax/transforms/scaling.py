r"""Step sizes: :func:`scale`, :func:`scale_by_schedule`, :func:`scale_by_learning_rate`.

The states are optax's own classes (``ScaleState`` is ``optax.ScaleState``, an
``optax.EmptyState``; ``ScaleByScheduleState`` is ``optax.ScaleByScheduleState``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from rmsjax._types import ScalarOrSchedule, Schedule
from rmsjax.moments import moment_transform
from rmsjax.validation import (
    check_in_range,
    check_learning_rate,
)

__all__ = [
    "ScaleByScheduleState",
    "ScaleState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
]


ScaleState = optax.ScaleState
"""State of :func:`scale`: ``optax.ScaleState`` (an empty ``optax.EmptyState``)."""

ScaleByScheduleState = optax.ScaleByScheduleState
"""State of :func:`scale_by_schedule`: ``optax.ScaleByScheduleState(count)``, the number of
updates done so far (int32)."""


def _scale_rule(g: jax.Array, step_size: ArrayLike) -> tuple[jax.Array]:
    if jnp.iscomplexobj(step_size) and not jnp.iscomplexobj(g):
        step_size = jnp.real(step_size)  # complex-typed, real-valued (inject_hyperparams)
    return (jnp.asarray(step_size, dtype=g.dtype) * g,)


def scale(step_size: ArrayLike) -> optax.GradientTransformation:
    r"""Multiply updates by a fixed ``step_size``: :math:`u = s\,g`.

    Args:
      step_size: any finite real number (traced values allowed; a schedule is a
        ``TypeError``: use :func:`scale_by_schedule`).

    Same as ``optax.scale``, with the same state (``optax.ScaleState``); as there, ``update``
    ignores the state it is given and returns it unchanged.
    """
    check_in_range("step_size", step_size)
    return moment_transform(
        "scale",
        _scale_rule,
        state=ScaleState,
        step_args=lambda _: dict(step_size=step_size),
        stage="scale",
    )


def scale_by_schedule(step_size_fn: Schedule) -> optax.GradientTransformation:
    r"""Multiply updates by ``step_size_fn(count)``, count = 0, 1, 2, ... (int32).

    :math:`u_t = s(t - 1)\,g_t`. Same as ``optax.scale_by_schedule``, with the same state
    (``optax.ScaleByScheduleState(count)``).

    Args:
      step_size_fn: a callable ``count -> step size`` (any real value, jit-safe); a
        non-callable raises ``TypeError``.
    """
    if not callable(step_size_fn):
        raise TypeError(
            f"`step_size_fn` must be a callable schedule count -> step size, got {step_size_fn!r}."
        )

    return moment_transform(
        "scale_by_schedule",
        _scale_rule,
        state=ScaleByScheduleState,
        step_args=lambda count: dict(step_size=step_size_fn(count)),
        stage="scale",
    )


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule | None = None, *, flip_sign: bool = True
) -> optax.GradientTransformation:
    r"""Multiply updates by :math:`-\eta` (or :math:`+\eta` when ``flip_sign=False``).

    Args:
      learning_rate: a non-negative finite float, a traced scalar, or a schedule
        ``count -> lr`` evaluated at 0, 1, 2, ...; ``None`` means no scaling (identity), as
        in optax. (The optimizers reject ``None``: with it they would climb the gradient.)
      flip_sign: negate the learning rate (descent), the default.

    Same as ``optax.scale_by_learning_rate`` (same states: ``optax.ScaleState`` for a number,
    ``optax.ScaleByScheduleState`` for a schedule), plus a ``ValueError`` / ``TypeError`` for a
    concrete ``learning_rate`` that is negative, non-finite or not a real number.
    """
    if learning_rate is None:
        return optax.identity()
    sign = -1 if flip_sign else 1
    if callable(learning_rate):
        schedule = learning_rate
        return scale_by_schedule(lambda count: sign * schedule(count))
    check_learning_rate("learning_rate", learning_rate)
    return scale(sign * learning_rate)
