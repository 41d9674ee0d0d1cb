r"""Gradient transformations on the optax protocol.

Each transformation is an ``optax.GradientTransformation`` whose numerics are a small pure
function for ONE array (the ``_..._rule`` functions below), lifted over pytrees by
:func:`rmsjax.tree.map_rule`. Names, signatures and defaults are optax 0.2.x's; every
deliberate difference from optax is listed in the function's docstring under "Differences".

Notation used in the docstrings: :math:`g` the incoming update (usually the gradient),
:math:`t` the step count after increment (the first step has :math:`t = 1`), :math:`|g|^2`
the squared modulus (:math:`g^2` for real :math:`g`).

Shared behaviour of every transformation here:

* the returned update has the gradient's dtype; state leaves keep their dtype;
* state of float16/bfloat16 leaves is kept in float32 unless ``promote_half=False``;
* ``None`` gradient leaves pass through and leave their state untouched;
* a division whose denominator is exactly zero yields 0 instead of NaN/Inf (optax returns NaN
  for a zero gradient with ``eps=0``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from rmsjax.tree import map_rule, state_like
from rmsjax.validation import check_in_range, is_concrete

__all__ = [
    "AddDecayedWeightsState",
    "ScaleByAdaDeltaState",
    "ScaleByAdamState",
    "ScaleByCenteredRmsState",
    "ScaleByRStdDevState",
    "ScaleByRmsState",
    "ScaleByRpropState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "ScaleState",
    "TraceState",
    "add_decayed_weights",
    "scale",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_centered_rms",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_rprop",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_stddev",
    "trace",
]

Schedule = Callable[[jax.Array], ArrayLike]
ScalarOrSchedule = float | jax.Array | Schedule

ScaleState = optax.EmptyState


# --------------------------------------------------------------------------------------------
# Small shared numerics (one array at a time)
# --------------------------------------------------------------------------------------------


def abs_sq(x: jax.Array) -> jax.Array:
    """:math:`|x|^2` as a real array (``x * x`` for real ``x``)."""
    if jnp.iscomplexobj(x):
        return jnp.real(x) ** 2 + jnp.imag(x) ** 2
    return x * x


def ema(new: jax.Array, old: jax.Array, decay: ArrayLike) -> jax.Array:
    """Exponential moving average ``(1 - decay) * new + decay * old`` (optax's operand order)."""
    return (1 - decay) * new + decay * old


def _select(ok: jax.Array, x: jax.Array, fill: float) -> jax.Array:
    """``where(ok, x, fill)``; a bare ``lax.select`` when shapes agree, which keeps the traced
    program (and so the compile time of trees with thousands of leaves) small."""
    if ok.shape != jnp.shape(x):
        return jnp.where(ok, x, fill)
    return jax.lax.select(ok, x, jax.lax.full_like(x, fill))


def safe_div(num: jax.Array, den: jax.Array, *, den_positive: bool = False) -> jax.Array:
    """``num / den``, and 0 where ``den == 0`` (no NaN/Inf from 0/0 or x/0, gradients too).

    A NaN divisor still gives NaN (a broken run must not look healthy). ``den_positive=True``
    says the caller knows ``den > 0`` (e.g. it adds a concrete positive eps): plain division.
    """
    if den_positive:
        return num / den
    ok = den != 0
    return _select(ok, num / _select(ok, den, 1), 0)


def safe_rsqrt_scale(g: jax.Array, den2: jax.Array, *, den_positive: bool = False) -> jax.Array:
    """``g / sqrt(den2)`` computed as ``g * rsqrt(den2)``, and 0 where ``den2 == 0``."""
    if den_positive:
        return g * jax.lax.rsqrt(den2)
    ok = den2 != 0
    return _select(ok, g * jax.lax.rsqrt(_select(ok, den2, 1)), 0)


def is_positive(value: Any) -> bool:
    """True when ``value`` is concrete (not traced, not a schedule) and every element is > 0."""
    return is_concrete(value) and bool(np.all(np.asarray(value) > 0))


def rms_scale(g: jax.Array, second: jax.Array, eps: ArrayLike, *, eps_in_sqrt: bool) -> jax.Array:
    """Divide ``g`` by ``sqrt(second + eps)`` or by ``sqrt(second) + eps`` (``second >= 0``).

    A zero divisor (only possible with ``eps = 0``) gives 0; with a concrete ``eps > 0`` the
    divisor cannot be zero and no guard is emitted (same numbers, smaller program).
    """
    if eps_in_sqrt:
        return safe_rsqrt_scale(g, second + eps, den_positive=is_positive(eps))
    return safe_div(g, jnp.sqrt(second) + eps, den_positive=is_positive(eps))


def debias(decay: ArrayLike, count: jax.Array) -> jax.Array:
    """``1 - decay**count``: what a zero-started EMA is divided by to remove its bias."""
    return 1 - decay**count


def _unbias(moment: jax.Array, correction: ArrayLike | None) -> jax.Array:
    """``moment / correction`` (see :func:`debias`); ``None`` means no correction."""
    return moment if correction is None else moment / correction


def _increment(count: jax.Array) -> jax.Array:
    """``count + 1`` saturating at the int32 maximum instead of wrapping around."""
    top = jnp.iinfo(jnp.int32).max
    return jnp.where(count < top, count + 1, top).astype(jnp.int32)


def _zero_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def _check_decay(name: str, value: Any) -> None:
    check_in_range(
        name,
        value,
        low=0.0,
        high=1.0,
        high_open=True,
        hint="It is the decay rate of a moving average; 1 would never forget (use AdaGrad).",
    )


def _check_nonneg(name: str, value: Any) -> None:
    check_in_range(name, value, low=0.0)


def _check_learning_rate(name: str, value: Any) -> None:
    check_in_range(
        name, value, low=0.0, hint="Pass a non-negative step size or a schedule (a callable)."
    )


# --------------------------------------------------------------------------------------------
# scale, scale_by_learning_rate, scale_by_schedule
# --------------------------------------------------------------------------------------------


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: the number of updates done so far (int32)."""

    count: jax.Array


def _scale_rule(g: jax.Array, step_size: ArrayLike) -> tuple[jax.Array]:
    return (jnp.asarray(step_size, dtype=g.dtype) * g,)


def scale(step_size: ArrayLike) -> optax.GradientTransformation:
    r"""Multiply updates by a fixed ``step_size``: :math:`u = s\,g`.

    Args:
      step_size: any finite real number (traced values allowed).

    Same as ``optax.scale``.
    """
    check_in_range("step_size", step_size)

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        out, _ = map_rule(lambda g: _scale_rule(g, step_size), updates)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_schedule(step_size_fn: Schedule) -> optax.GradientTransformation:
    r"""Multiply updates by ``step_size_fn(count)``, count = 0, 1, 2, ... (int32).

    :math:`u_t = s(t - 1)\,g_t`. Same as ``optax.scale_by_schedule``.

    Args:
      step_size_fn: a callable ``count -> step size`` (any real value, jit-safe); a
        non-callable raises ``TypeError``.
    """
    if not callable(step_size_fn):
        raise TypeError(
            f"`step_size_fn` must be a callable schedule count -> step size, got {step_size_fn!r}."
        )

    def init_fn(params: Any) -> ScaleByScheduleState:
        del params
        return ScaleByScheduleState(count=_zero_count())

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        step_size = step_size_fn(state.count)
        out, _ = map_rule(lambda g: _scale_rule(g, step_size), updates)
        return out, ScaleByScheduleState(count=_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule | None = None, *, flip_sign: bool = True
) -> optax.GradientTransformation:
    r"""Multiply updates by :math:`-\eta` (or :math:`+\eta` when ``flip_sign=False``).

    Args:
      learning_rate: a non-negative finite float, a traced scalar, or a schedule
        ``count -> lr`` evaluated at 0, 1, 2, ...; ``None`` means no scaling (identity).
      flip_sign: negate the learning rate (descent), the default.

    Same as ``optax.scale_by_learning_rate``, plus a ``ValueError`` for a negative or non-finite
    concrete ``learning_rate``.
    """
    if learning_rate is None:
        return optax.identity()
    sign = -1 if flip_sign else 1
    if callable(learning_rate):
        schedule = learning_rate
        return scale_by_schedule(lambda count: sign * schedule(count))
    _check_learning_rate("learning_rate", learning_rate)
    return scale(sign * learning_rate)


# --------------------------------------------------------------------------------------------
# scale_by_rms / scale_by_centered_rms
# --------------------------------------------------------------------------------------------


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: update count (int32) and the EMA of :math:`|g|^2`."""

    count: jax.Array
    nu: Any


class ScaleByCenteredRmsState(NamedTuple):
    """State of :func:`scale_by_centered_rms`: count, EMA of :math:`g` and of :math:`|g|^2`."""

    count: jax.Array
    mu: Any
    nu: Any


ScaleByRStdDevState = ScaleByCenteredRmsState


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
    return rms_scale(g, _unbias(nu, correction), eps, eps_in_sqrt=eps_in_sqrt), nu


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
    variance = jnp.maximum(_unbias(nu, correction) - abs_sq(_unbias(mu, correction)), 0)
    return rms_scale(g, variance, eps, eps_in_sqrt=eps_in_sqrt), mu, nu


def _check_rms_args(decay: Any, eps: Any, initial_scale: Any) -> None:
    _check_decay("decay", decay)
    _check_nonneg("eps", eps)
    _check_nonneg("initial_scale", initial_scale)


def scale_by_rms(
    decay: ArrayLike = 0.9,
    eps: ArrayLike = 1e-8,
    initial_scale: ArrayLike = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    promote_half: bool = True,
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

    Differences from ``optax.scale_by_rms``: the state always carries an int32 ``count``; half
    precision state is float32 by default; a zero divisor (``eps=0`` and :math:`\nu=0`) gives a
    zero update instead of NaN; complex leaves keep :math:`\nu` in the real dtype (optax stores
    a complex array with zero imaginary part). PyTorch's RMSprop uses ``eps_in_sqrt=False``.
    """
    _check_rms_args(decay, eps, initial_scale)

    def init_fn(params: Any) -> ScaleByRmsState:
        nu = state_like(params, initial_scale, promote_half=promote_half, real=True)
        return ScaleByRmsState(count=_zero_count(), nu=nu)

    def update_fn(updates: Any, state: ScaleByRmsState, params: Any = None) -> tuple[Any, Any]:
        del params
        count = _increment(state.count)
        correction = debias(decay, count) if bias_correction else None
        rule = lambda g, nu: _rms_rule(
            g, nu, decay=decay, eps=eps, correction=correction, eps_in_sqrt=eps_in_sqrt
        )
        out, (nu,) = map_rule(rule, updates, (state.nu,))
        return out, ScaleByRmsState(count=count, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_centered_rms(
    decay: ArrayLike = 0.9,
    eps: ArrayLike = 1e-8,
    initial_scale: ArrayLike = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    promote_half: bool = True,
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

    Differences from ``optax.scale_by_stddev`` (and torch's ``centered=True``): the variance is
    clamped at 0. When gradients are nearly constant, :math:`\hat\nu - |\hat\mu|^2` is a
    difference of two almost equal numbers and rounds below zero (after a few hundred steps
    with :math:`\rho = 0.9`); optax and torch then take the root of a negative number and
    return NaN, rmsjax returns :math:`g/\sqrt{\epsilon}` (or 0 when :math:`\epsilon = 0`).
    Also: an int32 ``count`` is always kept, half precision state is float32 by default, and
    :math:`\nu` of complex leaves is stored real.
    """
    _check_rms_args(decay, eps, initial_scale)

    def init_fn(params: Any) -> ScaleByCenteredRmsState:
        mu = state_like(params, 0.0, promote_half=promote_half)
        nu = state_like(params, initial_scale, promote_half=promote_half, real=True)
        return ScaleByCenteredRmsState(count=_zero_count(), mu=mu, nu=nu)

    def update_fn(
        updates: Any, state: ScaleByCenteredRmsState, params: Any = None
    ) -> tuple[Any, Any]:
        del params
        count = _increment(state.count)
        correction = debias(decay, count) if bias_correction else None
        rule = lambda g, mu, nu: _centered_rms_rule(
            g, mu, nu, decay=decay, eps=eps, correction=correction, eps_in_sqrt=eps_in_sqrt
        )
        out, (mu, nu) = map_rule(rule, updates, (state.mu, state.nu))
        return out, ScaleByCenteredRmsState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


scale_by_stddev = scale_by_centered_rms


# --------------------------------------------------------------------------------------------
# trace (heavy-ball / Nesterov momentum)
# --------------------------------------------------------------------------------------------


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer."""

    trace: Any


def _trace_rule(
    g: jax.Array, m: jax.Array, *, decay: ArrayLike, nesterov: bool
) -> tuple[jax.Array, jax.Array]:
    m = g + decay * m
    return (g + decay * m if nesterov else m), m


def trace(
    decay: ArrayLike,
    nesterov: bool = False,
    accumulator_dtype: DTypeLike | None = None,
    *,
    promote_half: bool = True,
) -> optax.GradientTransformation:
    r"""Heavy-ball momentum: :math:`m_t = g_t + \beta\,m_{t-1}`, :math:`u_t = m_t`.

    With ``nesterov=True``, :math:`u_t = g_t + \beta\,m_t`. There is no dampening: this is the
    undamped buffer of optax and of torch's SGD with ``dampening=0``.

    Args:
      decay: :math:`\beta`, in [0, 1].
      nesterov: use Nesterov's look-ahead form.
      accumulator_dtype: dtype of :math:`m`; ``None`` uses the parameter's dtype (float32 for
        float16/bfloat16 parameters unless ``promote_half=False``).
      promote_half: see :func:`scale_by_rms`.

    Differences from ``optax.trace``: half precision buffers are float32 by default, and the
    update has the gradient's dtype (optax returns the buffer's dtype).
    """
    check_in_range("decay", decay, low=0.0, high=1.0)

    def init_fn(params: Any) -> TraceState:
        return TraceState(
            trace=state_like(params, 0.0, dtype=accumulator_dtype, promote_half=promote_half)
        )

    def update_fn(updates: Any, state: TraceState, params: Any = None) -> tuple[Any, Any]:
        del params
        rule = lambda g, m: _trace_rule(g, m, decay=decay, nesterov=nesterov)
        out, (m,) = map_rule(rule, updates, (state.trace,))
        return out, TraceState(trace=m)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# add_decayed_weights (coupled decay when placed before the scaling, AdamW when after)
# --------------------------------------------------------------------------------------------


class AddDecayedWeightsState(NamedTuple):
    """State of :func:`add_decayed_weights`: update count (int32) for a schedule."""

    count: jax.Array


def _decay_rule(g: jax.Array, p: jax.Array, weight_decay: ArrayLike) -> tuple[jax.Array]:
    return (g + weight_decay * p,)


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    r"""Add the parameters scaled by the weight decay: :math:`u_t = g_t + \lambda_t\,\theta_t`.

    Placed before an adaptive scaling it is L2 regularisation ("coupled", torch's
    ``weight_decay``); placed after it, as in :func:`rmsjax.adamw`, it is decoupled weight
    decay (Loshchilov & Hutter).

    Args:
      weight_decay: :math:`\lambda`, a float >= 0 or a schedule ``count -> lambda`` evaluated
        at 0, 1, 2, ...
      mask: a tree of booleans with the params' structure (or a prefix of it), or a callable
        ``params -> such a tree``; leaves marked False are left undecayed (via
        ``optax.masked``).

    Same numbers as ``optax.add_decayed_weights``; the state is always
    ``AddDecayedWeightsState(count)``. Raises ``ValueError`` when ``params`` is not given.
    """
    if not callable(weight_decay):
        _check_nonneg("weight_decay", weight_decay)
    coefficient = weight_decay if callable(weight_decay) else lambda count: weight_decay
    return _params_rule_transform(
        _decay_rule, coefficient, AddDecayedWeightsState, "add_decayed_weights", mask
    )


def _params_rule_transform(
    rule: Callable[[jax.Array, jax.Array, ArrayLike], tuple[jax.Array]],
    coefficient: Callable[[jax.Array], ArrayLike],
    state_cls: Callable[..., Any],
    name: str,
    mask: Any | Callable[[Any], Any] | None,
) -> optax.GradientTransformation:
    """``u_t = rule(g_t, params, coefficient(count))`` (count 0, 1, 2, ...) with state
    ``state_cls(count)``, optionally masked; shared by :func:`add_decayed_weights` and
    :func:`rmsjax.decoupled_weight_decay`. ``name`` is the public name used in errors."""

    def init_fn(params: Any) -> Any:
        del params
        return state_cls(count=_zero_count())

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError(f"{name} needs the parameters: call `update(grads, state, params)`.")
        c = coefficient(state.count)
        out, _ = map_rule(lambda g, p: rule(g, p, c), updates, extras=(params,))
        return out, state_cls(count=_increment(state.count))

    transform = optax.GradientTransformation(init_fn, update_fn)
    return transform if mask is None else optax.masked(transform, mask)


# --------------------------------------------------------------------------------------------
# scale_by_adam
# --------------------------------------------------------------------------------------------


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: count (int32), first and second moments."""

    count: jax.Array
    mu: Any
    nu: Any


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
    mu = ema(g, mu, b1)
    nu = ema(abs_sq(g), nu, b2)
    mu_hat = b1 * (mu / c1_next) + (1 - b1) * (g / c1) if nesterov else mu / c1
    den = jnp.sqrt(nu / c2 + eps_root) + eps
    return safe_div(mu_hat, den, den_positive=is_positive(eps)), mu, nu


def scale_by_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
    promote_half: bool = True,
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
      mu_dtype: dtype of :math:`m`; ``None`` uses the parameter dtype (float32 for half).
      nesterov: NAdam (Dozat 2016) as in optax.
      promote_half: keep the moments of float16/bfloat16 leaves in float32 (default).

    Same numbers as ``optax.scale_by_adam`` for float32/float64; differences: half precision
    moments are float32 by default, a zero divisor gives 0 instead of NaN, and the update has
    the gradient's dtype. torch's Adam is this with ``eps_root=0`` (eps outside the root);
    Keras' Adam differs (see ``rmsjax.compat.keras``).
    """
    _check_decay("b1", b1)
    _check_decay("b2", b2)
    _check_nonneg("eps", eps)
    _check_nonneg("eps_root", eps_root)

    def init_fn(params: Any) -> ScaleByAdamState:
        mu = state_like(params, 0.0, dtype=mu_dtype, promote_half=promote_half)
        nu = state_like(params, 0.0, promote_half=promote_half, real=True)
        return ScaleByAdamState(count=_zero_count(), mu=mu, nu=nu)

    def update_fn(updates: Any, state: ScaleByAdamState, params: Any = None) -> tuple[Any, Any]:
        del params
        count = _increment(state.count)
        c1, c2 = debias(b1, count), debias(b2, count)
        c1_next = debias(b1, _increment(count))
        rule = lambda g, mu, nu: _adam_rule(
            g,
            mu,
            nu,
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            c1=c1,
            c1_next=c1_next,
            c2=c2,
            nesterov=nesterov,
        )
        out, (mu, nu) = map_rule(rule, updates, (state.mu, state.nu))
        return out, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# scale_by_rss (AdaGrad)
# --------------------------------------------------------------------------------------------


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: the running sum of :math:`|g|^2` (real)."""

    sum_of_squares: Any


def _rss_rule(
    g: jax.Array, s: jax.Array, *, eps: ArrayLike, eps_in_sqrt: bool
) -> tuple[jax.Array, jax.Array]:
    s = s + abs_sq(g)
    return rms_scale(g, s, eps, eps_in_sqrt=eps_in_sqrt), s


def scale_by_rss(
    initial_accumulator_value: ArrayLike = 0.1,
    eps: ArrayLike = 1e-7,
    *,
    eps_in_sqrt: bool = True,
    promote_half: bool = True,
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

    Same numbers as ``optax.scale_by_rss`` with the default ``eps_in_sqrt=True`` (optax has no
    eps-outside form). Differences: complex leaves keep :math:`s` in the real dtype (optax
    stores a complex array with zero imaginary part), half precision state is float32 by
    default, the update has the gradient's dtype, and where :math:`s_t + \epsilon` is exactly 0
    the update is 0 (optax tests :math:`s_t > 0` instead, which differs only when
    :math:`|g|^2` underflows to 0 while :math:`g \ne 0`). With ``eps_in_sqrt=False`` a zero
    divisor (:math:`s_t = 0` and :math:`\epsilon = 0`) gives 0, where torch gives NaN.
    """
    _check_nonneg("initial_accumulator_value", initial_accumulator_value)
    _check_nonneg("eps", eps)

    def init_fn(params: Any) -> ScaleByRssState:
        s = state_like(params, initial_accumulator_value, promote_half=promote_half, real=True)
        return ScaleByRssState(sum_of_squares=s)

    def update_fn(updates: Any, state: ScaleByRssState, params: Any = None) -> tuple[Any, Any]:
        del params
        out, (s,) = map_rule(
            lambda g, s: _rss_rule(g, s, eps=eps, eps_in_sqrt=eps_in_sqrt),
            updates,
            (state.sum_of_squares,),
        )
        return out, ScaleByRssState(sum_of_squares=s)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# scale_by_adadelta
# --------------------------------------------------------------------------------------------


class ScaleByAdaDeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta`: moving averages of :math:`|g|^2` and :math:`|u|^2`."""

    e_g: Any
    e_x: Any


def _adadelta_rule(
    g: jax.Array, e_g: jax.Array, e_x: jax.Array, *, rho: ArrayLike, eps: ArrayLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
    e_g = ema(abs_sq(g), e_g, rho)
    u = safe_div(jnp.sqrt(e_x + eps), jnp.sqrt(e_g + eps)) * g
    e_x = ema(abs_sq(u), e_x, rho)
    return u, e_g, e_x


def scale_by_adadelta(
    rho: ArrayLike = 0.9,
    eps: ArrayLike = 1e-6,
    *,
    promote_half: bool = True,
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

    Same numbers as ``optax.scale_by_adadelta`` for real leaves. Differences: complex leaves
    use :math:`|g|^2` and :math:`|u|^2` with real state (optax squares the complex numbers,
    :math:`g^2`, which is not a magnitude: the "average square" then rotates with the phase of
    :math:`g` and the step is wrong); half precision state is float32 by default; the update
    has the gradient's dtype.
    """
    _check_decay("rho", rho)
    check_in_range(
        "eps",
        eps,
        low=0.0,
        low_open=True,
        hint="AdaDelta's steps start at sqrt(eps)-size; with eps = 0 it never moves.",
    )

    def init_fn(params: Any) -> ScaleByAdaDeltaState:
        e_g = state_like(params, 0.0, promote_half=promote_half, real=True)
        e_x = state_like(params, 0.0, promote_half=promote_half, real=True)
        return ScaleByAdaDeltaState(e_g=e_g, e_x=e_x)

    def update_fn(updates: Any, state: ScaleByAdaDeltaState, params: Any = None) -> tuple[Any, Any]:
        del params
        rule = lambda g, e_g, e_x: _adadelta_rule(g, e_g, e_x, rho=rho, eps=eps)
        out, (e_g, e_x) = map_rule(rule, updates, (state.e_g, state.e_x))
        return out, ScaleByAdaDeltaState(e_g=e_g, e_x=e_x)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# scale_by_rprop (resilient backpropagation, torch.optim.Rprop's variant)
# --------------------------------------------------------------------------------------------


class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop`: per-element step sizes and the previous gradient.

    ``prev_updates`` holds the previous incoming update (gradient), set to 0 where its sign
    flipped; for complex leaves both arrays hold the real and imaginary parts' values.
    """

    step_sizes: Any
    prev_updates: Any


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
    if not callable(learning_rate):
        _check_learning_rate("learning_rate", learning_rate)
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
            raise ValueError(
                f"`min_step_size` ({min_step_size!r}) must not exceed `max_step_size` "
                f"({max_step_size!r}): the step sizes are clipped to [min_step_size, "
                "max_step_size]."
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

    Complex leaves: the real and imaginary parts are treated as independent real parameters,
    each with its own step size (torch's behaviour); both are stored in one complex array.

    Differences from ``optax.scale_by_rprop`` (same signature and sign convention): optax
    emits each step one call late, so its first update is 0 and every later one belongs to
    the previous gradient; it also skips the clip when :math:`s_t = 0`, so a ``learning_rate``
    outside :math:`[\delta_{min}, \delta_{max}]` is used unclipped; and it fails on complex
    leaves inside ``jnp.clip``. rmsjax follows the published algorithm as torch implements it.
    """
    _check_rprop_args(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size)
    hyper = dict(
        eta_minus=eta_minus,
        eta_plus=eta_plus,
        min_step_size=min_step_size,
        max_step_size=max_step_size,
    )

    def init_fn(params: Any) -> ScaleByRpropState:
        lr = learning_rate(0) if callable(learning_rate) else learning_rate
        both = lambda s: jax.lax.complex(jnp.real(s), jnp.real(s)) if jnp.iscomplexobj(s) else s
        steps = jax.tree.map(both, state_like(params, lr, promote_half=promote_half))
        prev = state_like(params, 0.0, promote_half=promote_half)
        return ScaleByRpropState(step_sizes=steps, prev_updates=prev)

    def update_fn(updates: Any, state: ScaleByRpropState, params: Any = None) -> tuple[Any, Any]:
        del params
        rule = lambda g, step, prev: _rprop_rule(g, step, prev, **hyper)
        out, (steps, prev) = map_rule(rule, updates, (state.step_sizes, state.prev_updates))
        return out, ScaleByRpropState(step_sizes=steps, prev_updates=prev)

    return optax.GradientTransformation(init_fn, update_fn)
