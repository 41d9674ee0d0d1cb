r"""``keras.optimizers`` (Keras 3), reproduced as optax-protocol transformations.

Each function takes the Keras class's own argument names and defaults and returns an optax
``GradientTransformation`` that, fed the same gradients, walks the same parameter trajectory
as the Keras optimizer (checked against stored Keras trajectories in ``tests/test_compat.py``;
the generator is ``tests/reference/generate.py``).

Porting notes that hold for every preset:

* ``epsilon`` is added INSIDE the square root (RMSprop, Adagrad, Adadelta), and Adam uses the
  "epsilon hat" form (see :func:`adam`). Keras' defaults (1e-7) are not torch's or optax's.
* ``learning_rate`` sits INSIDE the momentum buffers (RMSprop, SGD): ``m = momentum * m +
  lr * step``. With a constant rate that equals torch's placement; with a schedule it does not.
  ``learning_rate`` may be a schedule ``count -> lr`` (count 0, 1, 2, ..., like a Keras
  ``LearningRateSchedule`` called with ``optimizer.iterations``).
* ``weight_decay`` (every optimizer) is decoupled and scaled by the learning rate: Keras runs
  ``param -= param * weight_decay * lr`` before the update; here
  :func:`rmsjax.decoupled_weight_decay` is the last link of the chain (same numbers).
  ``weight_decay=None`` (the default except for AdamW) adds nothing.
* Keras keeps the learning rate in a float32 variable. For float64 parameters its steps
  therefore use ``float32(learning_rate)``; pass that value to reproduce Keras in float64.
* A ``momentum`` given as the Python number 0 keeps no buffer (as in Keras); an array or traced
  value always keeps one, with identical numbers.

Not reproduced: ``clipnorm``/``clipvalue``/``global_clipnorm`` (chain ``optax.clip_by_*``
in front), ``use_ema``, ``loss_scale_factor``, ``gradient_accumulation_steps``
(``optax.MultiSteps``), ``exclude_from_weight_decay`` (use ``mask`` of
:func:`rmsjax.decoupled_weight_decay` in your own chain).
"""

from __future__ import annotations

from typing import Any

import optax
from jax.typing import ArrayLike

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.compat._common import is_static_zero
from rmsjax.validation import check_in_range, check_learning_rate

__all__ = ["adadelta", "adagrad", "adam", "adamw", "rmsprop", "sgd"]


def _decay(
    weight_decay: Any, learning_rate: ScalarOrSchedule
) -> list[optax.GradientTransformation]:
    if weight_decay is None:
        return []
    check_in_range("weight_decay", weight_decay, low=0.0)
    return [T.decoupled_weight_decay(weight_decay, learning_rate)]


def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-3,
    rho: ArrayLike = 0.9,
    momentum: ArrayLike = 0.0,
    epsilon: ArrayLike = 1e-7,
    centered: bool = False,
    weight_decay: ArrayLike | None = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.RMSprop``.

    .. math::
      \nu_t = \rho\nu_{t-1} + (1-\rho) g_t^2 \quad (\nu_0 = 0), \qquad
      s_t = \eta_t\, g_t / \sqrt{\nu_t + \epsilon}
      \quad\text{(centered: } \sqrt{\nu_t - \mu_t^2 + \epsilon},\
      \mu_t = \rho\mu_{t-1} + (1-\rho) g_t)

      \text{momentum } \beta > 0:\ m_t = \beta m_{t-1} + s_t,\ \theta \mathrel{-}= m_t;
      \qquad\text{else } \theta \mathrel{-}= s_t

    plus :math:`\theta \mathrel{-}= \eta_t\lambda\theta` first when ``weight_decay`` is set.
    This is ``rmsjax.rmsprop(learning_rate, decay=rho, eps=epsilon, momentum=...)`` with
    Keras' defaults. Chain: ``scale_by_rms | scale_by_centered_rms, scale_by_learning_rate,
    [trace], [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. rho: in [0, 1). momentum: in [0, 1].
      epsilon: >= 0. centered: divide by the estimated standard deviation.
      weight_decay: ``None`` or >= 0 (decoupled, scaled by the learning rate).

    Difference from Keras: the centered variance is clamped at 0 before ``epsilon`` is added.
    """
    check_learning_rate("learning_rate", learning_rate)
    check_in_range("rho", rho, low=0.0, high=1.0, high_open=True)
    check_in_range("momentum", momentum, low=0.0, high=1.0)
    scaler = T.scale_by_centered_rms if centered else T.scale_by_rms
    return optax.chain(
        scaler(decay=rho, eps=epsilon, eps_in_sqrt=True),
        T.scale_by_learning_rate(learning_rate),
        *([] if is_static_zero(momentum) else [T.trace(decay=momentum)]),
        *_decay(weight_decay, learning_rate),
    )


def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    beta_1: ArrayLike = 0.9,
    beta_2: ArrayLike = 0.999,
    epsilon: ArrayLike = 1e-7,
    amsgrad: bool = False,
    weight_decay: ArrayLike | None = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adam`` ("epsilon hat" form).

    .. math::
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) g_t^2

      \theta \mathrel{-}= \eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \cdot \frac{m_t}{\sqrt{v_t} + \hat\epsilon}

    with :math:`v_t = \nu_t`, or the running maximum of the raw :math:`\nu` with ``amsgrad``.
    Written in torch/optax form this is ``eps = epsilon / sqrt(1 - beta_2**t)``: the effective
    eps starts about 32 times larger and shrinks towards ``epsilon``; tiny gradients therefore
    move much less than under torch's Adam. Chain: ``scale_by_adam_eps_hat,
    scale_by_learning_rate, [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. beta_1, beta_2: in [0, 1). epsilon: >= 0.
      amsgrad: AMSGrad. weight_decay: ``None`` or >= 0 (decoupled).
    """
    check_learning_rate("learning_rate", learning_rate)
    return optax.chain(
        T.scale_by_adam_eps_hat(b1=beta_1, b2=beta_2, eps=epsilon, amsgrad=amsgrad),
        T.scale_by_learning_rate(learning_rate),
        *_decay(weight_decay, learning_rate),
    )


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    weight_decay: ArrayLike = 0.004,
    beta_1: ArrayLike = 0.9,
    beta_2: ArrayLike = 0.999,
    epsilon: ArrayLike = 1e-7,
    amsgrad: bool = False,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.AdamW``: :func:`adam` with ``weight_decay`` defaulting to 0.004.

    .. math::
      \theta \leftarrow \theta - \eta_t\lambda\theta - \eta_t
      \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \cdot \frac{m_t}{\sqrt{v_t} + \hat\epsilon}

    Args: as :func:`adam`; ``weight_decay`` >= 0 (Keras' AdamW requires a value).
    """
    if weight_decay is None:
        raise ValueError(
            "`weight_decay` must be a number >= 0 for AdamW, got None; use "
            "rmsjax.compat.keras.adam for Adam without weight decay."
        )
    return adam(
        learning_rate=learning_rate,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        amsgrad=amsgrad,
        weight_decay=weight_decay,
    )


def sgd(
    learning_rate: ScalarOrSchedule = 0.01,
    momentum: ArrayLike = 0.0,
    nesterov: bool = False,
    weight_decay: ArrayLike | None = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.SGD``.

    .. math::
      m_t = \beta m_{t-1} - \eta_t g_t, \qquad
      \theta \mathrel{+}= m_t \ \text{ or (Nesterov) } \ \theta \mathrel{+}= \beta m_t - \eta_t g_t

    (no momentum: :math:`\theta \mathrel{-}= \eta_t g_t`). ``learning_rate`` is INSIDE the
    buffer, there is no dampening, and the first step is :math:`m_1 = -\eta_1 g_1` (torch:
    :math:`b_1 = g_1`, lr outside; equal for a constant lr). Chain: ``scale_by_learning_rate,
    [trace(momentum, nesterov)], [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. momentum: in [0, 1]. nesterov: Nesterov momentum.
      weight_decay: ``None`` or >= 0 (decoupled).
    """
    check_learning_rate("learning_rate", learning_rate)
    check_in_range("momentum", momentum, low=0.0, high=1.0)
    return optax.chain(
        T.scale_by_learning_rate(learning_rate),
        *([] if is_static_zero(momentum) else [T.trace(decay=momentum, nesterov=nesterov)]),
        *_decay(weight_decay, learning_rate),
    )


def adagrad(
    learning_rate: ScalarOrSchedule = 1e-3,
    initial_accumulator_value: ArrayLike = 0.1,
    epsilon: ArrayLike = 1e-7,
    weight_decay: ArrayLike | None = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adagrad``.

    .. math::
      s_t = s_{t-1} + g_t^2 \quad (s_0 = 0.1), \qquad
      \theta \mathrel{-}= \eta_t\, g_t / \sqrt{s_t + \epsilon}

    ``epsilon`` INSIDE the root (torch: outside, and :math:`s_0 = 0`). This is optax's
    ``adagrad`` with Keras' defaults. Chain: ``scale_by_rss, scale_by_learning_rate,
    [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. initial_accumulator_value: >= 0. epsilon: >= 0.
      weight_decay: ``None`` or >= 0 (decoupled).
    """
    check_learning_rate("learning_rate", learning_rate)
    return optax.chain(
        T.scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=epsilon),
        T.scale_by_learning_rate(learning_rate),
        *_decay(weight_decay, learning_rate),
    )


def adadelta(
    learning_rate: ScalarOrSchedule = 1e-3,
    rho: ArrayLike = 0.95,
    epsilon: ArrayLike = 1e-7,
    weight_decay: ArrayLike | None = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adadelta``.

    .. math::
      \nu_t = \rho\nu_{t-1} + (1-\rho) g_t^2, \qquad
      \delta_t = \frac{\sqrt{a_{t-1} + \epsilon}}{\sqrt{\nu_t + \epsilon}}\, g_t, \qquad
      a_t = \rho a_{t-1} + (1-\rho)\delta_t^2, \qquad \theta \mathrel{-}= \eta_t\delta_t

    The same rule as torch's Adadelta with other defaults (rho 0.95, epsilon 1e-7, and a
    learning rate of 1e-3 where torch uses 1.0). Chain: ``scale_by_adadelta,
    scale_by_learning_rate, [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. rho: in [0, 1]. epsilon: >= 0.
      weight_decay: ``None`` or >= 0 (decoupled).
    """
    check_learning_rate("learning_rate", learning_rate)
    return optax.chain(
        T.scale_by_adadelta(rho=rho, eps=epsilon),
        T.scale_by_learning_rate(learning_rate),
        *_decay(weight_decay, learning_rate),
    )
