r"""Momentum buffers: :func:`trace` (optax's heavy-ball / Nesterov) and :func:`dampened_trace`
(PyTorch SGD's, with dampening and a copied first step). Notation as in :mod:`rmsjax.transforms`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike, DTypeLike

from rmsjax.moments import Moment, document_storage, moment_transform
from rmsjax.storage import Storage
from rmsjax.validation import check_in_range

__all__ = [
    "DampenedTraceState",
    "TraceState",
    "dampened_trace",
    "trace",
]


TraceState = optax.TraceState
"""State of :func:`trace`: ``optax.TraceState(trace)``, the momentum buffer."""


def _trace_rule(
    g: jax.Array, m: jax.Array, *, decay: ArrayLike, nesterov: bool
) -> tuple[jax.Array, jax.Array]:
    m = g + decay * m
    return (g + decay * m if nesterov else m), m


@document_storage
def trace(
    decay: ArrayLike,
    nesterov: bool = False,
    accumulator_dtype: DTypeLike | Storage | None = None,
    *,
    promote_half: bool = True,
) -> optax.GradientTransformation:
    r"""Heavy-ball momentum: :math:`m_t = g_t + \beta\,m_{t-1}`, :math:`u_t = m_t`.

    With ``nesterov=True``, :math:`u_t = g_t + \beta\,m_t`. There is no dampening: this is the
    undamped buffer of optax and of torch's SGD with ``dampening=0``.

    Args:
      decay: :math:`\beta`, in [0, 1].
      nesterov: use Nesterov's look-ahead form.
      accumulator_dtype: storage of :math:`m`: {storage}.
      promote_half: see :func:`scale_by_rms`.

    Differences from ``optax.trace``: half precision buffers are float32 by default, and the
    update has the gradient's dtype (optax returns the buffer's dtype). State: optax's own
    ``TraceState(trace)``; an integer or boolean ``accumulator_dtype`` is rejected, and
    integer/boolean parameters get a buffer in the default float dtype.

    Numerics: the buffer sums the gradients with weights up to :math:`1/(1-\beta)`, so it
    overflows to :math:`\pm\infty` only when that sum is beyond the largest float (float32:
    :math:`|g| > (1-\beta) \cdot 3.4 \cdot 10^{38}` sustained); the arithmetic is exact
    otherwise.
    """
    check_in_range("decay", decay, low=0.0, high=1.0)
    return moment_transform(
        "trace",
        _trace_rule,
        [Moment("trace", accumulator_dtype, argument="accumulator_dtype")],
        state=TraceState,
        step_args=lambda _: dict(decay=decay, nesterov=nesterov),
        promote_half=promote_half,
        stage="trace",
    )


class DampenedTraceState(NamedTuple):
    """State of :func:`dampened_trace`: update count (int32) and the momentum buffer."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    trace: Any


def _dampened_trace_rule(
    g: jax.Array,
    b: jax.Array,
    *,
    first: jax.Array,
    decay: ArrayLike,
    dampening: ArrayLike,
    nesterov: bool,
) -> tuple[jax.Array, jax.Array]:
    b = jnp.where(first, g, decay * b + (1 - dampening) * g)
    return (g + decay * b if nesterov else b), b


@document_storage
def dampened_trace(
    decay: ArrayLike,
    dampening: ArrayLike = 0.0,
    nesterov: bool = False,
    accumulator_dtype: DTypeLike | Storage | None = None,
    *,
    promote_half: bool = True,
) -> optax.GradientTransformation:
    r"""PyTorch's SGD momentum buffer, with dampening.

    .. math::
      b_1 = g_1, \qquad b_t = \mu\,b_{t-1} + (1 - d)\,g_t \ (t > 1), \qquad
      u_t = b_t \ \text{ or (Nesterov) } \ u_t = g_t + \mu\,b_t

    Args:
      decay: :math:`\mu`, in [0, 1].
      dampening: :math:`d`, in [0, 1]. The first step is never dampened (torch copies the
        gradient into the new buffer).
      nesterov: Nesterov's look-ahead form (torch requires ``dampening == 0`` for it; this
        transformation accepts any value).
      accumulator_dtype: storage of :math:`b`: {storage}.
      promote_half: see :func:`rmsjax.scale_by_rms`.

    With ``dampening=0`` this is :func:`rmsjax.trace` (optax's ``trace``) with one extra
    count. Differences from torch: the "first step" is counted per transformation, not per
    parameter, so a leaf whose gradient is ``None`` on step 1 is not copied later.
    """
    check_in_range("decay", decay, low=0.0, high=1.0)
    check_in_range("dampening", dampening, low=0.0, high=1.0)

    def step_args(count: Any) -> dict[str, Any]:
        return dict(first=count == 0, decay=decay, dampening=dampening, nesterov=nesterov)

    return moment_transform(
        "dampened_trace",
        _dampened_trace_rule,
        [Moment("trace", accumulator_dtype, argument="accumulator_dtype")],
        state=DampenedTraceState,
        step_args=step_args,
        promote_half=promote_half,
    )
