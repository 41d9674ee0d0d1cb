r"""``torch.optim`` optimizers (PyTorch 2.x), reproduced as optax-protocol transformations.

Each function takes the ``torch.optim`` class's own argument names and defaults and returns an
optax ``GradientTransformation`` that, fed the same gradients, walks the same parameter
trajectory as the torch optimizer (checked against stored ``torch.optim`` trajectories in
``tests/test_compat.py``; the generator is ``tests/reference/generate.py``).

Porting notes that hold for every preset:

* ``maximize=True`` negates the raw gradient, before the (coupled) weight decay, as torch does.
* ``weight_decay`` is torch's L2 term ``g += weight_decay * param`` (coupled), except in
  :func:`adamw`, where it is decoupled (``param *= 1 - lr * weight_decay``).
* ``lr`` may be a schedule ``count -> lr`` (count 0, 1, 2, ... like optax); it plays the part
  of a ``torch.optim.lr_scheduler`` that sets ``param_group["lr"]`` before each step, and it
  sits where torch puts ``lr`` (outside the momentum buffers), so schedules follow torch too.
* Complex parameters: torch runs every optimizer except SGD on ``torch.view_as_real(param)``,
  i.e. the real and imaginary parts get separate second moments; the presets do the same
  (:func:`rmsjax.split_real_and_imaginary`). torch's ``.grad`` of a real loss is the conjugate
  of ``jax.grad``'s, so pass ``jnp.conj(jax.grad(loss)(params))`` for complex parameters.
* Invalid hyperparameters raise ``ValueError`` at construction (for concrete values), naming
  torch's argument (``alpha``, ``betas[0]``, ``etas[1]``, ...). The ranges are those of the
  rmsjax transformations each preset is built from, which check them (the preset only renames
  the arguments, with :func:`rmsjax.validation.argument_names`); where they are narrower than
  torch's, the preset's docstring says so.
* A hyperparameter that enables an optional buffer (``momentum``, ``weight_decay``) and is the
  Python number 0 leaves the buffer out, as torch does; an array or traced value (e.g. via
  ``optax.inject_hyperparams``) always keeps it, with identical numbers.

Not reproduced: ``foreach``/``fused``/``capturable``/``differentiable`` (implementation
choices with the same numbers), per-parameter-group options (use ``optax.multi_transform``),
and Adam's ``decoupled_weight_decay`` flag of newer torch (use :func:`adamw`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optax
from jax.typing import ArrayLike

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.compat._common import betas_pair, descend, is_static_zero, pair, sign_flip
from rmsjax.validation import (
    argument_names,
    check_learning_rate,
    check_nonneg,
    is_concrete,
)

__all__ = ["adadelta", "adagrad", "adam", "adamw", "rmsprop", "rprop", "sgd"]


# torch's names for the arguments of the transformations the presets are built from.
_LR = {"learning_rate": "lr"}


def _coupled_decay(weight_decay: Any) -> list[optax.GradientTransformation]:
    # add_decayed_weights checks `weight_decay`; a static 0 (valid) leaves the term out.
    return [] if is_static_zero(weight_decay) else [T.add_decayed_weights(weight_decay)]


def rmsprop(
    lr: ScalarOrSchedule = 1e-2,
    alpha: ArrayLike = 0.99,
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 0,
    momentum: ArrayLike = 0,
    centered: bool = False,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""``torch.optim.RMSprop``.

    .. math::
      g \leftarrow \pm g + \lambda\theta, \qquad
      \nu_t = \alpha\nu_{t-1} + (1-\alpha) g_t^2 \quad (\nu_0 = 0)

      d_t = \sqrt{\nu_t} + \epsilon \quad\text{(centered: }
      \mu_t = \alpha\mu_{t-1} + (1-\alpha) g_t,\ d_t = \sqrt{\nu_t - \mu_t^2} + \epsilon)

      \text{momentum } \beta > 0:\ b_t = \beta b_{t-1} + g_t/d_t,\ \theta \mathrel{-}= \eta_t b_t;
      \qquad\text{else } \theta \mathrel{-}= \eta_t g_t / d_t

    ``eps`` is OUTSIDE the square root and ``lr`` OUTSIDE the momentum buffer (optax's and
    Keras' RMSprop put both inside). Chain: ``[scale(-1)], [add_decayed_weights],
    split_real_and_imaginary(scale_by_rms | scale_by_centered_rms (eps_in_sqrt=False)),
    [trace], scale_by_learning_rate``.

    Args:
      lr: >= 0, or a schedule. alpha: in [0, 1). eps: >= 0. weight_decay: >= 0 or a schedule
      (coupled L2). momentum: in [0, 1]. centered: divide by the estimated standard deviation.
      maximize: ascend.

    Differences from torch: the centered variance is clamped at 0 (torch returns NaN when it
    rounds negative under near-constant gradients); torch accepts any ``alpha >= 0`` and
    ``momentum >= 0`` (``alpha >= 1`` never forgets or diverges, ``momentum > 1`` diverges).
    """
    scaler = T.scale_by_centered_rms if centered else T.scale_by_rms
    with argument_names({**_LR, "decay": "alpha"}):
        rms = T.split_real_and_imaginary(scaler(decay=alpha, eps=eps, eps_in_sqrt=False))
        step = descend(lr)
    with argument_names({"decay": "momentum"}):
        buffer = [] if is_static_zero(momentum) else [T.trace(decay=momentum)]
    return optax.chain(*sign_flip(maximize), *_coupled_decay(weight_decay), rms, *buffer, step)


def _adam_scaler(betas: Any, eps: Any, amsgrad: bool) -> optax.GradientTransformation:
    b1, b2 = betas_pair(betas)
    with argument_names({"b1": "betas[0]", "b2": "betas[1]"}):
        inner = T.scale_by_adam_exact_bias(b1=b1, b2=b2, eps=eps, amsgrad=amsgrad)
    return T.split_real_and_imaginary(inner)


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ArrayLike, ArrayLike] = (0.9, 0.999),
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""``torch.optim.Adam``.

    .. math::
      g \leftarrow \pm g + \lambda\theta, \quad
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) g_t^2

      \theta \mathrel{-}= \eta_t\, \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    with :math:`v_t = \nu_t`, or with ``amsgrad`` the running maximum of the RAW
    :math:`\nu_s` (optax's ``amsgrad`` maximises the bias-corrected moment instead). ``eps`` is
    outside the root (optax's default too; Keras differs, see :func:`rmsjax.compat.keras.adam`).
    ``weight_decay`` is coupled (added to the gradient); for AdamW use :func:`adamw`.

    Args:
      lr: >= 0 or a schedule. betas: each in [0, 1). eps: >= 0. weight_decay: >= 0 or a schedule.
      amsgrad: AMSGrad. maximize: ascend.
    """
    scaler = _adam_scaler(betas, eps, amsgrad)
    with argument_names(_LR):
        step = descend(lr)
    return optax.chain(*sign_flip(maximize), *_coupled_decay(weight_decay), scaler, step)


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ArrayLike, ArrayLike] = (0.9, 0.999),
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""``torch.optim.AdamW``: :func:`adam` with decoupled weight decay.

    .. math::
      \theta \leftarrow \theta\,(1 - \eta_t\lambda) - \eta_t\,
      \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    (moments of :math:`\pm g` only; :math:`v_t` as in :func:`adam`). torch's default
    ``weight_decay`` is 1e-2 (optax's ``adamw`` 1e-4, Keras' 4e-3). Chain: ``[scale(-1)],
    split_real_and_imaginary(scale_by_adam_exact_bias), scale_by_learning_rate(lr),
    decoupled_weight_decay(weight_decay, lr)``.

    Args:
      lr: >= 0 or a schedule. betas: each in [0, 1). eps: >= 0. weight_decay: >= 0 or a
      schedule. amsgrad: AMSGrad on the raw second moment. maximize: ascend.
    """
    scaler = _adam_scaler(betas, eps, amsgrad)
    with argument_names(_LR):
        step = descend(lr)
        decay = T.decoupled_weight_decay(weight_decay, lr)
    return optax.chain(*sign_flip(maximize), scaler, step, decay)


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: ArrayLike = 0,
    dampening: ArrayLike = 0,
    weight_decay: ScalarOrSchedule = 0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""``torch.optim.SGD``.

    .. math::
      g \leftarrow \pm g + \lambda\theta, \qquad
      b_1 = g_1,\ b_t = \mu b_{t-1} + (1-d) g_t, \qquad
      \theta \mathrel{-}= \eta_t\,(b_t \text{ or, Nesterov, } g_t + \mu b_t)

    The first step copies the gradient into the buffer undamped, and ``lr`` multiplies the
    buffer from outside (Keras puts it inside). Complex parameters need no special handling
    (everything is linear). Chain: ``[scale(-1)], [add_decayed_weights],
    [dampened_trace], scale_by_learning_rate``.

    Args:
      lr: >= 0 or a schedule. momentum: in [0, 1]. dampening: in [0, 1] (unused when a static
      ``momentum=0`` leaves the buffer out). weight_decay: >= 0 or a schedule. nesterov: needs
      ``momentum > 0`` and ``dampening == 0`` (torch's rule; ``ValueError`` otherwise).
      maximize: ascend.

    Difference from torch: torch accepts any ``momentum >= 0`` and never checks
    ``dampening``.
    """
    with argument_names({**_LR, "decay": "momentum"}):
        # Built (and so validated: torch never checks dampening, rmsjax does) even when a
        # static momentum=0 leaves the buffer out of the chain.
        trace = T.dampened_trace(decay=momentum, dampening=dampening, nesterov=nesterov)
        step = descend(lr)
    if nesterov and (
        (is_concrete(momentum) and float(np.asarray(momentum).real) <= 0)
        or (is_concrete(dampening) and float(np.asarray(dampening).real) != 0)
    ):
        raise ValueError(
            f"Nesterov momentum needs momentum > 0 and dampening == 0 (as in torch), got "
            f"momentum={momentum!r}, dampening={dampening!r}. Set a momentum and dampening=0, "
            "or nesterov=False."
        )
    buffer = [] if is_static_zero(momentum) else [trace]
    return optax.chain(*sign_flip(maximize), *_coupled_decay(weight_decay), *buffer, step)


def adagrad(
    lr: ScalarOrSchedule = 1e-2,
    lr_decay: ArrayLike = 0,
    weight_decay: ScalarOrSchedule = 0,
    initial_accumulator_value: ArrayLike = 0,
    eps: ArrayLike = 1e-10,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""``torch.optim.Adagrad``.

    .. math::
      g \leftarrow \pm g + \lambda\theta, \qquad s_t = s_{t-1} + g_t^2 \quad
      (s_0 = \text{initial\_accumulator\_value})

      \theta \mathrel{-}= \frac{\eta_t}{1 + (t-1)\,\delta} \cdot \frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`\delta` = ``lr_decay``. ``eps`` is OUTSIDE the root (optax's and Keras'
    ``adagrad`` put it inside and start the sum at 0.1). Chain: ``[scale(-1)],
    [add_decayed_weights], split_real_and_imaginary(scale_by_rss(eps_in_sqrt=False)),
    scale_by_learning_rate(count -> lr(count) / (1 + count * lr_decay))``.

    Args:
      lr: >= 0 or a schedule. lr_decay: >= 0. weight_decay: >= 0 or a schedule.
      initial_accumulator_value: >= 0. eps: >= 0. maximize: ascend.
    """
    # The transformations never see `lr` itself (only the decayed schedule) nor `lr_decay`.
    check_learning_rate("lr", lr)
    check_nonneg("lr_decay", lr_decay)

    def decayed_lr(count: Any) -> Any:
        base = lr(count) if callable(lr) else lr
        return base / (1 + count * lr_decay)

    return optax.chain(
        *sign_flip(maximize),
        *_coupled_decay(weight_decay),
        T.split_real_and_imaginary(
            T.scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=False)
        ),
        descend(decayed_lr),
    )


def adadelta(
    lr: ScalarOrSchedule = 1.0,
    rho: ArrayLike = 0.9,
    eps: ArrayLike = 1e-6,
    weight_decay: ScalarOrSchedule = 0,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""``torch.optim.Adadelta``.

    .. math::
      g \leftarrow \pm g + \lambda\theta, \qquad
      \nu_t = \rho\nu_{t-1} + (1-\rho) g_t^2, \qquad
      \delta_t = \frac{\sqrt{a_{t-1} + \epsilon}}{\sqrt{\nu_t + \epsilon}}\, g_t

      a_t = \rho a_{t-1} + (1-\rho)\delta_t^2, \qquad \theta \mathrel{-}= \eta_t\delta_t

    ``eps`` is inside BOTH roots (as in optax and Keras; Keras' defaults are rho 0.95,
    eps 1e-7). Chain: ``[scale(-1)], [add_decayed_weights],
    split_real_and_imaginary(scale_by_adadelta), scale_by_learning_rate``.

    Args:
      lr: >= 0 or a schedule. rho: in [0, 1). eps: > 0. weight_decay: >= 0 or a schedule.
      maximize: ascend.

    Difference from torch: torch also accepts ``rho = 1`` and ``eps = 0``, which
    :func:`rmsjax.scale_by_adadelta` rejects as degenerate. With ``rho = 1`` both averages
    stay 0 and torch's step is ``lr * g`` (plain SGD, not AdaDelta: use :func:`sgd`); with
    ``eps = 0`` the numerator :math:`\sqrt{a_{t-1}}` starts at 0 and torch never moves (its step
    is NaN where a gradient is 0).
    """
    with argument_names(_LR):
        rescale = T.split_real_and_imaginary(T.scale_by_adadelta(rho=rho, eps=eps))
        step = descend(lr)
    return optax.chain(*sign_flip(maximize), *_coupled_decay(weight_decay), rescale, step)


def rprop(
    lr: ScalarOrSchedule = 1e-2,
    etas: tuple[ArrayLike, ArrayLike] = (0.5, 1.2),
    step_sizes: tuple[ArrayLike, ArrayLike] = (1e-6, 50),
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""``torch.optim.Rprop``.

    Every element keeps a step size :math:`\delta` (starting at ``lr``) and the previous
    gradient :math:`g_{t-1}` (starting at 0). On every step, the first included, with
    :math:`s = \operatorname{sign}(g_t g_{t-1})`:

    .. math::
      \delta \leftarrow \operatorname{clip}(\delta\cdot(\eta_+ \text{ if } s>0,\ \eta_-
      \text{ if } s<0,\ 1 \text{ else}),\ \delta_{min}, \delta_{max}), \qquad
      g_t \leftarrow 0 \text{ where } s < 0

      \theta \mathrel{-}= \operatorname{sign}(g_t)\,\delta, \qquad g_{t-1} \leftarrow g_t

    (so after a sign change the element does not move and its stored gradient is zeroed).
    Chain: ``[scale(-1)], scale_by_rprop, scale(-1)`` (``scale_by_rprop`` already treats the
    real and imaginary parts of complex leaves as separate reals).

    Args:
      lr: the initial step size, >= 0. A schedule is evaluated at 0 only: as in torch, later
        learning rates have no effect on Rprop. etas: ``(eta_minus, eta_plus)`` with
        ``0 < eta_minus < 1 < eta_plus`` (torch's range). step_sizes: ``(min, max)`` with
        ``0 < min <= max``.
      maximize: ascend.

    torch has no ``weight_decay`` for Rprop. Difference from torch: torch never checks
    ``step_sizes``; a zero ``min`` would let a step size reach 0 and stay there.
    """
    eta_minus, eta_plus = pair("etas", etas, "(eta_minus, eta_plus)")
    smallest, largest = pair("step_sizes", step_sizes, "(min, max)")
    names = {
        **_LR,
        "eta_minus": "etas[0]",
        "eta_plus": "etas[1]",
        "min_step_size": "step_sizes[0]",
        "max_step_size": "step_sizes[1]",
    }
    with argument_names(names):
        rescale = T.scale_by_rprop(
            lr,
            eta_minus=eta_minus,
            eta_plus=eta_plus,
            min_step_size=smallest,
            max_step_size=largest,
        )
    return optax.chain(*sign_flip(maximize), rescale, T.scale(-1.0))
