r"""Ready optimizers: short chains of the transformations in :mod:`rmsjax.transforms`.

Names, signatures and defaults are optax 0.2.x's, so ``optax.rmsprop`` can be swapped for
``rmsjax.rmsprop``. Each returns an ``optax.GradientTransformationExtraArgs`` whose state has
exactly the structure of the optax optimizer's state (the same ``NamedTuple`` classes, fields
and order), so an optax state or Orbax checkpoint restores into the rmsjax optimizer.

Every ``learning_rate`` must be given: ``None`` raises ``ValueError`` (``optax.rmsprop(None)``
skips the scaling and so steps up the gradient), except in :func:`adadelta`, where ``None``
means a rate of 1.

Every moment has a storage argument (``mu_dtype``, ``nu_dtype``, ...): ``None`` (the default
dtype policy), a float dtype, :func:`rmsjax.quantized` or :func:`rmsjax.stochastic_rounding`
(:mod:`rmsjax.storage`); the arguments optax lacks are keyword-only.
"""

from __future__ import annotations

from typing import Any

import optax
from jax.typing import ArrayLike, DTypeLike

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.moments import document_storage
from rmsjax.storage import Storage, check_storage
from rmsjax.validation import argument_names, check_learning_rate

__all__ = ["adadelta", "adagrad", "adam", "adamw", "rmsprop", "rprop", "sgd"]


def _momentum(
    momentum: ArrayLike | None,
    nesterov: bool,
    accumulator_dtype: DTypeLike | Storage | None = None,
    *,
    promote_half: bool,
) -> optax.GradientTransformation:
    """``trace(momentum)``, or ``identity`` for ``None`` (optax's layout); a bad ``momentum``
    is reported under that name, not as ``trace``'s ``decay``."""
    if momentum is None:
        return optax.identity()
    with argument_names({"decay": "momentum"}):
        return T.trace(
            decay=momentum,
            nesterov=nesterov,
            accumulator_dtype=accumulator_dtype,
            promote_half=promote_half,
        )


@document_storage
def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: ArrayLike = 0.9,
    eps: ArrayLike = 1e-8,
    initial_scale: ArrayLike = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: ArrayLike | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    promote_half: bool = True,
    nu_dtype: DTypeLike | Storage | None = None,
    mu_dtype: DTypeLike | Storage | None = None,
    momentum_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSProp (Tieleman & Hinton 2012), optionally centered (Graves 2013) and with momentum.

    .. math::
      \nu_t = \rho\,\nu_{t-1} + (1-\rho)\,|g_t|^2 \qquad
      \text{(centered: also } \mu_t = \rho\,\mu_{t-1} + (1-\rho)\,g_t,
      \ \nu_t \to \max(\nu_t - |\mu_t|^2, 0))

      s_t = g_t / \sqrt{\nu_t + \epsilon}
      \quad\text{(or } g_t / (\sqrt{\nu_t} + \epsilon) \text{ when eps\_in\_sqrt=False)}

      \text{no momentum: } u_t = -\eta_t\,s_t; \qquad
      \text{momentum } \beta: m_t = \beta\,m_{t-1} - \eta_t s_t,\ u_t = m_t
      \ (\text{Nesterov: } u_t = -\eta_t s_t + \beta\,m_t)

    Parameters move by :math:`\theta_t = \theta_{t-1} + u_t` (``rmsjax.apply_updates``). The
    learning rate sits INSIDE the momentum buffer (TF1 and Keras style; torch keeps it outside,
    see ``rmsjax.compat.pytorch``); with a constant rate the two are the same.

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or a schedule ``count -> eta``.
      decay: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon`, >= 0.
      initial_scale: :math:`\nu_0`, >= 0 (TF1: 1.0).
      eps_in_sqrt: :math:`\epsilon` inside the square root (default) or outside (PyTorch).
      centered: divide by the estimated standard deviation instead of the RMS.
      momentum: :math:`\beta` in [0, 1], or ``None`` for no momentum buffer.
      nesterov: Nesterov momentum (needs ``momentum``).
      bias_correction: divide the moments by :math:`1-\rho^t`.
      promote_half: keep state of float16/bfloat16 parameters in float32 (default).
      nu_dtype: storage of :math:`\nu`: {storage}.
      mu_dtype: storage of the centered mean :math:`\mu` (with ``centered=True``): {storage}.
      momentum_dtype: storage of the momentum buffer :math:`m` (with ``momentum``): {storage}.

    Same trajectory as ``optax.rmsprop`` to float32 rounding. Deliberate differences: the
    centered variance is clamped at zero (optax and torch return NaN once it rounds negative),
    half precision state is float32 by default, and a zero divisor gives a zero step.

    Example:
      The first step moves every coordinate by about :math:`\eta/\sqrt{1-\rho}`, whatever
      the size of its gradient (here :math:`0.01/\sqrt{0.1} = 0.0316`):

      >>> import jax, jax.numpy as jnp, rmsjax
      >>> params = {"w": jnp.array([1.0, -0.01])}
      >>> opt = rmsjax.rmsprop(learning_rate=0.01, decay=0.9)
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)  # 2.0 and -0.02
      >>> updates, state = opt.update(grads, state, params)
      >>> [round(float(u), 4) for u in updates["w"]]
      [-0.0316, 0.0316]
    """
    check_learning_rate("learning_rate", learning_rate)
    check_storage("mu_dtype", mu_dtype)  # also when not centered: a typo fails early
    common: dict[str, Any] = dict(
        decay=decay,
        eps=eps,
        initial_scale=initial_scale,
        eps_in_sqrt=eps_in_sqrt,
        bias_correction=bias_correction,
        promote_half=promote_half,
        nu_dtype=nu_dtype,
    )
    scaler = (
        T.scale_by_centered_rms(**common, mu_dtype=mu_dtype)
        if centered
        else T.scale_by_rms(**common)
    )
    with argument_names({"accumulator_dtype": "momentum_dtype"}):
        buffer = _momentum(momentum, nesterov, momentum_dtype, promote_half=promote_half)
    if momentum is None:
        check_storage("momentum_dtype", momentum_dtype)
    return optax.chain(scaler, T.scale_by_learning_rate(learning_rate), buffer)


@document_storage
def adamw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | Storage | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | None = None,
    *,
    nesterov: bool = False,
    promote_half: bool = True,
    nu_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with decoupled weight decay (Loshchilov & Hutter 2019).

    .. math::
      u_t = -\eta_t \left( \frac{\hat m_t}{\sqrt{\hat\nu_t + \epsilon_{root}} + \epsilon}
      + \lambda_t\,\theta_{t-1} \right)

    with :math:`\hat m_t, \hat\nu_t` Adam's bias-corrected moments (see
    :func:`rmsjax.scale_by_adam`).

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or a schedule.
      b1, b2: moment decays, in [0, 1).
      eps, eps_root: >= 0, outside and inside the square root.
      mu_dtype: storage of the first moment :math:`m`: {storage}.
      weight_decay: :math:`\lambda`, a float >= 0 or a schedule. optax's default 1e-4 (torch's
        AdamW defaults to 1e-2, Keras' to 4e-3: see ``rmsjax.compat``).
      mask: which leaves are decayed (a boolean tree or a callable returning one).
      nesterov: NAdamW.
      promote_half: keep state of float16/bfloat16 parameters in float32 (default).
      nu_dtype: storage of the second moment :math:`\nu`: {storage}.

    Same trajectory as ``optax.adamw``. Like optax and torch, the decay is multiplied by the
    learning rate (torch: :math:`\theta \leftarrow \theta(1 - \eta\lambda)`).

    Example:
      With a zero gradient only the decay acts, :math:`u = -\eta\lambda\theta`
      (here :math:`-0.1 \cdot 0.5 \cdot 2 = -0.1`):

      >>> import jax.numpy as jnp, rmsjax
      >>> params = {"w": jnp.array([2.0])}
      >>> opt = rmsjax.adamw(learning_rate=0.1, weight_decay=0.5)
      >>> updates, _ = opt.update({"w": jnp.zeros(1)}, opt.init(params), params)
      >>> round(float(updates["w"][0]), 6)
      -0.1
    """
    check_learning_rate("learning_rate", learning_rate)
    return optax.chain(
        T.scale_by_adam(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
            promote_half=promote_half,
            nu_dtype=nu_dtype,
        ),
        T.add_decayed_weights(weight_decay, mask),
        T.scale_by_learning_rate(learning_rate),
    )


@document_storage
def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: ArrayLike | None = None,
    nesterov: bool = False,
    accumulator_dtype: DTypeLike | Storage | None = None,
    *,
    promote_half: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Stochastic gradient descent, optionally with heavy-ball or Nesterov momentum.

    .. math::
      \text{no momentum: } u_t = -\eta_t\,g_t; \qquad
      \text{momentum } \beta: m_t = g_t + \beta\,m_{t-1},\ u_t = -\eta_t\,m_t
      \ (\text{Nesterov: } u_t = -\eta_t\,(g_t + \beta\,m_t))

    with :math:`m_0 = 0`. The learning rate is applied AFTER the buffer (torch's placement; with
    a schedule this differs from Keras, which keeps :math:`\eta` inside the buffer).

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or a schedule ``count -> eta``.
      momentum: :math:`\beta` in [0, 1], or ``None`` for plain SGD.
      nesterov: Nesterov momentum; like optax, ignored when ``momentum`` is ``None``.
      accumulator_dtype: storage of the momentum buffer :math:`m`: {storage}.
      promote_half: keep the buffer of float16/bfloat16 parameters in float32 (default).

    Same trajectory as ``optax.sgd``. Differences: a half precision buffer is float32 by
    default and the update has the gradient's dtype. torch's SGD is the same for
    ``dampening=0`` (its first step copies the gradient into the buffer, which is what
    :math:`m_1 = g_1 + \beta \cdot 0` does).

    Example:
      With a constant gradient 1 the heavy-ball buffer grows as
      :math:`1, 1 + \beta, 1 + \beta + \beta^2, \ldots`:

      >>> import jax.numpy as jnp, rmsjax
      >>> params = {"w": jnp.zeros(1)}
      >>> opt = rmsjax.sgd(learning_rate=0.1, momentum=0.9)
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     updates, state = opt.update({"w": jnp.ones(1)}, state, params)
      ...     print(round(float(updates["w"][0]), 6))
      -0.1
      -0.19
      -0.271
    """
    check_learning_rate("learning_rate", learning_rate)
    check_storage("accumulator_dtype", accumulator_dtype)
    return optax.chain(
        _momentum(momentum, nesterov, accumulator_dtype, promote_half=promote_half),
        T.scale_by_learning_rate(learning_rate),
    )


@document_storage
def adam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | Storage | None = None,
    *,
    nesterov: bool = False,
    promote_half: bool = True,
    nu_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam (Kingma & Ba 2015); NAdam with ``nesterov=True``.

    .. math::
      u_t = -\eta_t\,\frac{\hat m_t}{\sqrt{\hat\nu_t + \epsilon_{root}} + \epsilon}

    with :math:`\hat m_t, \hat\nu_t` the bias-corrected moments of :func:`rmsjax.scale_by_adam`.

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or a schedule.
      b1, b2: moment decays, in [0, 1).
      eps, eps_root: >= 0, outside and inside the square root.
      mu_dtype: storage of the first moment :math:`m`: {storage}.
      nesterov: NAdam (Dozat 2016) as in optax.
      promote_half: keep the moments of float16/bfloat16 parameters in float32 (default).
      nu_dtype: storage of the second moment :math:`\nu`: {storage}.

    Same trajectory as ``optax.adam``; the differences are those of
    :func:`rmsjax.scale_by_adam` (float32 moments for half precision, 0 instead of NaN on a zero
    divisor). torch's Adam with ``weight_decay=0`` is this with its defaults; Keras' Adam uses
    the "epsilon hat" form (see ``rmsjax.compat.keras``).

    Example:
      The moments are bias-corrected, so the first step is :math:`-\eta\,g/(|g| + \epsilon)`,
      a step of :math:`\eta` against the gradient's sign, for tiny and large gradients alike:

      >>> import jax.numpy as jnp, rmsjax
      >>> params = {"w": jnp.zeros(3)}
      >>> opt = rmsjax.adam(learning_rate=0.01)
      >>> grads = {"w": jnp.array([1e-3, -5.0, 200.0])}
      >>> updates, _ = opt.update(grads, opt.init(params), params)
      >>> [round(float(u), 5) for u in updates["w"]]
      [-0.01, 0.01, -0.01]
    """
    check_learning_rate("learning_rate", learning_rate)
    return optax.chain(
        T.scale_by_adam(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
            promote_half=promote_half,
            nu_dtype=nu_dtype,
        ),
        T.scale_by_learning_rate(learning_rate),
    )


@document_storage
def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: ArrayLike = 0.1,
    eps: ArrayLike = 1e-7,
    *,
    promote_half: bool = True,
    sum_of_squares_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGrad (Duchi, Hazan & Singer 2011): steps shrink with the sum of past squared gradients.

    .. math::
      s_t = s_{t-1} + |g_t|^2, \qquad u_t = -\eta_t\,g_t / \sqrt{s_t + \epsilon}

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or a schedule.
      initial_accumulator_value: :math:`s_0`, >= 0 (optax/Keras 0.1, torch 0).
      eps: :math:`\epsilon` inside the square root, >= 0.
      promote_half: keep :math:`s` of float16/bfloat16 parameters in float32 (default).
      sum_of_squares_dtype: storage of :math:`s`: {storage}.

    Same trajectory as ``optax.adagrad``; differences as in :func:`rmsjax.scale_by_rss`.
    torch's Adagrad puts :math:`\epsilon` outside the root, starts the sum at 0 and has an
    ``lr_decay``; Keras' matches this one (see ``rmsjax.compat``).
    """
    check_learning_rate("learning_rate", learning_rate)
    return optax.chain(
        T.scale_by_rss(
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            promote_half=promote_half,
            sum_of_squares_dtype=sum_of_squares_dtype,
        ),
        T.scale_by_learning_rate(learning_rate),
    )


@document_storage
def adadelta(
    learning_rate: ScalarOrSchedule | None = None,
    rho: ArrayLike = 0.9,
    eps: ArrayLike = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Any | None = None,
    *,
    promote_half: bool = True,
    e_g_dtype: DTypeLike | Storage | None = None,
    e_x_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaDelta (Zeiler 2012), with optional coupled (L2) weight decay.

    .. math::
      \tilde g_t = g_t + \lambda_t\,\theta_{t-1}, \qquad
      u_t = -\eta_t\,\frac{\sqrt{E[\Delta^2]_{t-1} + \epsilon}}{\sqrt{E[g^2]_t + \epsilon}}
      \,\tilde g_t

    with the two moving averages of :func:`rmsjax.scale_by_adadelta` (of :math:`|\tilde g|^2`
    and of the squared unscaled step).

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or a schedule; ``None`` means :math:`\eta = 1`
        (the algorithm as published, and torch's default).
      rho: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon`, > 0.
      weight_decay: :math:`\lambda`, a float >= 0 or a schedule (added to the gradient before
        the rescaling, as in optax and torch).
      weight_decay_mask: which leaves are decayed (a boolean tree or a callable returning one).
      promote_half: keep the averages of float16/bfloat16 parameters in float32 (default).
      e_g_dtype: storage of :math:`E[g^2]`: {storage}.
      e_x_dtype: storage of :math:`E[\Delta^2]`: {storage}.

    Same trajectory as ``optax.adadelta`` when a ``learning_rate`` is given, for real
    parameters. Differences: with ``learning_rate=None`` optax applies no scaling at all and so
    no sign flip: it moves UP the gradient. rmsjax descends, with an effective rate of 1.0.
    For complex parameters rmsjax uses :math:`|g|^2` (optax :math:`g^2`, see
    :func:`rmsjax.scale_by_adadelta`).
    """
    if learning_rate is not None:
        check_learning_rate("learning_rate", learning_rate)
    return optax.chain(
        T.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        T.scale_by_adadelta(
            rho=rho, eps=eps, promote_half=promote_half, e_g_dtype=e_g_dtype, e_x_dtype=e_x_dtype
        ),
        T.scale_by_learning_rate(1.0 if learning_rate is None else learning_rate),
    )


def rprop(
    learning_rate: ScalarOrSchedule,
    eta_minus: ArrayLike = 0.5,
    eta_plus: ArrayLike = 1.2,
    min_step_size: ArrayLike = 1e-6,
    max_step_size: ArrayLike = 50.0,
    *,
    promote_half: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Rprop (Riedmiller & Braun 1993) as ``torch.optim.Rprop`` runs it: sign-based steps.

    .. math::
      u_t = -\operatorname{sign}(\tilde g_t)\,\delta_t

    with the per-element step sizes :math:`\delta_t` and the flip-masked gradient
    :math:`\tilde g_t` of :func:`rmsjax.scale_by_rprop`: a step grows by ``eta_plus`` while the
    gradient keeps its sign, shrinks by ``eta_minus`` and is skipped when it flips, and stays
    in ``[min_step_size, max_step_size]``. Meant for full-batch training: with noisy
    mini-batch gradients the signs flip at random.

    Args:
      learning_rate: the initial step size :math:`\delta_0`, >= 0, or a schedule, evaluated
        once at count 0 (Rprop adapts its own steps; torch ignores later lr changes too).
      eta_minus: in (0, 1).
      eta_plus: > 1.
      min_step_size: > 0.
      max_step_size: > 0 and >= ``min_step_size``.
      promote_half: keep the state of float16/bfloat16 parameters in float32 (default).

    Differences from ``optax.rprop`` (which rmsjax considers wrong): optax applies each step one
    call late (its first update is 0), does not clip the initial step size, and fails on
    complex parameters. rmsjax gives torch's trajectory, and treats the real and imaginary parts
    of complex parameters as independent reals, as torch does.
    """
    return optax.chain(
        T.scale_by_rprop(
            learning_rate=learning_rate,
            eta_minus=eta_minus,
            eta_plus=eta_plus,
            min_step_size=min_step_size,
            max_step_size=max_step_size,
            promote_half=promote_half,
        ),
        T.scale(-1.0),
    )
