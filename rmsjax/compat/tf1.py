r"""TensorFlow 1's ``tf.compat.v1.train.RMSPropOptimizer``, as an optax-protocol transformation.

Reproduces the ``ApplyRMSProp`` / ``ApplyCenteredRMSProp`` kernels (checked against a NumPy
statement of the kernels in ``tests/reference/generate.py``, float64 and float32).
"""

from __future__ import annotations

import optax
from jax.typing import ArrayLike

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.compat._common import descend, is_static_zero
from rmsjax.validation import argument_names

__all__ = ["rmsprop"]


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: ArrayLike = 0.9,
    momentum: ArrayLike = 0.0,
    epsilon: ArrayLike = 1e-10,
    centered: bool = False,
) -> optax.GradientTransformation:
    r"""TF1 ``RMSPropOptimizer`` (``ApplyRMSProp``, ``ApplyCenteredRMSProp``).

    .. math::
      ms_t = ms_{t-1} + (g_t^2 - ms_{t-1})(1-\rho) \quad (ms_0 = 1), \qquad
      mg_t = mg_{t-1} + (g_t - mg_{t-1})(1-\rho) \quad (mg_0 = 0)

      mom_t = \beta\,mom_{t-1} + \eta_t\, g_t / \sqrt{ms_t + \epsilon}
      \quad\text{(centered: } \sqrt{ms_t - mg_t^2 + \epsilon}), \qquad
      \theta \mathrel{-}= mom_t

    The mean square starts at ONE (optax, torch and Keras start at 0): the first steps are
    much smaller than :math:`\eta`, and with tiny gradients the run barely moves for about
    :math:`\log(\epsilon\text{-scale})/\log\rho` steps. ``epsilon`` is inside the root and the
    learning rate inside the momentum buffer. This is ``rmsjax.rmsprop(learning_rate, decay,
    epsilon, initial_scale=1.0, centered=centered, momentum=momentum)``. Chain:
    ``scale_by_rms | scale_by_centered_rms (initial_scale=1), scale_by_learning_rate,
    [trace(momentum)]``.

    Args:
      learning_rate: >= 0 or a schedule ``count -> lr`` (TF1: a tensor computed from the
        global step, which counts 0, 1, 2, ... as here).
      decay: :math:`\rho`, in [0, 1). momentum: :math:`\beta`, in [0, 1]. epsilon: >= 0.
      centered: divide by the estimated standard deviation.

    TF1 always keeps a momentum slot; here a ``momentum`` given as the Python number 0 keeps
    none (same numbers). Difference from TF1: the centered variance is clamped at 0. Errors
    name TF1's arguments (``epsilon``, ``momentum``), also where the range is checked by the
    underlying rmsjax transformation.
    """
    scaler = T.scale_by_centered_rms if centered else T.scale_by_rms
    with argument_names({"eps": "epsilon"}):
        mean_square = scaler(decay=decay, eps=epsilon, initial_scale=1.0, eps_in_sqrt=True)
    with argument_names({"decay": "momentum"}):
        buffer = [] if is_static_zero(momentum) else [T.trace(decay=momentum)]
    return optax.chain(mean_square, descend(learning_rate), *buffer)
