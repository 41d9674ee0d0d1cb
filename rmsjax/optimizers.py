r"""Ready optimizers: short chains of the transformations in :mod:`rmsjax.transforms`.

Names, signatures and defaults are optax 0.2.x's, so ``optax.rmsprop`` can be swapped for
``rmsjax.rmsprop``. Each returns an ``optax.GradientTransformationExtraArgs``.
"""

from __future__ import annotations

from typing import Any

import optax
from jax.typing import ArrayLike, DTypeLike

from rmsjax import transforms as T
from rmsjax.validation import check_in_range

__all__ = ["adamw", "rmsprop"]


def rmsprop(
    learning_rate: T.ScalarOrSchedule,
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

    Same trajectory as ``optax.rmsprop`` to float32 rounding. Deliberate differences: the
    centered variance is clamped at zero (optax and torch return NaN once it rounds negative),
    half precision state is float32 by default, and a zero divisor gives a zero step.
    """
    T._check_learning_rate("learning_rate", learning_rate)
    if momentum is not None:
        check_in_range("momentum", momentum, low=0.0, high=1.0)
    scaler = T.scale_by_centered_rms if centered else T.scale_by_rms
    return optax.chain(
        scaler(
            decay=decay,
            eps=eps,
            initial_scale=initial_scale,
            eps_in_sqrt=eps_in_sqrt,
            bias_correction=bias_correction,
            promote_half=promote_half,
        ),
        T.scale_by_learning_rate(learning_rate),
        T.trace(decay=momentum, nesterov=nesterov, promote_half=promote_half)
        if momentum is not None
        else optax.identity(),
    )


def adamw(
    learning_rate: T.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    weight_decay: T.ScalarOrSchedule = 1e-4,
    mask: Any | None = None,
    *,
    nesterov: bool = False,
    promote_half: bool = True,
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
      mu_dtype: dtype of the first moment (``None``: the parameter's, float32 for half).
      weight_decay: :math:`\lambda`, a float >= 0 or a schedule. optax's default 1e-4 (torch's
        AdamW defaults to 1e-2, Keras' to 4e-3: see ``rmsjax.compat``).
      mask: which leaves are decayed (a boolean tree or a callable returning one).
      nesterov: NAdamW.
      promote_half: keep state of float16/bfloat16 parameters in float32 (default).

    Same trajectory as ``optax.adamw``. Like optax and torch, the decay is multiplied by the
    learning rate (torch: :math:`\theta \leftarrow \theta(1 - \eta\lambda)`).
    """
    T._check_learning_rate("learning_rate", learning_rate)
    return optax.chain(
        T.scale_by_adam(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
            promote_half=promote_half,
        ),
        T.add_decayed_weights(weight_decay, mask),
        T.scale_by_learning_rate(learning_rate),
    )
