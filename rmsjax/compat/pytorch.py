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
* Invalid hyperparameters raise ``ValueError`` naming the argument (torch raises
  ``ValueError("Invalid ...")`` for the same cases), at construction for concrete values.
* A hyperparameter that enables an optional buffer (``momentum``, ``weight_decay``) and is the
  Python number 0 leaves the buffer out, as torch does; an array or traced value (e.g. via
  ``optax.inject_hyperparams``) always keeps it, with identical numbers.

Not reproduced: ``foreach``/``fused``/``capturable``/``differentiable`` (implementation
choices with the same numbers), per-parameter-group options (use ``optax.multi_transform``),
and Adam's ``decoupled_weight_decay`` flag of newer torch (use :func:`adamw`).
"""

from __future__ import annotations

from typing import Any

import optax
from jax.typing import ArrayLike

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.compat._common import is_static_zero, sign_flip
from rmsjax.validation import check_in_range, check_learning_rate, is_concrete

__all__ = ["adadelta", "adagrad", "adam", "adamw", "rmsprop", "rprop", "sgd"]


def _coupled_decay(weight_decay: Any) -> list[optax.GradientTransformation]:
    check_in_range("weight_decay", weight_decay, low=0.0)
    return [] if is_static_zero(weight_decay) else [T.add_decayed_weights(weight_decay)]


def _check_betas(betas: tuple[Any, Any]) -> tuple[Any, Any]:
    if len(betas) != 2:
        raise ValueError(f"`betas` must be a pair (beta1, beta2), got {betas!r}.")
    for i, b in enumerate(betas):
        check_in_range(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
    return betas[0], betas[1]


def rmsprop(
    lr: ScalarOrSchedule = 1e-2,
    alpha: ArrayLike = 0.99,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 0,
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
      lr: >= 0, or a schedule. alpha: in [0, 1) (torch also accepts 1). eps: >= 0.
      weight_decay: >= 0 (coupled L2). momentum: in [0, 1]. centered: divide by the estimated
      standard deviation. maximize: ascend.

    Difference from torch: the centered variance is clamped at 0 (torch returns NaN when it
    rounds negative under near-constant gradients).
    """
    check_learning_rate("lr", lr)
    check_in_range("alpha", alpha, low=0.0, high=1.0, high_open=True)
    check_in_range("eps", eps, low=0.0)
    check_in_range("momentum", momentum, low=0.0, high=1.0)
    scaler = T.scale_by_centered_rms if centered else T.scale_by_rms
    return optax.chain(
        *sign_flip(maximize),
        *_coupled_decay(weight_decay),
        T.split_real_and_imaginary(scaler(decay=alpha, eps=eps, eps_in_sqrt=False)),
        *([] if is_static_zero(momentum) else [T.trace(decay=momentum)]),
        T.scale_by_learning_rate(lr),
    )


def _adam_scaler(b1: Any, b2: Any, eps: Any, amsgrad: bool) -> optax.GradientTransformation:
    check_in_range("eps", eps, low=0.0)
    inner = T.scale_by_adam_exact_bias(b1=b1, b2=b2, eps=eps, amsgrad=amsgrad)
    return T.split_real_and_imaginary(inner)


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ArrayLike, ArrayLike] = (0.9, 0.999),
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 0,
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
      lr: >= 0 or a schedule. betas: each in [0, 1). eps: >= 0. weight_decay: >= 0.
      amsgrad: AMSGrad. maximize: ascend.
    """
    check_learning_rate("lr", lr)
    b1, b2 = _check_betas(betas)
    return optax.chain(
        *sign_flip(maximize),
        *_coupled_decay(weight_decay),
        _adam_scaler(b1, b2, eps, amsgrad),
        T.scale_by_learning_rate(lr),
    )


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
    check_learning_rate("lr", lr)
    b1, b2 = _check_betas(betas)
    return optax.chain(
        *sign_flip(maximize),
        _adam_scaler(b1, b2, eps, amsgrad),
        T.scale_by_learning_rate(lr),
        T.decoupled_weight_decay(weight_decay, lr),
    )


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: ArrayLike = 0,
    dampening: ArrayLike = 0,
    weight_decay: ArrayLike = 0,
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
      lr: >= 0 or a schedule. momentum: in [0, 1]. dampening: in [0, 1].
      weight_decay: >= 0. nesterov: needs ``momentum > 0`` and ``dampening == 0`` (torch's
      rule; ``ValueError`` otherwise). maximize: ascend.
    """
    check_learning_rate("lr", lr)
    check_in_range("momentum", momentum, low=0.0, high=1.0)
    check_in_range("dampening", dampening, low=0.0, high=1.0)
    if nesterov and (
        (is_concrete(momentum) and float(momentum) <= 0)
        or (is_concrete(dampening) and float(dampening) != 0)
    ):
        raise ValueError(
            f"Nesterov momentum needs momentum > 0 and dampening == 0 (as in torch), got "
            f"momentum={momentum!r}, dampening={dampening!r}. Set a momentum and dampening=0, "
            "or nesterov=False."
        )
    buffer = (
        []
        if is_static_zero(momentum)
        else [T.dampened_trace(decay=momentum, dampening=dampening, nesterov=nesterov)]
    )
    return optax.chain(
        *sign_flip(maximize),
        *_coupled_decay(weight_decay),
        *buffer,
        T.scale_by_learning_rate(lr),
    )


def adagrad(
    lr: ScalarOrSchedule = 1e-2,
    lr_decay: ArrayLike = 0,
    weight_decay: ArrayLike = 0,
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
      lr: >= 0 or a schedule. lr_decay: >= 0. weight_decay: >= 0.
      initial_accumulator_value: >= 0. eps: >= 0. maximize: ascend.
    """
    check_learning_rate("lr", lr)
    check_in_range("lr_decay", lr_decay, low=0.0)

    def decayed_lr(count: Any) -> Any:
        base = lr(count) if callable(lr) else lr
        return base / (1 + count * lr_decay)

    return optax.chain(
        *sign_flip(maximize),
        *_coupled_decay(weight_decay),
        T.split_real_and_imaginary(
            T.scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=False)
        ),
        T.scale_by_learning_rate(decayed_lr),
    )


def adadelta(
    lr: ScalarOrSchedule = 1.0,
    rho: ArrayLike = 0.9,
    eps: ArrayLike = 1e-6,
    weight_decay: ArrayLike = 0,
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
      lr: >= 0 or a schedule. rho: in [0, 1]. eps: >= 0. weight_decay: >= 0. maximize: ascend.
    """
    check_learning_rate("lr", lr)
    check_in_range("rho", rho, low=0.0, high=1.0)
    return optax.chain(
        *sign_flip(maximize),
        *_coupled_decay(weight_decay),
        T.split_real_and_imaginary(T.scale_by_adadelta(rho=rho, eps=eps)),
        T.scale_by_learning_rate(lr),
    )


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
        ``0 < eta_minus < 1 < eta_plus``. step_sizes: ``(min, max)`` with ``0 < min <= max``.
      maximize: ascend.

    torch has no ``weight_decay`` for Rprop.
    """
    check_learning_rate("lr", lr)
    if len(etas) != 2 or len(step_sizes) != 2:
        raise ValueError(
            f"`etas` and `step_sizes` must be pairs, got etas={etas!r}, step_sizes={step_sizes!r}."
        )
    check_in_range("etas[0]", etas[0], low=0.0, high=1.0, low_open=True, high_open=True)
    check_in_range("etas[1]", etas[1], low=1.0, low_open=True)
    check_in_range("step_sizes[0]", step_sizes[0], low=0.0)
    check_in_range("step_sizes[1]", step_sizes[1], low=0.0)
    if (
        is_concrete(step_sizes[0])
        and is_concrete(step_sizes[1])
        and float(step_sizes[0]) > float(step_sizes[1])
    ):
        raise ValueError(f"`step_sizes` must be (min, max) with min <= max, got {step_sizes!r}.")
    return optax.chain(
        *sign_flip(maximize),
        T.scale_by_rprop(
            lr,
            eta_minus=etas[0],
            eta_plus=etas[1],
            min_step_size=step_sizes[0],
            max_step_size=step_sizes[1],
        ),
        T.scale(-1.0),
    )
