r"""The Adam family: :func:`scale_by_adam` (optax's, with NAdam), :func:`scale_by_amsgrad`,
:func:`scale_by_adam_exact_bias` (PyTorch's bias corrections) and :func:`scale_by_adam_eps_hat`
(Keras' epsilon-hat form). Notation as in :mod:`rmsjax.transforms`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike, DTypeLike

from rmsjax._numerics import (
    abs_sq,
    debias,
    ema,
    increment,
    is_positive,
    moment_div,
    precise_debias,
    safe_div,
)
from rmsjax.moments import Moment, document_storage, moment_transform
from rmsjax.storage import Storage
from rmsjax.validation import (
    check_decay,
    check_nonneg,
)

__all__ = [
    "ScaleByAdamEpsHatState",
    "ScaleByAdamExactBiasState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "scale_by_adam",
    "scale_by_adam_eps_hat",
    "scale_by_adam_exact_bias",
    "scale_by_amsgrad",
]


ScaleByAdamState = optax.ScaleByAdamState
"""State of :func:`scale_by_adam`: ``optax.ScaleByAdamState(count, mu, nu)``, the int32 count
and the first and second moments."""


def _adam_moments(
    g: jax.Array, mu: jax.Array, nu: jax.Array, b1: ArrayLike, b2: ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Adam's two updated moments (``g`` arrives in the moments' dtype, see ``map_rule``)."""
    return ema(g, mu, b1), ema(abs_sq(g), nu, b2)


def _adam_rule(
    g: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    *,
    b1: ArrayLike,
    b2: ArrayLike,
    eps: ArrayLike,
    eps_root: ArrayLike,
    c1: ArrayLike,
    c1_next: ArrayLike,
    c2: ArrayLike,
    nesterov: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    mu, nu = _adam_moments(g, mu, nu, b1, b2)
    mu_hat = b1 * (mu / c1_next) + (1 - b1) * (g / c1) if nesterov else mu / c1
    mu_hat = cast(jax.Array, mu_hat)  # jax arrays (see _numerics.ema)
    den = jnp.sqrt(nu / c2 + eps_root) + eps
    return moment_div(mu_hat, den, g, den_positive=is_positive(eps)), mu, nu


@document_storage
def scale_by_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | Storage | None = None,
    *,
    nesterov: bool = False,
    promote_half: bool = True,
    nu_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformation:
    r"""Adam's rescaling (Kingma & Ba), with optional Nesterov momentum (NAdam).

    .. math::
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) |g_t|^2

      \hat m_t = m_t / (1-\beta_1^t) \quad\text{(NAdam: }
      \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t))

      u_t = \hat m_t / (\sqrt{\nu_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon)

    Args:
      b1: :math:`\beta_1`, in [0, 1).
      b2: :math:`\beta_2`, in [0, 1).
      eps: :math:`\epsilon` outside the root, >= 0.
      eps_root: :math:`\epsilon_{root}` inside the root, >= 0.
      mu_dtype: storage of :math:`m`: {storage}.
      nesterov: NAdam (Dozat 2016) as in optax.
      promote_half: keep the moments of float16/bfloat16 leaves in float32 (default).
      nu_dtype: storage of :math:`\nu` (optax has no such argument): {storage}.

    Same numbers as ``optax.scale_by_adam`` for float32/float64; differences: half precision
    moments are float32 by default, a zero divisor gives 0 instead of NaN, and the update has
    the gradient's dtype. torch's Adam is this with ``eps_root=0`` (eps outside the root);
    Keras' Adam differs (see ``rmsjax.compat.keras``). State: optax's own
    ``ScaleByAdamState(count, mu, nu)``; integer or boolean ``mu_dtype`` is rejected, and
    integer/boolean parameters get moments in the default float dtype.

    Numerics: for :math:`|g| \ge 2^{64}` (float32) :math:`\nu` overflows to :math:`+\infty`
    and the update of that element is exactly 0 until it decays back below the largest
    float, never NaN; every smaller finite gradient gives a finite update.
    """
    check_decay("b1", b1)
    check_decay("b2", b2)
    check_nonneg("eps", eps)
    check_nonneg("eps_root", eps_root)

    def step_args(count: Any) -> dict[str, Any]:
        count = increment(count)
        return dict(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            c1=debias(b1, count),
            c1_next=debias(b1, increment(count)),
            c2=debias(b2, count),
            nesterov=nesterov,
        )

    return moment_transform(
        "scale_by_adam",
        _adam_rule,
        [Moment("mu", mu_dtype), Moment("nu", nu_dtype, real=True)],
        state=ScaleByAdamState,
        step_args=step_args,
        promote_half=promote_half,
        stage="adam",
    )


ScaleByAmsgradState = optax.ScaleByAmsgradState
"""State of :func:`scale_by_amsgrad`: ``optax.ScaleByAmsgradState(count, mu, nu, nu_max)``."""


class ScaleByAdamExactBiasState(NamedTuple):
    """State of :func:`scale_by_adam_exact_bias`: count, moments, running max of nu.

    ``nu_max`` is an empty tuple when ``amsgrad=False``.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    mu: Any
    nu: Any
    nu_max: Any


class ScaleByAdamEpsHatState(NamedTuple):
    """State of :func:`scale_by_adam_eps_hat`: count, moments, running max of nu (AMSGrad).

    ``nu_max`` is an empty tuple when ``amsgrad=False``.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    mu: Any
    nu: Any
    nu_max: Any


def _amsgrad_rule(
    g: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    *nu_max: jax.Array,
    b1: ArrayLike,
    b2: ArrayLike,
    eps: ArrayLike,
    eps_root: ArrayLike,
    c1: ArrayLike,
    c2: ArrayLike,
    max_before_correction: bool,
) -> tuple[jax.Array, ...]:
    """``(m/c1) / (sqrt(v + eps_root) + eps)``; ``v`` is ``nu/c2`` without a ``nu_max`` leaf,
    else the running max of ``nu`` then ``/c2`` (max_before_correction) or of ``nu/c2``."""
    mu, nu = _adam_moments(g, mu, nu, b1, b2)
    if not nu_max:
        return moment_div(mu / c1, jnp.sqrt(nu / c2 + eps_root) + eps, g), mu, nu
    if max_before_correction:
        new_max = jnp.maximum(nu_max[0], nu)
        nu_hat = new_max / c2
    else:
        new_max = jnp.maximum(nu_max[0], nu / c2)
        nu_hat = new_max
    return moment_div(mu / c1, jnp.sqrt(nu_hat + eps_root) + eps, g), mu, nu, new_max


def _adam_eps_hat_rule(
    g: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    *nu_max: jax.Array,
    b1: ArrayLike,
    b2: ArrayLike,
    eps: ArrayLike,
    alpha: ArrayLike,
) -> tuple[jax.Array, ...]:
    """``alpha * m / (sqrt(v) + eps)``; ``v`` is ``nu``, or the running max of the raw ``nu``
    when a ``nu_max`` leaf is given."""
    mu, nu = _adam_moments(g, mu, nu, b1, b2)
    if nu_max:
        new_max = jnp.maximum(nu_max[0], nu)
        return safe_div(mu * alpha, jnp.sqrt(new_max) + eps), mu, nu, new_max
    # |mu| <= (1 - b1^t) max|g| (a zero-started average), so |mu * alpha| <= sqrt(1 - b2^t)
    # max|g|: the numerator cannot overflow, and an overflowed nu gives finite / inf = 0
    # without the guard of moment_div.
    return safe_div(mu * alpha, jnp.sqrt(nu) + eps), mu, nu


def _adam_with_max(
    name: str,
    state_cls: type,
    rule: Callable[..., tuple[jax.Array, ...]],
    step_args: Callable[[jax.Array], Mapping[str, Any]],
    *,
    track_max: bool,
    mu_dtype: DTypeLike | Storage | None,
    nu_dtype: DTypeLike | Storage | None,
    promote_half: bool,
    stage: str | None = None,
) -> optax.GradientTransformation:
    """The Adam forms above: state ``state_cls(count, mu, nu, nu_max)``, with ``nu_max = ()``
    unless ``track_max``; ``step_args`` gets the incremented count. ``nu_max`` is stored like
    ``nu`` (``nu_dtype``), as torchao stores ``max_exp_avg_sq``. ``stage``: the rule's stage
    name without the maximum (see :mod:`rmsjax.stages`)."""
    moments = [
        Moment("mu", mu_dtype),
        Moment("nu", nu_dtype, real=True),
        Moment("nu_max", nu_dtype, argument="nu_dtype", real=True, present=track_max),
    ]
    return moment_transform(
        name,
        rule,
        moments,
        state=state_cls,
        step_args=lambda count: step_args(increment(count)),
        promote_half=promote_half,
        stage=None if track_max else stage,
    )


@document_storage
def scale_by_amsgrad(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | Storage | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    max_before_correction: bool = False,
    promote_half: bool = True,
    nu_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformation:
    r"""AMSGrad (Reddi et al. 2018): Adam divided by the running maximum of the second moment.

    .. math::
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) |g_t|^2, \quad
      \hat m_t = m_t / c_1, \quad c_k = 1 - \beta_k^t

      \text{optax (default): } \hat\nu_t = \max_{s \le t} \nu_s / c_2(s); \qquad
      \text{max\_before\_correction: } \hat\nu_t = \max_{s \le t} \nu_s \,/\, c_2(t)

      u_t = \hat m_t / (\sqrt{\hat\nu_t + \epsilon_{root}} + \epsilon)

    Args:
      b1, b2: moment decays, in [0, 1).
      eps, eps_root: >= 0, outside and inside the square root.
      mu_dtype: storage of :math:`m`: {storage}.
      bias_correction_mu: divide :math:`m` by :math:`c_1` (False: :math:`c_1 = 1`).
      bias_correction_nu: divide :math:`\nu` by :math:`c_2` (False: :math:`c_2 = 1`).
      max_before_correction: take the maximum over the raw :math:`\nu` and correct the maximum
        with the current :math:`c_2`, as ``torch.optim.Adam(amsgrad=True)`` and Keras do.
        optax (the default, False) maximises the corrected :math:`\nu_s / c_2(s)`. The two
        differ in the first steps, where :math:`c_2` changes fastest.
      promote_half: keep the moments of float16/bfloat16 leaves in float32 (default).
      nu_dtype: storage of :math:`\nu` and of its running maximum: {storage}.

    Same numbers as ``optax.scale_by_amsgrad`` with the default ``max_before_correction``;
    like the other rmsjax transformations, a zero divisor gives 0 instead of NaN and ``nu`` of
    complex leaves is stored real. State: optax's own
    ``ScaleByAmsgradState(count, mu, nu, nu_max)``. Numerics as :func:`scale_by_adam` (an
    overflowed :math:`\nu_{max}` stays :math:`+\infty`, so that element's updates stay 0).
    """
    check_decay("b1", b1)
    check_decay("b2", b2)
    check_nonneg("eps", eps)
    check_nonneg("eps_root", eps_root)

    def step_args(count: jax.Array) -> dict[str, Any]:
        return dict(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            c1=debias(b1, count) if bias_correction_mu else 1.0,
            c2=debias(b2, count) if bias_correction_nu else 1.0,
            max_before_correction=max_before_correction,
        )

    return _adam_with_max(
        "scale_by_amsgrad",
        ScaleByAmsgradState,
        _amsgrad_rule,
        step_args,
        track_max=True,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        promote_half=promote_half,
    )


@document_storage
def scale_by_adam_exact_bias(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    amsgrad: bool = False,
    promote_half: bool = True,
    mu_dtype: DTypeLike | Storage | None = None,
    nu_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformation:
    r"""Adam / AMSGrad with bias corrections accurate to the last bit (``torch.optim.Adam``).

    .. math::
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) |g_t|^2, \quad c_k = 1 - \beta_k^t

      u_t = \frac{m_t / c_1}{\sqrt{v_t / c_2} + \epsilon}

    with :math:`v_t = \nu_t`, or with ``amsgrad`` the running maximum of the RAW
    :math:`\nu_s` (corrected afterwards with the current :math:`c_2`, as torch and Keras do;
    optax's ``scale_by_amsgrad`` maximises :math:`\nu_s / c_2(s)`). :math:`c_k` comes from
    :func:`precise_debias`.

    Args:
      b1, b2: moment decays, in [0, 1).
      eps: :math:`\epsilon`, >= 0, outside the root.
      amsgrad: AMSGrad on the raw second moment.
      promote_half: keep the moments of float16/bfloat16 leaves in float32 (default).
      mu_dtype: storage of :math:`m`: {storage}.
      nu_dtype: storage of :math:`\nu` (and of its maximum): {storage}.

    Versus :func:`rmsjax.scale_by_adam` (optax's numbers): identical in float64; in float32,
    optax's ``1 - b2**t`` is off by up to 1.3e-5 relative in the first steps, which moves a
    float32 trajectory by ~1e-5 of the parameter scale away from torch's.
    """
    check_decay("b1", b1)
    check_decay("b2", b2)
    check_nonneg("eps", eps)

    def step_args(count: jax.Array) -> dict[str, Any]:
        return dict(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=0.0,
            c1=precise_debias(b1, count),
            c2=precise_debias(b2, count),
            max_before_correction=True,
        )

    return _adam_with_max(
        "scale_by_adam_exact_bias",
        ScaleByAdamExactBiasState,
        _amsgrad_rule,
        step_args,
        track_max=amsgrad,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        promote_half=promote_half,
        stage="adam",
    )


@document_storage
def scale_by_adam_eps_hat(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-7,
    *,
    amsgrad: bool = False,
    promote_half: bool = True,
    mu_dtype: DTypeLike | Storage | None = None,
    nu_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformation:
    r"""Adam in the "epsilon hat" form of Kingma & Ba (sec. 2), as Keras computes it.

    .. math::
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) |g_t|^2

      \alpha_t = \sqrt{1-\beta_2^t} \,/\, (1-\beta_1^t), \qquad
      u_t = \alpha_t\, m_t / (\sqrt{v_t} + \hat\epsilon)

    with :math:`v_t = \nu_t`, or :math:`\max_{s\le t}\nu_s` (the raw moment) when ``amsgrad``.
    Compared with :func:`rmsjax.scale_by_adam` (optax, PyTorch), the bias correction of the
    second moment multiplies the step instead of dividing :math:`\nu`, so :math:`\hat\epsilon`
    acts like :math:`\epsilon = \hat\epsilon / \sqrt{1-\beta_2^t}` there: 32 times larger on
    the first step with :math:`\beta_2 = 0.999`. The two agree when
    :math:`|g| \gg \hat\epsilon`, and differ by orders of magnitude for tiny gradients.

    Args:
      b1, b2: moment decays, in [0, 1).
      eps: :math:`\hat\epsilon`, >= 0 (Keras' ``epsilon``, default 1e-7).
      amsgrad: divide by the running maximum of the raw :math:`\nu` (Keras' ``amsgrad``).
      promote_half: keep the moments of float16/bfloat16 leaves in float32 (default).
      mu_dtype: storage of :math:`m`: {storage}.
      nu_dtype: storage of :math:`\nu` (and of its maximum): {storage}.

    optax has no counterpart. A zero divisor gives 0.
    """
    check_decay("b1", b1)
    check_decay("b2", b2)
    check_nonneg("eps", eps)

    def step_args(count: jax.Array) -> dict[str, Any]:
        alpha = jnp.sqrt(debias(b2, count)) / debias(b1, count)
        return dict(b1=b1, b2=b2, eps=eps, alpha=alpha)

    return _adam_with_max(
        "scale_by_adam_eps_hat",
        ScaleByAdamEpsHatState,
        _adam_eps_hat_rule,
        step_args,
        track_max=amsgrad,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        promote_half=promote_half,
        stage="adam_eps_hat",
    )
