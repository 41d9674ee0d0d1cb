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
  :func:`rmsjax.decoupled_weight_decay` is the last link of the rule (same numbers).
  ``weight_decay=None`` (the default except for AdamW) adds nothing.
* Keras keeps the learning rate in a float32 variable. For float64 parameters its steps
  therefore use ``float32(learning_rate)``; pass that value to reproduce Keras in float64.
* A ``momentum`` given as the Python number 0 keeps no buffer (as in Keras); an array or traced
  value always keeps one, with identical numbers.
* Errors name Keras' arguments (``epsilon``, ``beta_1``, ...), also where the range is checked
  by the underlying rmsjax transformation.

Arguments every preset takes (Keras' ``BaseOptimizer``), in Keras' order of operations:

* ``loss_scale_factor``: ``None`` or > 0; every gradient is first divided by it.
* ``gradient_accumulation_steps``: ``None`` or a Python int >= 2. Gradients are summed; every
  N-th call the mean of the last N is used for one update, and the other calls return a zero
  update. A learning-rate schedule is evaluated at the CALL count (0, 1, 2, ...: Keras'
  ``optimizer._iterations``), so the k-th update uses ``schedule(N k + N - 1)``; Adam's bias
  corrections count updates.
* ``clipnorm`` (each leaf's gradient to L2 norm <= clipnorm), ``global_clipnorm`` (the whole
  tree) or ``clipvalue`` (each entry to [-v, v]): ``None`` or > 0, at most one of them; applied
  to the (mean) gradient before the rule and the weight decay.
* ``use_ema``, ``ema_momentum`` (in [0, 1]), ``ema_overwrite_frequency`` (``None`` or a
  Python int >= 1; both checked only when ``use_ema``, as in Keras): a moving average of the
  parameters, updated after every call, kept in the optimizer state as
  :class:`EmaState` ``.ema``. Read it with :func:`finalize_variable_values` (Keras'
  ``optimizer.finalize_variable_values``). With ``ema_overwrite_frequency`` F the parameters
  are replaced by the average every F updates (Keras: on the calls where
  ``(iterations + 1) % F == 0``, ``iterations`` counting updates).
* ``name``: accepted and ignored (it names Keras variables).
* ``exclude_from_weight_decay`` (keyword-only; in Keras a method of the optimizer): a string
  or strings, regular expressions searched in each leaf's key path
  (``jax.tree_util.keystr``, e.g. ``"['dense']['bias']"``); matching leaves get no weight
  decay, as Keras' ``exclude_from_weight_decay(var_names=...)``.

Differences from Keras in these arguments: ``None`` switches a feature off, and a value <= 0
(which Keras silently ignores for the clipping arguments, or takes as "off" for
``gradient_accumulation_steps=0``) raises ``ValueError``; after an EMA overwrite the
parameters equal the average to within one rounding (the update is ``average - params``); the
average starts as a copy of the parameters (Keras: zeros; the same from the first call on).
The combination is an ordinary optax chain: ``[unscale], [accumulate([clip], rule, [decay])],
[parameter_ema]``, so ``optax.MultiSteps`` is not needed (it would evaluate a schedule at the
update count, and average differently).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax
from jax.typing import ArrayLike

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.compat._common import descend, is_static_zero
from rmsjax.compat._keras_base import EmaState, finalize_variable_values, keras_chain
from rmsjax.validation import argument_names

__all__ = [
    "PRESETS",
    "EmaState",
    "adadelta",
    "adagrad",
    "adam",
    "adamw",
    "finalize_variable_values",
    "rmsprop",
    "sgd",
]

PRESETS = ("adadelta", "adagrad", "adam", "adamw", "rmsprop", "sgd")
"""The names of the optimizer presets in this module."""

# The arguments of Keras' BaseOptimizer, read by name from each preset's arguments.
_BASE_ARGUMENTS = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "name",
    "exclude_from_weight_decay",
)

Rule = Callable[[ScalarOrSchedule], list[optax.GradientTransformation]]


def _optimizer(rule: Rule, arguments: Mapping[str, Any]) -> optax.GradientTransformation:
    """``rule(learning_rate)`` inside Keras' BaseOptimizer machinery; ``arguments`` are the
    preset's own (its ``locals()``), from which the BaseOptimizer ones are taken by name."""
    return keras_chain(rule, **{k: arguments[k] for k in _BASE_ARGUMENTS})


def _momentum(momentum: ArrayLike, nesterov: bool = False) -> list[optax.GradientTransformation]:
    if is_static_zero(momentum):
        return []
    with argument_names({"decay": "momentum"}):
        return [T.trace(decay=momentum, nesterov=nesterov)]


def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-3,
    rho: ArrayLike = 0.9,
    momentum: ArrayLike = 0.0,
    epsilon: ArrayLike = 1e-7,
    centered: bool = False,
    weight_decay: ScalarOrSchedule | None = None,
    clipnorm: ArrayLike | None = None,
    clipvalue: ArrayLike | None = None,
    global_clipnorm: ArrayLike | None = None,
    use_ema: bool = False,
    ema_momentum: ArrayLike = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: ArrayLike | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    exclude_from_weight_decay: str | Sequence[str] | None = None,
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
    Keras' defaults. Rule: ``scale_by_rms | scale_by_centered_rms, scale_by_learning_rate,
    [trace], [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. rho: in [0, 1). momentum: in [0, 1].
      epsilon: >= 0. centered: divide by the estimated standard deviation.
      weight_decay: ``None``, >= 0 or a schedule (decoupled, scaled by the learning rate).
      The others: see the module docstring (every Keras optimizer takes them).

    Difference from Keras: the centered variance is clamped at 0 before ``epsilon`` is added.
    """
    scaler = T.scale_by_centered_rms if centered else T.scale_by_rms
    with argument_names({"decay": "rho", "eps": "epsilon"}):
        second_moment = scaler(decay=rho, eps=epsilon, eps_in_sqrt=True)
    buffer = _momentum(momentum)
    return _optimizer(lambda lr: [second_moment, descend(lr), *buffer], locals())


def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    beta_1: ArrayLike = 0.9,
    beta_2: ArrayLike = 0.999,
    epsilon: ArrayLike = 1e-7,
    amsgrad: bool = False,
    weight_decay: ScalarOrSchedule | None = None,
    clipnorm: ArrayLike | None = None,
    clipvalue: ArrayLike | None = None,
    global_clipnorm: ArrayLike | None = None,
    use_ema: bool = False,
    ema_momentum: ArrayLike = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: ArrayLike | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    exclude_from_weight_decay: str | Sequence[str] | None = None,
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
    move much less than under torch's Adam. :math:`t` counts updates (with
    ``gradient_accumulation_steps``, not calls). Rule: ``scale_by_adam_eps_hat,
    scale_by_learning_rate, [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. beta_1, beta_2: in [0, 1). epsilon: >= 0.
      amsgrad: AMSGrad. weight_decay: ``None``, >= 0 or a schedule (decoupled).
      The others: see the module docstring (every Keras optimizer takes them).
    """
    with argument_names({"b1": "beta_1", "b2": "beta_2", "eps": "epsilon"}):
        moments = T.scale_by_adam_eps_hat(b1=beta_1, b2=beta_2, eps=epsilon, amsgrad=amsgrad)
    return _optimizer(lambda lr: [moments, descend(lr)], locals())


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    weight_decay: ScalarOrSchedule = 0.004,
    beta_1: ArrayLike = 0.9,
    beta_2: ArrayLike = 0.999,
    epsilon: ArrayLike = 1e-7,
    amsgrad: bool = False,
    clipnorm: ArrayLike | None = None,
    clipvalue: ArrayLike | None = None,
    global_clipnorm: ArrayLike | None = None,
    use_ema: bool = False,
    ema_momentum: ArrayLike = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: ArrayLike | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    exclude_from_weight_decay: str | Sequence[str] | None = None,
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
    return adam(**locals())  # the same arguments as Adam, in AdamW's order


def sgd(
    learning_rate: ScalarOrSchedule = 0.01,
    momentum: ArrayLike = 0.0,
    nesterov: bool = False,
    weight_decay: ScalarOrSchedule | None = None,
    clipnorm: ArrayLike | None = None,
    clipvalue: ArrayLike | None = None,
    global_clipnorm: ArrayLike | None = None,
    use_ema: bool = False,
    ema_momentum: ArrayLike = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: ArrayLike | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    exclude_from_weight_decay: str | Sequence[str] | None = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.SGD``.

    .. math::
      m_t = \beta m_{t-1} - \eta_t g_t, \qquad
      \theta \mathrel{+}= m_t \ \text{ or (Nesterov) } \ \theta \mathrel{+}= \beta m_t - \eta_t g_t

    (no momentum: :math:`\theta \mathrel{-}= \eta_t g_t`). ``learning_rate`` is INSIDE the
    buffer, there is no dampening, and the first step is :math:`m_1 = -\eta_1 g_1` (torch:
    :math:`b_1 = g_1`, lr outside; equal for a constant lr). Rule: ``scale_by_learning_rate,
    [trace(momentum, nesterov)], [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. momentum: in [0, 1]. nesterov: Nesterov momentum.
      weight_decay: ``None``, >= 0 or a schedule (decoupled).
      The others: see the module docstring (every Keras optimizer takes them).
    """
    buffer = _momentum(momentum, nesterov)
    return _optimizer(lambda lr: [descend(lr), *buffer], locals())


def adagrad(
    learning_rate: ScalarOrSchedule = 1e-3,
    initial_accumulator_value: ArrayLike = 0.1,
    epsilon: ArrayLike = 1e-7,
    weight_decay: ScalarOrSchedule | None = None,
    clipnorm: ArrayLike | None = None,
    clipvalue: ArrayLike | None = None,
    global_clipnorm: ArrayLike | None = None,
    use_ema: bool = False,
    ema_momentum: ArrayLike = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: ArrayLike | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    exclude_from_weight_decay: str | Sequence[str] | None = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adagrad``.

    .. math::
      s_t = s_{t-1} + g_t^2 \quad (s_0 = 0.1), \qquad
      \theta \mathrel{-}= \eta_t\, g_t / \sqrt{s_t + \epsilon}

    ``epsilon`` INSIDE the root (torch: outside, and :math:`s_0 = 0`). This is optax's
    ``adagrad`` with Keras' defaults. Rule: ``scale_by_rss, scale_by_learning_rate,
    [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. initial_accumulator_value: >= 0. epsilon: >= 0.
      weight_decay: ``None``, >= 0 or a schedule (decoupled).
      The others: see the module docstring (every Keras optimizer takes them).
    """
    with argument_names({"eps": "epsilon"}):
        squares = T.scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=epsilon)
    return _optimizer(lambda lr: [squares, descend(lr)], locals())


def adadelta(
    learning_rate: ScalarOrSchedule = 1e-3,
    rho: ArrayLike = 0.95,
    epsilon: ArrayLike = 1e-7,
    weight_decay: ScalarOrSchedule | None = None,
    clipnorm: ArrayLike | None = None,
    clipvalue: ArrayLike | None = None,
    global_clipnorm: ArrayLike | None = None,
    use_ema: bool = False,
    ema_momentum: ArrayLike = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: ArrayLike | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    exclude_from_weight_decay: str | Sequence[str] | None = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adadelta``.

    .. math::
      \nu_t = \rho\nu_{t-1} + (1-\rho) g_t^2, \qquad
      \delta_t = \frac{\sqrt{a_{t-1} + \epsilon}}{\sqrt{\nu_t + \epsilon}}\, g_t, \qquad
      a_t = \rho a_{t-1} + (1-\rho)\delta_t^2, \qquad \theta \mathrel{-}= \eta_t\delta_t

    The same rule as torch's Adadelta with other defaults (rho 0.95, epsilon 1e-7, and a
    learning rate of 1e-3 where torch uses 1.0). Rule: ``scale_by_adadelta,
    scale_by_learning_rate, [decoupled_weight_decay]``.

    Args:
      learning_rate: >= 0 or a schedule. rho: in [0, 1). epsilon: > 0.
      weight_decay: ``None``, >= 0 or a schedule (decoupled).
      The others: see the module docstring (every Keras optimizer takes them).

    Difference from Keras: ``rho = 1`` and ``epsilon = 0`` (with which AdaDelta never moves)
    raise ``ValueError``.
    """
    with argument_names({"eps": "epsilon"}):
        rescale = T.scale_by_adadelta(rho=rho, eps=epsilon)
    return _optimizer(lambda lr: [rescale, descend(lr)], locals())
