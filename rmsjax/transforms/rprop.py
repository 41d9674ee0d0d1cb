r"""Resilient backpropagation: :func:`scale_by_rprop`, as ``torch.optim.Rprop`` runs it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from rmsjax._numerics import zero_count
from rmsjax._types import ScalarOrSchedule
from rmsjax.moments import Moment, moment_transform
from rmsjax.validation import (
    check_in_range,
    check_learning_rate,
    display_name,
    is_concrete,
)

__all__ = [
    "ScaleByRpropState",
    "scale_by_rprop",
]


ScaleByRpropState = optax.ScaleByRpropState
"""State of :func:`scale_by_rprop`: ``optax.ScaleByRpropState(step_sizes, prev_updates)``, the
per-element step sizes and the previous gradient.

``prev_updates`` holds the previous incoming update (gradient), set to 0 where its sign
flipped (optax stores its signed step there instead; the layout is the same); for complex
leaves both arrays hold the real and imaginary parts' values.
"""


def _rprop_real_rule(
    g: jax.Array,
    step: jax.Array,
    prev: jax.Array,
    *,
    eta_minus: ArrayLike,
    eta_plus: ArrayLike,
    min_step_size: ArrayLike,
    max_step_size: ArrayLike,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    sign = jnp.sign(g * prev)
    factor = jnp.where(sign > 0, eta_plus, jnp.where(sign < 0, eta_minus, 1))
    step = jnp.clip(step * factor.astype(step.dtype), min_step_size, max_step_size)
    g = jnp.where(sign < 0, 0, g)
    return jnp.sign(g) * step, step, g


def _rprop_rule(
    g: jax.Array, step: jax.Array, prev: jax.Array, **hyper: ArrayLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
    if not jnp.iscomplexobj(g):
        return _rprop_real_rule(g, step, prev, **hyper)
    # Complex: the real and imaginary parts are independent reals (torch's view_as_real).
    re = _rprop_real_rule(jnp.real(g), jnp.real(step), jnp.real(prev), **hyper)
    im = _rprop_real_rule(jnp.imag(g), jnp.imag(step), jnp.imag(prev), **hyper)
    return tuple(jax.lax.complex(a, b) for a, b in zip(re, im, strict=True))  # type: ignore[return-value]


def _check_rprop_args(
    learning_rate: Any,
    eta_minus: Any,
    eta_plus: Any,
    min_step_size: Any,
    max_step_size: Any,
) -> None:
    check_learning_rate("learning_rate", learning_rate)
    check_in_range(
        "eta_minus",
        eta_minus,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        hint="It shrinks the step after a sign flip (torch's etas[0], typically 0.5).",
    )
    check_in_range(
        "eta_plus",
        eta_plus,
        low=1.0,
        low_open=True,
        hint="It grows the step while the sign holds (torch's etas[1], typically 1.2).",
    )
    check_in_range("min_step_size", min_step_size, low=0.0, low_open=True)
    check_in_range("max_step_size", max_step_size, low=0.0, low_open=True)
    if is_concrete(min_step_size) and is_concrete(max_step_size):
        lo, hi = np.asarray(min_step_size, np.float64), np.asarray(max_step_size, np.float64)
        if np.any(lo > hi):
            low, high = display_name("min_step_size"), display_name("max_step_size")
            raise ValueError(
                f"`{low}` ({min_step_size!r}) must not exceed `{high}` ({max_step_size!r}): "
                f"the step sizes are clipped to [{low}, {high}]."
            )


def scale_by_rprop(
    learning_rate: ScalarOrSchedule,
    eta_minus: ArrayLike = 0.5,
    eta_plus: ArrayLike = 1.2,
    min_step_size: ArrayLike = 1e-6,
    max_step_size: ArrayLike = 50.0,
    *,
    promote_half: bool = True,
) -> optax.GradientTransformation:
    r"""Resilient backpropagation (Riedmiller & Braun 1993), as ``torch.optim.Rprop`` runs it.

    Each element has its own step size :math:`\delta`, starting at ``learning_rate``; only the
    sign of the gradient is used. On every step, the first included, with :math:`g_{t-1}` the
    stored previous gradient (0 at the start):

    .. math::
      s_t = \operatorname{sign}(g_t\,g_{t-1}), \qquad
      \delta_t = \operatorname{clip}\big(\delta_{t-1} \cdot
      (\eta_+ \text{ if } s_t > 0,\ \eta_- \text{ if } s_t < 0,\ 1 \text{ if } s_t = 0),
      \ \delta_{min},\ \delta_{max}\big)

      \tilde g_t = 0 \text{ where } s_t < 0 \text{ else } g_t, \qquad
      u_t = \operatorname{sign}(\tilde g_t)\,\delta_t, \qquad g_{t-1} \leftarrow \tilde g_t

    So a step grows while the gradient keeps its sign, shrinks and is skipped when the sign
    flips (and the next step is then taken without comparison). Like every ``scale_by_*``
    transform the output is not yet negated: chain it with ``scale(-1)`` to descend, as
    :func:`rmsjax.rprop` does (the parameter moves by :math:`-\operatorname{sign}(\tilde
    g_t)\,\delta_t`).

    Args:
      learning_rate: :math:`\delta_0`, >= 0 (clipped into :math:`[\delta_{min}, \delta_{max}]`
        on the first step). A schedule is accepted and evaluated once, at count 0, to seed the
        step sizes: Rprop adapts its own steps, and torch's lr schedulers likewise have no
        effect after the first step.
      eta_minus: :math:`\eta_-`, in (0, 1).
      eta_plus: :math:`\eta_+`, > 1.
      min_step_size: :math:`\delta_{min}`, > 0.
      max_step_size: :math:`\delta_{max}`, > 0 and >= ``min_step_size``.
      promote_half: keep the state of float16/bfloat16 leaves in float32 (default).

    Numerics: like torch, the sign comparison multiplies the two gradients; a product below the
    smallest normal float (:math:`1.2 \cdot 10^{-38}` in float32, whose denormals XLA flushes
    to zero) counts as :math:`s_t = 0`, so such tiny gradients keep their step size instead of
    growing or shrinking it. Updates are always finite (:math:`\pm\delta_t` or 0).

    Complex leaves: the real and imaginary parts are treated as independent real parameters,
    each with its own step size (torch's behaviour); both are stored in one complex array.

    Differences from ``optax.scale_by_rprop`` (same signature and sign convention): optax
    emits each step one call late, so its first update is 0 and every later one belongs to
    the previous gradient; it also skips the clip when :math:`s_t = 0`, so a ``learning_rate``
    outside :math:`[\delta_{min}, \delta_{max}]` is used unclipped; and it fails on complex
    leaves inside ``jnp.clip``. rmsjax follows the published algorithm as torch implements it.
    The state has optax's layout, ``ScaleByRpropState(step_sizes, prev_updates)`` (rmsjax
    stores the previous gradient in ``prev_updates``), so an optax state restores into it.
    """
    _check_rprop_args(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size)
    lr = learning_rate(zero_count()) if callable(learning_rate) else learning_rate
    hyper = dict(
        eta_minus=eta_minus,
        eta_plus=eta_plus,
        min_step_size=min_step_size,
        max_step_size=max_step_size,
    )
    return moment_transform(
        "scale_by_rprop",
        _rprop_rule,
        [Moment("step_sizes", fill=lr, both_parts=True), Moment("prev_updates")],
        state=ScaleByRpropState,
        step_args=lambda _: hyper,
        promote_half=promote_half,
    )
