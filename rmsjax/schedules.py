r"""Learning-rate schedules: functions ``count -> value``, count = 0, 1, 2, ... (int32).

Pass one wherever rmsjax takes a ``learning_rate`` (or a ``weight_decay``): the optimizer
evaluates it at the number of updates done so far, so the first update uses ``schedule(0)``.
All values are jit-safe (``count`` may be traced).

Where optax has the schedule, rmsjax re-exports optax's own function (same object, same
numbers); only :func:`inverse_time_decay`, which optax lacks, is written here.

================================  =========================================================
``constant_schedule(v)``          :math:`v`
``exponential_decay(...)``        :math:`v_0\,r^{(t - t_0)/T}` (``staircase``: floor the
                                  exponent, i.e. "multiply by r every T steps")
``inverse_time_decay(...)``       :math:`v_0 / (1 + r\,t/T)` (``staircase``: floor ``t/T``)
``polynomial_schedule(...)``      :math:`(v_0 - v_1)(1 - (t - t_0)/T)^p + v_1`
``cosine_decay_schedule(...)``    half a cosine from :math:`v_0` to :math:`\alpha v_0`
``warmup_cosine_decay_schedule``  linear warm-up, then cosine decay
``piecewise_constant_schedule``   :math:`v_0` times the product of the scales whose boundary
                                  has been passed
``join_schedules(...)``           one schedule after another, at the given boundaries
================================  =========================================================
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from optax import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    piecewise_constant_schedule,
    polynomial_schedule,
    warmup_cosine_decay_schedule,
)

from rmsjax._types import Schedule
from rmsjax.validation import check_in_range

__all__ = [
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "inverse_time_decay",
    "join_schedules",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "warmup_cosine_decay_schedule",
]


def inverse_time_decay(
    init_value: ArrayLike,
    decay_rate: ArrayLike,
    decay_steps: ArrayLike,
    staircase: bool = False,
) -> Schedule:
    r"""The :math:`1/t` decay: :math:`\eta_t = \eta_0 / (1 + r\,t / T)`.

    .. math::
      \eta(t) = \frac{\eta_0}{1 + r\,\tau}, \qquad
      \tau = t / T \quad\text{or}\quad \tau = \lfloor t / T \rfloor \text{ when staircase}

    At :math:`t = T` the rate is :math:`\eta_0 / (1 + r)`; for large :math:`t` it falls like
    :math:`\eta_0 T / (r t)`, the classic stochastic-approximation decay. Keras'
    ``InverseTimeDecay`` and TF1's ``inverse_time_decay`` compute the same values (both count
    steps from 0 too); optax has no such schedule.

    Args:
      init_value: :math:`\eta_0`, any finite number (the value at count 0).
      decay_rate: :math:`r`, >= 0 (0 gives a constant schedule).
      decay_steps: :math:`T`, > 0, the number of steps over which :math:`\tau` grows by 1.
      staircase: floor :math:`t / T`, so the value drops only every ``decay_steps`` steps.

    Returns:
      A function ``count -> value``, jit-safe (``count`` may be a traced int array). The value
      is computed in float32 (float64 when x64 is enabled).

    Raises:
      ValueError: for a concrete non-finite ``init_value``, a negative ``decay_rate`` or a
        non-positive ``decay_steps`` (traced values are not checked).

    Example:
      >>> import rmsjax
      >>> lr = rmsjax.inverse_time_decay(0.1, decay_rate=0.5, decay_steps=1000)
      >>> [round(float(lr(t)), 4) for t in (0, 1000, 2000)]  # 0.1 / (1 + 0.5 t / 1000)
      [0.1, 0.0667, 0.05]
      >>> stairs = rmsjax.inverse_time_decay(0.1, 0.5, 1000, staircase=True)
      >>> [round(float(stairs(t)), 4) for t in (999, 1000, 1999)]
      [0.1, 0.0667, 0.0667]
    """
    check_in_range("init_value", init_value)
    check_in_range(
        "decay_rate", decay_rate, low=0.0, hint="A negative rate would grow without bound."
    )
    check_in_range("decay_steps", decay_steps, low=0.0, low_open=True)

    def schedule(count: ArrayLike) -> jax.Array:
        tau = jnp.asarray(count, dtype=float) / decay_steps
        if staircase:
            tau = jnp.floor(tau)
        return cast(jax.Array, init_value / (1 + decay_rate * tau))

    return schedule
