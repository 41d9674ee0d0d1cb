r"""Transformations for the places where PyTorch, Keras and TF1 compute differently from optax.

The framework presets in :mod:`rmsjax.compat` are chains of rmsjax transformations; the ones
here are the building blocks optax has no exact counterpart for:

* :func:`split_real_and_imaginary` -- treat the real and imaginary parts of complex leaves as
  independent real parameters (PyTorch's ``torch.view_as_real``: per-component moments).
* :func:`dampened_trace` -- PyTorch SGD momentum: the first step copies the gradient into the
  buffer, later steps add ``(1 - dampening) * g``.
* :func:`scale_by_amsgrad` -- AMSGrad, with the running maximum taken either over the
  bias-corrected second moment (optax) or over the raw one (PyTorch, Keras).
* :func:`scale_by_adam_exact_bias` -- PyTorch's Adam: bias corrections as accurate as torch's
  float64 host arithmetic, AMSGrad over the raw second moment.
* :func:`scale_by_adam_eps_hat` -- Keras' Adam: the bias correction of the second moment is
  folded into the step size, so :math:`\hat\epsilon` is added to the uncorrected root.
* :func:`decoupled_weight_decay` -- :math:`u \mathrel{-}= \eta_t \lambda \theta`, added after
  the learning rate (and after any momentum buffer): PyTorch's AdamW and Keras'
  ``weight_decay``.

Notation as in :mod:`rmsjax.transforms`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from rmsjax.transforms import (
    ScalarOrSchedule,
    _check_decay,
    _check_learning_rate,
    _check_nonneg,
    _increment,
    _params_rule_transform,
    _zero_count,
    abs_sq,
    debias,
    ema,
    safe_div,
)
from rmsjax.tree import map_rule, state_like
from rmsjax.validation import check_in_range, is_concrete

__all__ = [
    "DampenedTraceState",
    "DecoupledWeightDecayState",
    "ScaleByAdamEpsHatState",
    "ScaleByAdamExactBiasState",
    "ScaleByAmsgradState",
    "SplitRealAndImaginaryState",
    "dampened_trace",
    "decoupled_weight_decay",
    "precise_debias",
    "scale_by_adam_eps_hat",
    "scale_by_adam_exact_bias",
    "scale_by_amsgrad",
    "split_real_and_imaginary",
]


# --------------------------------------------------------------------------------------------
# split_real_and_imaginary (complex leaves as pairs of real leaves)
# --------------------------------------------------------------------------------------------


class _RealImag(NamedTuple):
    """A complex leaf split into its real and imaginary parts (two real leaves)."""

    real: jax.Array
    imag: jax.Array


class SplitRealAndImaginaryState(NamedTuple):
    """State of :func:`split_real_and_imaginary`: the inner transformation's state."""

    inner_state: Any


def _split(x: Any) -> Any:
    if x is not None and jnp.iscomplexobj(x):
        return _RealImag(jnp.real(x), jnp.imag(x))
    return x


def _merge(x: Any) -> Any:
    if isinstance(x, _RealImag):
        return jax.lax.complex(x.real, x.imag)
    return x


def split_real_and_imaginary(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    r"""Run ``inner`` on the real and imaginary parts of complex leaves as separate real leaves.

    A complex leaf :math:`z = x + iy` (update and parameter alike) is given to ``inner`` as two
    real leaves :math:`x` and :math:`y`, and the two resulting updates are joined back into
    :math:`u_x + i\,u_y`. Real leaves pass through unchanged. Second moments therefore become
    per component, :math:`\nu_x \leftarrow \rho\nu_x + (1-\rho)x^2` and likewise for
    :math:`y`, instead of the modulus :math:`\rho\nu + (1-\rho)|z|^2` that rmsjax and optax
    use for complex leaves. This is what every ``torch.optim`` optimizer except SGD does
    (``torch.view_as_real``).

    Gradient convention: PyTorch's ``.grad`` of a real loss of a complex parameter is the
    conjugate of ``jax.grad``'s; as with optax, pass ``jnp.conj(jax.grad(loss)(params))`` to
    descend.

    Same numbers and same name as ``optax.contrib.split_real_and_imaginary``; the merge is
    exact (``lax.complex``) and ``None`` leaves pass through.

    Args:
      inner: any gradient transformation; it only ever sees real leaves.
    """

    def init_fn(params: Any) -> SplitRealAndImaginaryState:
        return SplitRealAndImaginaryState(inner.init(jax.tree.map(_split, params)))

    def update_fn(
        updates: Any, state: SplitRealAndImaginaryState, params: Any = None
    ) -> tuple[Any, Any]:
        split_params = None if params is None else jax.tree.map(_split, params)
        out, inner_state = inner.update(
            jax.tree.map(_split, updates), state.inner_state, split_params
        )
        out = jax.tree.map(_merge, out, is_leaf=lambda x: isinstance(x, _RealImag))
        return out, SplitRealAndImaginaryState(inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# dampened_trace (PyTorch SGD momentum)
# --------------------------------------------------------------------------------------------


class DampenedTraceState(NamedTuple):
    """State of :func:`dampened_trace`: update count (int32) and the momentum buffer."""

    count: jax.Array
    trace: Any


def _dampened_trace_rule(
    g: jax.Array,
    b: jax.Array,
    *,
    first: jax.Array,
    decay: ArrayLike,
    dampening: ArrayLike,
    nesterov: bool,
) -> tuple[jax.Array, jax.Array]:
    b = jnp.where(first, g, decay * b + (1 - dampening) * g)
    return (g + decay * b if nesterov else b), b


def dampened_trace(
    decay: ArrayLike,
    dampening: ArrayLike = 0.0,
    nesterov: bool = False,
    accumulator_dtype: DTypeLike | None = None,
    *,
    promote_half: bool = True,
) -> optax.GradientTransformation:
    r"""PyTorch's SGD momentum buffer, with dampening.

    .. math::
      b_1 = g_1, \qquad b_t = \mu\,b_{t-1} + (1 - d)\,g_t \ (t > 1), \qquad
      u_t = b_t \ \text{ or (Nesterov) } \ u_t = g_t + \mu\,b_t

    Args:
      decay: :math:`\mu`, in [0, 1].
      dampening: :math:`d`, in [0, 1]. The first step is never dampened (torch copies the
        gradient into the new buffer).
      nesterov: Nesterov's look-ahead form (torch requires ``dampening == 0`` for it; this
        transformation accepts any value).
      accumulator_dtype: dtype of :math:`b` (``None``: the parameter's; float32 for half).
      promote_half: see :func:`rmsjax.scale_by_rms`.

    With ``dampening=0`` this is :func:`rmsjax.trace` (optax's ``trace``) with one extra
    count. Differences from torch: the "first step" is counted per transformation, not per
    parameter, so a leaf whose gradient is ``None`` on step 1 is not copied later.
    """
    check_in_range("decay", decay, low=0.0, high=1.0)
    check_in_range("dampening", dampening, low=0.0, high=1.0)

    def init_fn(params: Any) -> DampenedTraceState:
        buf = state_like(params, 0.0, dtype=accumulator_dtype, promote_half=promote_half)
        return DampenedTraceState(count=_zero_count(), trace=buf)

    def update_fn(updates: Any, state: DampenedTraceState, params: Any = None) -> tuple[Any, Any]:
        del params
        first = state.count == 0
        rule = lambda g, b: _dampened_trace_rule(
            g, b, first=first, decay=decay, dampening=dampening, nesterov=nesterov
        )
        out, (buf,) = map_rule(rule, updates, (state.trace,))
        return out, DampenedTraceState(count=_increment(state.count), trace=buf)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Adam with an optional running maximum of nu (AMSGrad): optax's, PyTorch's and Keras' forms
# --------------------------------------------------------------------------------------------


def precise_debias(decay: ArrayLike, count: jax.Array) -> jax.Array:
    r""":math:`1 - \beta^t` to the precision of the compute dtype, as ``-expm1(t log beta)``.

    ``1 - beta**t`` in float32 loses up to :math:`10^{-5}` relative for :math:`\beta = 0.999`:
    ``0.999`` itself rounds to ``0.99900001`` in float32, and the subtraction cancels. Here
    :math:`\log\beta` of a concrete :math:`\beta` is taken on the host in float64 (PyTorch
    computes the whole correction on the host in float64); a traced :math:`\beta` falls back
    to ``jnp.log`` in the compute dtype.

    Args:
      decay: :math:`\beta`, in [0, 1) (validated by the transformations that call this).
      count: :math:`t`, the int32 step count after increment (>= 1).
    """
    if is_concrete(decay):
        d = float(np.asarray(decay))
        log_decay: Any = math.log(d) if d > 0 else -math.inf
    else:
        log_decay = jnp.log(decay)
    return -jnp.expm1(count * log_decay)


class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_amsgrad`: count, moments and the running maximum of nu."""

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


class ScaleByAdamExactBiasState(NamedTuple):
    """State of :func:`scale_by_adam_exact_bias`: count, moments, running max of nu.

    ``nu_max`` is an empty tuple when ``amsgrad=False``.
    """

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


class ScaleByAdamEpsHatState(NamedTuple):
    """State of :func:`scale_by_adam_eps_hat`: count, moments, running max of nu (AMSGrad).

    ``nu_max`` is an empty tuple when ``amsgrad=False``.
    """

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def _adam_moments(
    g: jax.Array, mu: jax.Array, nu: jax.Array, b1: ArrayLike, b2: ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Adam's two updated moments (``g`` arrives in the moments' dtype, see ``map_rule``)."""
    return ema(g, mu, b1), ema(abs_sq(g), nu, b2)


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
        return safe_div(mu / c1, jnp.sqrt(nu / c2 + eps_root) + eps), mu, nu
    if max_before_correction:
        new_max = jnp.maximum(nu_max[0], nu)
        nu_hat = new_max / c2
    else:
        new_max = jnp.maximum(nu_max[0], nu / c2)
        nu_hat = new_max
    return safe_div(mu / c1, jnp.sqrt(nu_hat + eps_root) + eps), mu, nu, new_max


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
    return safe_div(mu * alpha, jnp.sqrt(nu) + eps), mu, nu


def _adam_with_max(
    state_cls: Callable[..., Any],
    rule: Callable[..., tuple[jax.Array, ...]],
    step_args: Callable[[jax.Array], dict[str, Any]],
    *,
    track_max: bool,
    mu_dtype: DTypeLike | None,
    promote_half: bool,
) -> optax.GradientTransformation:
    """The init/update shared by the Adam forms above.

    State ``state_cls(count, mu, nu, nu_max)``, with ``nu_max = ()`` unless ``track_max``;
    each step, ``rule(g, mu, nu, [nu_max], **step_args(count))`` with the incremented count.
    """

    def init_fn(params: Any) -> Any:
        mu = state_like(params, 0.0, dtype=mu_dtype, promote_half=promote_half)
        nu = state_like(params, 0.0, promote_half=promote_half, real=True)
        nu_max = state_like(params, 0.0, promote_half=promote_half, real=True) if track_max else ()
        return state_cls(count=_zero_count(), mu=mu, nu=nu, nu_max=nu_max)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        count = _increment(state.count)
        kwargs = step_args(count)
        states = (state.mu, state.nu, state.nu_max) if track_max else (state.mu, state.nu)
        out, (mu, nu, *mx) = map_rule(lambda *a: rule(*a, **kwargs), updates, states)
        nu_max = mx[0] if track_max else ()
        return out, state_cls(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_amsgrad(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    max_before_correction: bool = False,
    promote_half: bool = True,
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
      mu_dtype: dtype of :math:`m` (``None``: the parameter's; float32 for half).
      bias_correction_mu: divide :math:`m` by :math:`c_1` (False: :math:`c_1 = 1`).
      bias_correction_nu: divide :math:`\nu` by :math:`c_2` (False: :math:`c_2 = 1`).
      max_before_correction: take the maximum over the raw :math:`\nu` and correct the maximum
        with the current :math:`c_2`, as ``torch.optim.Adam(amsgrad=True)`` and Keras do.
        optax (the default, False) maximises the corrected :math:`\nu_s / c_2(s)`. The two
        differ in the first steps, where :math:`c_2` changes fastest.
      promote_half: keep the moments of float16/bfloat16 leaves in float32 (default).

    Same numbers as ``optax.scale_by_amsgrad`` with the default ``max_before_correction``;
    like the other rmsjax transformations, a zero divisor gives 0 instead of NaN and ``nu`` of
    complex leaves is stored real.
    """
    _check_decay("b1", b1)
    _check_decay("b2", b2)
    _check_nonneg("eps", eps)
    _check_nonneg("eps_root", eps_root)

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
        ScaleByAmsgradState,
        _amsgrad_rule,
        step_args,
        track_max=True,
        mu_dtype=mu_dtype,
        promote_half=promote_half,
    )


def scale_by_adam_exact_bias(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    amsgrad: bool = False,
    promote_half: bool = True,
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

    Versus :func:`rmsjax.scale_by_adam` (optax's numbers): identical in float64; in float32,
    optax's ``1 - b2**t`` is off by up to 1.3e-5 relative in the first steps, which moves a
    float32 trajectory by ~1e-5 of the parameter scale away from torch's.
    """
    _check_decay("b1", b1)
    _check_decay("b2", b2)
    _check_nonneg("eps", eps)

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
        ScaleByAdamExactBiasState,
        _amsgrad_rule,
        step_args,
        track_max=amsgrad,
        mu_dtype=None,
        promote_half=promote_half,
    )


def scale_by_adam_eps_hat(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-7,
    *,
    amsgrad: bool = False,
    promote_half: bool = True,
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

    optax has no counterpart. A zero divisor gives 0.
    """
    _check_decay("b1", b1)
    _check_decay("b2", b2)
    _check_nonneg("eps", eps)

    def step_args(count: jax.Array) -> dict[str, Any]:
        alpha = jnp.sqrt(debias(b2, count)) / debias(b1, count)
        return dict(b1=b1, b2=b2, eps=eps, alpha=alpha)

    return _adam_with_max(
        ScaleByAdamEpsHatState,
        _adam_eps_hat_rule,
        step_args,
        track_max=amsgrad,
        mu_dtype=None,
        promote_half=promote_half,
    )


# --------------------------------------------------------------------------------------------
# decoupled_weight_decay (learning-rate-scaled, after the step)
# --------------------------------------------------------------------------------------------


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: update count (int32) for schedules."""

    count: jax.Array


def _decoupled_decay_rule(g: jax.Array, p: jax.Array, factor: ArrayLike) -> tuple[jax.Array]:
    return (g - factor * p,)


def decoupled_weight_decay(
    weight_decay: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    r"""Subtract :math:`\eta_t \lambda_t \theta` from the (final) update.

    .. math::  u_t = g_t - \eta_t\,\lambda_t\,\theta_{t-1}

    Placed LAST in a chain (after the learning rate and any momentum buffer), it gives the
    decoupled weight decay of ``torch.optim.AdamW`` (:math:`\theta \leftarrow
    \theta(1 - \eta\lambda)` before the step) and of every Keras optimizer's ``weight_decay``
    (:math:`\theta \leftarrow \theta - \theta\lambda\eta`): the decay never enters a moment or
    momentum buffer, and it follows a learning-rate schedule.

    Args:
      weight_decay: :math:`\lambda`, a float >= 0 or a schedule ``count -> lambda``.
      learning_rate: :math:`\eta`, a float >= 0 or a schedule ``count -> eta`` (pass the same
        one as to the optimizer); counts are 0, 1, 2, ...
      mask: which leaves are decayed (a boolean tree or a callable returning one), as in
        :func:`rmsjax.add_decayed_weights`.

    Equivalent to ``chain(add_decayed_weights(wd), scale_by_learning_rate(lr))`` applied to the
    parameters alone; optax has no single transformation for it. Raises ``ValueError`` when
    ``params`` is not given to ``update``.
    """
    if not callable(weight_decay):
        _check_nonneg("weight_decay", weight_decay)
    if not callable(learning_rate):
        _check_learning_rate("learning_rate", learning_rate)

    def coefficient(count: jax.Array) -> Any:
        wd = weight_decay(count) if callable(weight_decay) else weight_decay
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        return lr * wd

    return _params_rule_transform(
        _decoupled_decay_rule,
        coefficient,
        DecoupledWeightDecayState,
        "decoupled_weight_decay",
        mask,
    )
