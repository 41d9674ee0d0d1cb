r"""The RMS family: divide by the root of an average (or sum) of squared gradients.

:func:`scale_by_rms` (RMSProp), :func:`scale_by_centered_rms` (centered RMSProp, optax's
``scale_by_stddev``), :func:`scale_by_rss` (AdaGrad) and :func:`scale_by_adadelta` (AdaDelta).
Notation as in :mod:`rmsjax.transforms`.
"""

from __future__ import annotations

from collections.abc import Callable
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
    rms_scale,
    safe_div,
    select,
    unbias,
)
from rmsjax.moments import Moment, document_storage, moment_transform
from rmsjax.storage import Storage
from rmsjax.validation import (
    check_decay,
    check_in_range,
    check_nonneg,
)

__all__ = [
    "ScaleByAdaDeltaState",
    "ScaleByCenteredVarianceState",
    "ScaleByCenteredVarianceWithCountState",
    "ScaleByCenteredRmsState",
    "ScaleByRStdDevState",
    "ScaleByRStdDevWithCountState",
    "ScaleByRmsState",
    "ScaleByRmsWithCountState",
    "ScaleByRssState",
    "scale_by_adadelta",
    "scale_by_centered_rms",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_stddev",
]

# The states are optax's own classes, so a state (or an Orbax checkpoint of one) moves freely
# between optax and rmsjax. optax 0.2.x defines the two counted states without exporting them
# from its top-level package; they are taken from where optax defines them.
ScaleByRmsState = optax.ScaleByRmsState
"""State of :func:`scale_by_rms` without bias correction: ``optax.ScaleByRmsState(nu)``."""

ScaleByRStdDevState = optax.ScaleByRStdDevState
"""State of :func:`scale_by_centered_rms` without bias correction:
``optax.ScaleByRStdDevState(mu, nu)``."""

ScaleByCenteredRmsState = ScaleByRStdDevState


class ScaleByCenteredVarianceState(NamedTuple):
    r"""State of :func:`scale_by_centered_rms` in its variance form (``variance=True``): the
    moving mean :math:`\mu` and the moving variance :math:`s` of the gradients."""

    mu: Any
    var: Any


class ScaleByCenteredVarianceWithCountState(NamedTuple):
    """:class:`ScaleByCenteredVarianceState` with the update count (int32), for
    ``bias_correction``."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    mu: Any
    var: Any


try:
    from optax._src.transform import ScaleByRmsWithCountState, ScaleByRStdDevWithCountState
except ImportError:  # pragma: no cover - an optax without them has no such layout to match

    class ScaleByRmsWithCountState(NamedTuple):  # type: ignore[no-redef]
        """State of :func:`scale_by_rms` with bias correction: count (int32) and nu."""

        count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
        nu: Any

    class ScaleByRStdDevWithCountState(NamedTuple):  # type: ignore[no-redef]
        """State of :func:`scale_by_centered_rms` with bias correction: count, mu, nu."""

        count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
        mu: Any
        nu: Any


def _rms_rule(
    g: jax.Array,
    nu: jax.Array,
    *,
    decay: ArrayLike,
    eps: ArrayLike,
    correction: ArrayLike | None,
    eps_in_sqrt: bool,
) -> tuple[jax.Array, jax.Array]:
    nu = ema(abs_sq(g), nu, decay)
    return rms_scale(g, unbias(nu, correction), eps, eps_in_sqrt=eps_in_sqrt), nu


def _centered_rms_rule(
    g: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    *,
    decay: ArrayLike,
    eps: ArrayLike,
    correction: ArrayLike | None,
    eps_in_sqrt: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    mu = ema(g, mu, decay)
    nu = ema(abs_sq(g), nu, decay)
    nu_hat = unbias(nu, correction)
    # Clamped at 0 (it rounds below 0 for near-constant gradients); +inf where the second
    # moment overflowed (|g| >= 2**64 in float32), where the difference would be inf - inf.
    variance = jnp.maximum(nu_hat - abs_sq(unbias(mu, correction)), 0)
    variance = select(nu_hat != jnp.inf, variance, jnp.inf)
    return rms_scale(g, variance, eps, eps_in_sqrt=eps_in_sqrt), mu, nu


def _rms_step_args(
    decay: Any, eps: Any, eps_in_sqrt: bool, bias_correction: bool
) -> Callable[[Any], dict[str, Any]]:
    """The arguments of the two RMS rules at the step after ``count`` updates."""

    def step_args(count: Any) -> dict[str, Any]:
        correction = debias(decay, increment(count)) if bias_correction else None
        return dict(decay=decay, eps=eps, correction=correction, eps_in_sqrt=eps_in_sqrt)

    return step_args


def _centered_variance_rule(
    g: jax.Array,
    mu: jax.Array,
    var: jax.Array,
    *,
    decay: ArrayLike,
    eps: ArrayLike,
    correction: ArrayLike | None,
    eps_in_sqrt: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    # s_t = rho (s_{t-1} + (1 - rho) |g_t - mu_{t-1}|^2) is nu_t - |mu_t|^2 exactly (in exact
    # arithmetic): a sum of non-negative terms, with nothing to cancel.
    deviation = abs_sq(g - mu)
    mu = ema(g, mu, decay)
    var = cast(jax.Array, decay * (var + (1 - decay) * deviation))
    variance: jax.Array = var
    if correction is not None:
        # nu_hat - |mu_hat|^2 = s / c + |mu|^2 (c - 1) / c^2, clamped at 0 (c - 1 <= 0)
        c = correction
        variance = jnp.maximum(var / c + abs_sq(mu) * ((c - 1) / c**2), 0)
        variance = select(var != jnp.inf, variance, jnp.inf)
    return rms_scale(g, variance, eps, eps_in_sqrt=eps_in_sqrt), mu, var


def _check_rms_args(decay: Any, eps: Any, initial_scale: Any) -> None:
    check_decay("decay", decay)
    check_nonneg("eps", eps)
    check_nonneg("initial_scale", initial_scale)


@document_storage
def scale_by_rms(
    decay: ArrayLike = 0.9,
    eps: ArrayLike = 1e-8,
    initial_scale: ArrayLike = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    promote_half: bool = True,
    nu_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformation:
    r"""Divide updates by the root of a moving average of their squares (RMSProp's core).

    .. math::
      \nu_t = \rho\,\nu_{t-1} + (1 - \rho)\,|g_t|^2, \qquad
      \hat\nu_t = \nu_t / (1 - \rho^t) \text{ if bias\_correction else } \nu_t

      u_t = g_t / \sqrt{\hat\nu_t + \epsilon} \text{ (eps\_in\_sqrt) }
      \quad\text{or}\quad u_t = g_t / (\sqrt{\hat\nu_t} + \epsilon)

    with :math:`\nu_0` = ``initial_scale``.

    Args:
      decay: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon`, >= 0.
      initial_scale: :math:`\nu_0`, >= 0 (TF1 uses 1, PyTorch and optax 0). Bias correction
        assumes 0, as in optax.
      eps_in_sqrt: put :math:`\epsilon` inside the square root (optax/Keras/TF1) or outside
        (PyTorch).
      bias_correction: divide :math:`\nu_t` by :math:`1 - \rho^t` (Adam-style).
      promote_half: keep :math:`\nu` of float16/bfloat16 leaves in float32 (default); False
        stores it in the leaf's dtype, saving memory but overflowing float16 for
        :math:`|g| > 256` and underflowing for :math:`|g| < 10^{-4}`, as optax does.
      nu_dtype: storage of :math:`\nu`: {storage}.

    State: optax's own, ``ScaleByRmsState(nu)``, or ``ScaleByRmsWithCountState(count, nu)``
    with ``bias_correction`` (int32 ``count``), so a state or checkpoint written by
    ``optax.scale_by_rms`` is read as is (and vice versa). Integer and boolean parameters get
    a state in the default float dtype.

    Numerics: for float32 gradients with :math:`|g| \ge 2^{64} \approx 1.8447 \cdot 10^{19}`
    the square overflows, :math:`\nu` becomes :math:`+\infty` and the update is exactly 0
    (:math:`g / \sqrt{\infty}`): a documented zero step, never NaN, on this and on every later
    step of that element (:math:`\rho \cdot \infty` stays infinite). With
    ``bias_correction`` the threshold can be a rounding below :math:`2^{64}`, where
    :math:`\nu / (1 - \rho^t)` rounds past the largest float. Below it every finite gradient
    gives a finite update (denormals count as 0: XLA flushes them). For float64 the threshold
    is :math:`\sqrt{\max} \approx 1.3 \cdot 10^{154}`. Non-finite gradients (NaN,
    :math:`\pm\infty`) give NaN, as in optax.
    """
    _check_rms_args(decay, eps, initial_scale)
    step_args = _rms_step_args(decay, eps, eps_in_sqrt, bias_correction)
    return moment_transform(
        "scale_by_rms",
        _rms_rule,
        [Moment("nu", nu_dtype, fill=initial_scale, real=True)],
        state=ScaleByRmsWithCountState if bias_correction else ScaleByRmsState,
        step_args=step_args,
        promote_half=promote_half,
        stage="rms",
    )


@document_storage
def scale_by_centered_rms(
    decay: ArrayLike = 0.9,
    eps: ArrayLike = 1e-8,
    initial_scale: ArrayLike = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    promote_half: bool = True,
    mu_dtype: DTypeLike | Storage | None = None,
    nu_dtype: DTypeLike | Storage | None = None,
    variance: bool | None = None,
) -> optax.GradientTransformation:
    r"""Divide updates by a moving estimate of their standard deviation (centered RMSProp).

    .. math::
      \mu_t = \rho\,\mu_{t-1} + (1 - \rho)\,g_t, \qquad
      \nu_t = \rho\,\nu_{t-1} + (1 - \rho)\,|g_t|^2

      \sigma^2_t = \max(\hat\nu_t - |\hat\mu_t|^2,\ 0), \qquad
      u_t = g_t / \sqrt{\sigma^2_t + \epsilon} \text{ or } g_t / (\sqrt{\sigma^2_t} + \epsilon)

    where hats divide by :math:`1 - \rho^t` when ``bias_correction``; :math:`\mu_0 = 0`,
    :math:`\nu_0` = ``initial_scale``. optax names this ``scale_by_stddev``; that name is
    exported too.

    Args:
      decay: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon`, >= 0.
      initial_scale: :math:`\nu_0`, >= 0.
      eps_in_sqrt: :math:`\epsilon` inside (default) or outside the square root.
      bias_correction: divide both moments by :math:`1 - \rho^t`.
      promote_half: keep the moments of float16/bfloat16 leaves in float32 (default).
      mu_dtype: storage of :math:`\mu`: {storage}.
      nu_dtype: storage of :math:`\nu` (of :math:`s` in the variance form): {storage}.
      variance: keep the variance itself instead of :math:`\nu` (the *variance form*):

        .. math::
          s_t = \rho\,\big(s_{t-1} + (1-\rho)\,|g_t - \mu_{t-1}|^2\big), \quad s_0 = \nu_0,
          \qquad \sigma^2_t = \max\big(s_t / c + |\mu_t|^2 (c - 1)/c^2,\ 0\big)

        (:math:`c = 1 - \rho^t` with ``bias_correction``, else 1): in exact arithmetic
        :math:`s_t = \nu_t - |\mu_t|^2`, so the step is the same, but :math:`s` is a sum of
        non-negative terms and needs no difference of two stored moments. ``None`` (default):
        the variance form exactly when ``nu_dtype`` is a storage whose rounding would cancel
        that difference (``Storage.cancels_differences``: 4-bit codes, :func:`rmsjax.factored`),
        else optax's form. State: ``ScaleByCenteredVarianceState(mu, var)``, or
        ``ScaleByCenteredVarianceWithCountState(count, mu, var)`` with ``bias_correction``.

    Differences from ``optax.scale_by_stddev`` (and torch's ``centered=True``): the variance is
    clamped at 0. When gradients are nearly constant, :math:`\hat\nu - |\hat\mu|^2` is a
    difference of two almost equal numbers and rounds below zero (after a few hundred steps
    with :math:`\rho = 0.9`); optax and torch then take the root of a negative number and
    return NaN, rmsjax returns :math:`g/\sqrt{\epsilon}` (or 0 when :math:`\epsilon = 0`).
    Where :math:`\hat\nu` is :math:`+\infty` (see Numerics) the variance is :math:`+\infty`
    and the update 0; optax computes :math:`\infty - \infty` and returns NaN as soon as
    :math:`|\hat\mu|^2` overflows as well (float32, :math:`\rho = 0.9`: from
    :math:`|g| \approx 1.8 \cdot 10^{20}` on the first step). Also: half precision state is
    float32 by default, and :math:`\nu` of complex leaves is stored real.

    State: optax's own, ``ScaleByRStdDevState(mu, nu)``, or
    ``ScaleByRStdDevWithCountState(count, mu, nu)`` with ``bias_correction``.

    Numerics: as :func:`scale_by_rms` (a zero step, never NaN, once :math:`\nu` overflows);
    the variance of an infinite :math:`\hat\nu` is taken as :math:`+\infty`. The clamp
    matters most for quantized moments: :math:`\hat\nu` and :math:`\hat\mu` are each rounded
    to a few significant digits, so for near-constant gradients :math:`\hat\nu - |\hat\mu|^2`
    is often below 0; the clamp makes every finite gradient give a finite update with any
    storage (tested over hundreds of steps at 8 and 4 bits).
    """
    _check_rms_args(decay, eps, initial_scale)
    step_args = _rms_step_args(decay, eps, eps_in_sqrt, bias_correction)
    if variance is None:
        variance = bool(getattr(nu_dtype, "cancels_differences", False))
    if variance:
        return moment_transform(
            "scale_by_centered_rms",
            _centered_variance_rule,
            [
                Moment("mu", mu_dtype),
                Moment("var", nu_dtype, argument="nu_dtype", fill=initial_scale, real=True),
            ],
            state=(
                ScaleByCenteredVarianceWithCountState
                if bias_correction
                else ScaleByCenteredVarianceState
            ),
            step_args=step_args,
            promote_half=promote_half,
        )
    return moment_transform(
        "scale_by_centered_rms",
        _centered_rms_rule,
        [Moment("mu", mu_dtype), Moment("nu", nu_dtype, fill=initial_scale, real=True)],
        state=ScaleByRStdDevWithCountState if bias_correction else ScaleByRStdDevState,
        step_args=step_args,
        promote_half=promote_half,
        stage="centered_rms",
    )


scale_by_stddev = scale_by_centered_rms


ScaleByRssState = optax.ScaleByRssState
"""State of :func:`scale_by_rss`: ``optax.ScaleByRssState(sum_of_squares)``, the running sum
of :math:`|g|^2` (real)."""


def _rss_rule(
    g: jax.Array, s: jax.Array, *, eps: ArrayLike, eps_in_sqrt: bool
) -> tuple[jax.Array, jax.Array]:
    s = s + abs_sq(g)
    return rms_scale(g, s, eps, eps_in_sqrt=eps_in_sqrt), s


@document_storage
def scale_by_rss(
    initial_accumulator_value: ArrayLike = 0.1,
    eps: ArrayLike = 1e-7,
    *,
    eps_in_sqrt: bool = True,
    promote_half: bool = True,
    sum_of_squares_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformation:
    r"""Divide updates by the root of the sum of all past squared updates (AdaGrad's core).

    .. math::
      s_t = s_{t-1} + |g_t|^2, \qquad u_t = g_t / \sqrt{s_t + \epsilon}
      \text{ (eps\_in\_sqrt) } \quad\text{or}\quad u_t = g_t / (\sqrt{s_t} + \epsilon)

    with :math:`s_0` = ``initial_accumulator_value``. The sum only grows, so the step only
    shrinks; :func:`scale_by_rms` replaces it by a moving average.

    Args:
      initial_accumulator_value: :math:`s_0`, >= 0 (optax and Keras 0.1, torch 0).
      eps: :math:`\epsilon`, >= 0 (optax and Keras 1e-7, torch 1e-10).
      eps_in_sqrt: put :math:`\epsilon` inside the square root (optax, Keras; the default) or
        outside it (``torch.optim.Adagrad``, used by ``rmsjax.compat.pytorch.adagrad``). The
        two differ where :math:`s_t` is comparable to :math:`\epsilon` (tiny gradients, or a
        zero start).
      promote_half: keep :math:`s` of float16/bfloat16 leaves in float32 (default); False
        stores it in the leaf's dtype, as optax does (float16 overflows once the sum passes
        65504).
      sum_of_squares_dtype: storage of :math:`s`: {storage}.

    Same numbers as ``optax.scale_by_rss`` with the default ``eps_in_sqrt=True`` (optax has no
    eps-outside form). Differences: complex leaves keep :math:`s` in the real dtype (optax
    stores a complex array with zero imaginary part), half precision state is float32 by
    default, the update has the gradient's dtype, and where :math:`s_t + \epsilon` is exactly 0
    the update is 0 (optax tests :math:`s_t > 0` instead, which differs only when
    :math:`|g|^2` underflows to 0 while :math:`g \ne 0`). With ``eps_in_sqrt=False`` a zero
    divisor (:math:`s_t = 0` and :math:`\epsilon = 0`) gives 0, where torch gives NaN.

    State: optax's own ``ScaleByRssState(sum_of_squares)``.

    Numerics: once the float32 sum passes the largest float (a single :math:`|g| \ge 2^{64}`
    does it, or many smaller squares) it is :math:`+\infty` and the updates of that element
    are exactly 0 from then on: a documented zero step, never NaN. Below that every finite
    gradient gives a finite update.
    """
    check_nonneg("initial_accumulator_value", initial_accumulator_value)
    check_nonneg("eps", eps)
    moment = Moment(
        "sum_of_squares", sum_of_squares_dtype, fill=initial_accumulator_value, real=True
    )
    return moment_transform(
        "scale_by_rss",
        _rss_rule,
        [moment],
        state=ScaleByRssState,
        step_args=lambda _: dict(eps=eps, eps_in_sqrt=eps_in_sqrt),
        promote_half=promote_half,
    )


ScaleByAdaDeltaState = optax.ScaleByAdaDeltaState
"""State of :func:`scale_by_adadelta`: ``optax.ScaleByAdaDeltaState(e_g, e_x)``, the moving
averages of :math:`|g|^2` and :math:`|u|^2`."""


def _adadelta_rule(
    g: jax.Array, e_g: jax.Array, e_x: jax.Array, *, rho: ArrayLike, eps: ArrayLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
    e_g = ema(abs_sq(g), e_g, rho)
    u = safe_div(jnp.sqrt(e_x + eps), jnp.sqrt(e_g + eps)) * g
    e_x = ema(abs_sq(u), e_x, rho)
    return u, e_g, e_x


@document_storage
def scale_by_adadelta(
    rho: ArrayLike = 0.9,
    eps: ArrayLike = 1e-6,
    *,
    promote_half: bool = True,
    e_g_dtype: DTypeLike | Storage | None = None,
    e_x_dtype: DTypeLike | Storage | None = None,
) -> optax.GradientTransformation:
    r"""AdaDelta's rescaling (Zeiler 2012): RMS of past steps over RMS of past gradients.

    .. math::
      E[g^2]_t = \rho\,E[g^2]_{t-1} + (1-\rho)\,|g_t|^2

      u_t = \frac{\sqrt{E[\Delta^2]_{t-1} + \epsilon}}{\sqrt{E[g^2]_t + \epsilon}}\; g_t,
      \qquad E[\Delta^2]_t = \rho\,E[\Delta^2]_{t-1} + (1-\rho)\,|u_t|^2

    with both averages starting at 0. The numerator carries the units of the parameter, so
    AdaDelta needs no learning rate (multiply by :math:`-1`, or by :math:`-\eta`, to descend:
    :func:`rmsjax.adadelta` does).

    Args:
      rho: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon`, > 0. It sets the size of the first steps
        (:math:`\sqrt{\epsilon / ((1-\rho)|g|^2)}\,|g|` on step one); with 0 AdaDelta never
        moves, so 0 is rejected.
      promote_half: keep both averages of float16/bfloat16 leaves in float32 (default).
      e_g_dtype: storage of :math:`E[g^2]`: {storage}.
      e_x_dtype: storage of :math:`E[\Delta^2]`: {storage}.

    Same numbers as ``optax.scale_by_adadelta`` for real leaves. Differences: complex leaves
    use :math:`|g|^2` and :math:`|u|^2` with real state (optax squares the complex numbers,
    :math:`g^2`, which is not a magnitude: the "average square" then rotates with the phase of
    :math:`g` and the step is wrong); half precision state is float32 by default; the update
    has the gradient's dtype. State: optax's own ``ScaleByAdaDeltaState(e_g, e_x)``.

    Numerics: for :math:`|g| \ge 2^{64}` (float32) :math:`E[g^2]` overflows to
    :math:`+\infty` and the update of that element is exactly 0, now and later (a documented
    zero step, never NaN).
    """
    check_decay("rho", rho)
    check_in_range(
        "eps",
        eps,
        low=0.0,
        low_open=True,
        hint="AdaDelta's steps start at sqrt(eps)-size; with eps = 0 it never moves.",
    )
    return moment_transform(
        "scale_by_adadelta",
        _adadelta_rule,
        [Moment("e_g", e_g_dtype, real=True), Moment("e_x", e_x_dtype, real=True)],
        state=ScaleByAdaDeltaState,
        step_args=lambda _: dict(rho=rho, eps=eps),
        promote_half=promote_half,
    )
