r"""Step sizes: :func:`scale`, :func:`scale_by_schedule`, :func:`scale_by_learning_rate`.

The states are optax's own classes (``ScaleState`` is ``optax.ScaleState``, an
``optax.EmptyState``; ``ScaleByScheduleState`` is ``optax.ScaleByScheduleState``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from rmsjax._numerics import (
    increment,
    zero_count,
)
from rmsjax._types import ScalarOrSchedule, Schedule
from rmsjax.tree import check_state, map_rule
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

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params  # stateless, as optax's: any state is accepted and returned unchanged
        out, _ = map_rule(lambda g: _scale_rule(g, step_size), updates)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


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

    def init_fn(params: Any) -> Any:
        del params
        return ScaleByScheduleState(count=zero_count())

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        check_state(state, ScaleByScheduleState, "scale_by_schedule")
        step_size = step_size_fn(state.count)
        out, _ = map_rule(lambda g: _scale_rule(g, step_size), updates)
        return out, ScaleByScheduleState(count=increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


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
