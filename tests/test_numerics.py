"""Every rule over the whole float32 range: never NaN, and float64-exact where it can be.

For each optimizer (through its public factory, so ``map_rule`` and the chains are exercised
too), hypothesis draws three steps of float32 gradients from the full finite range: zeros of
both signs, denormals, ``+-3.4e38`` and everything between. Two properties:

* no update is NaN or infinite, and no state leaf is NaN; a second-moment leaf (``nu``,
  ``nu_max``, ``e_g``, ``sum_of_squares``) may be ``+inf``, the documented zero step for
  :math:`|g| \\ge 2^{64}` whose square overflows, and no other leaf may;
* wherever every gradient of an element has :math:`|g| < 1.8 \\cdot 10^{19}` (below the
  overflow threshold :math:`2^{64} \\approx 1.8447 \\cdot 10^{19}`), the update equals a NumPy
  float64 statement of the published rule, written out below independently of rmsjax, to
  float32 tolerance: 2e-5 of the step's scale (the learning rate for the normalised rules,
  whose steps are lr * O(1); lr * sum |g| for SGD), plus a few smallest normal floats, since XLA
  on CPU flushes float32 denormals to zero (a denormal gradient counts as 0).

Each rule is one jitted function of the gradients, so every example reuses one compilation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import rmsjax

STEPS, SIZE = 3, 24
F32_MAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32, 1.18e-38
BELOW_OVERFLOW = 1.8e19  # |g| < 2**64: g * g is finite in float32
SECOND_MOMENTS = ("nu", "nu_max", "e_g", "sum_of_squares", "var")
LR = 0.1
Q4 = rmsjax.quantized(4, min_size=0)  # (the 4-bit variance form, on arrays of any size)

full_range = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
gradient_runs = hnp.arrays(np.float32, (STEPS, SIZE), elements=full_range)
PARAMS = np.linspace(-2.0, 2.0, SIZE).astype(np.float32)

# --------------------------------------------------------------------------------------------
# NumPy float64 statements of the rules (the papers' equations; constants as documented)
# --------------------------------------------------------------------------------------------


def np_rmsprop(gs, *, rho=0.9, eps=1e-8, centered=False, eps_in_sqrt=True, bc=False, beta=None):
    nu, mu, m, out = 0.0, 0.0, 0.0, []
    for t, g in enumerate(gs, 1):
        nu = rho * nu + (1 - rho) * g * g
        mu = rho * mu + (1 - rho) * g
        c = 1 - rho**t if bc else 1.0
        v = np.maximum(nu / c - (mu / c) ** 2, 0) if centered else nu / c
        s = g / np.sqrt(v + eps) if eps_in_sqrt else g / (np.sqrt(v) + eps)
        u = -LR * s
        if beta is not None:
            m = u + beta * m
            u = m
        out.append(u)
    return out


def np_adam(gs, *, b1=0.9, b2=0.999, eps=1e-8, wd=None, amsgrad=False):
    m, v, vmax, out = 0.0, 0.0, 0.0, []
    for t, g in enumerate(gs, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vhat = v / (1 - b2**t)
        vmax = np.maximum(vmax, vhat)
        step = (m / (1 - b1**t)) / (np.sqrt(vmax if amsgrad else vhat) + eps)
        out.append(-LR * (step + (0 if wd is None else wd * PARAMS)))
    return out


def np_sgd(gs, *, beta=None):
    m, out = 0.0, []
    for g in gs:
        m = g if beta is None else g + beta * m
        out.append(-LR * m)
    return out


def np_adagrad(gs, *, s0=0.1, eps=1e-7):
    s, out = s0, []
    for g in gs:
        s = s + g * g
        out.append(-LR * g / np.sqrt(s + eps))
    return out


def np_adadelta(gs, *, rho=0.9, eps=1e-6):
    eg, ex, out = 0.0, 0.0, []
    for g in gs:
        eg = rho * eg + (1 - rho) * g * g
        u = np.sqrt(ex + eps) / np.sqrt(eg + eps) * g
        ex = rho * ex + (1 - rho) * u * u
        out.append(-u)  # learning_rate None: rate 1, descending
    return out


def np_rprop(gs, *, eta_minus=0.5, eta_plus=1.2, lo=1e-6, hi=50.0):
    step, prev, out = np.full_like(gs[0], LR), np.zeros_like(gs[0]), []
    for g in gs:
        s = np.sign(g) * np.sign(prev)
        step = np.clip(step * np.where(s > 0, eta_plus, np.where(s < 0, eta_minus, 1.0)), lo, hi)
        g = np.where(s < 0, 0.0, g)
        out.append(-np.sign(g) * step)
        prev = g
    return out


# (optimizer, float64 reference or None, largest |g| drawn)
RULES: dict[str, tuple[Any, Callable[..., Any] | None, float]] = {
    "rms": (rmsjax.rmsprop(LR), np_rmsprop, F32_MAX),
    "rms_eps_outside_bias": (
        rmsjax.rmsprop(LR, eps_in_sqrt=False, bias_correction=True),
        lambda gs: np_rmsprop(gs, eps_in_sqrt=False, bc=True),
        F32_MAX,
    ),
    "centered": (
        rmsjax.rmsprop(LR, centered=True),
        lambda gs: np_rmsprop(gs, centered=True),
        F32_MAX,
    ),
    # Bias-corrected centered variance cancels to rounding noise for equal gradients (in
    # float32 and float64 alike), so only the finiteness property is stated for it.
    "centered_bias_momentum": (
        rmsjax.rmsprop(LR, centered=True, bias_correction=True, momentum=0.9),
        None,
        F32_MAX,
    ),
    # the variance form keeps s = nu - mu^2 itself: the same rule in exact arithmetic
    "centered_variance": (
        rmsjax.chain(rmsjax.scale_by_centered_rms(variance=True), rmsjax.scale(-LR)),
        lambda gs: np_rmsprop(gs, centered=True),
        F32_MAX,
    ),
    "centered_variance_bias_momentum": (
        rmsjax.rmsprop(LR, centered=True, bias_correction=True, momentum=0.9, nu_dtype=Q4),
        None,
        F32_MAX,
    ),
    "adam": (rmsjax.adam(LR), np_adam, F32_MAX),
    "adamw": (rmsjax.adamw(LR, weight_decay=0.1), lambda gs: np_adam(gs, wd=0.1), F32_MAX),
    "amsgrad": (
        rmsjax.chain(rmsjax.scale_by_amsgrad(), rmsjax.scale_by_learning_rate(LR)),
        lambda gs: np_adam(gs, amsgrad=True),
        F32_MAX,
    ),
    "adam_exact_bias_amsgrad": (
        rmsjax.chain(
            rmsjax.scale_by_adam_exact_bias(amsgrad=True), rmsjax.scale_by_learning_rate(LR)
        ),
        None,
        F32_MAX,
    ),
    "adam_eps_hat": (
        rmsjax.chain(rmsjax.scale_by_adam_eps_hat(), rmsjax.scale_by_learning_rate(LR)),
        None,
        F32_MAX,
    ),
    "sgd": (rmsjax.sgd(LR), np_sgd, F32_MAX),
    # A momentum buffer sums up to 1 + beta + beta^2 gradients: bounded so the sum fits.
    "sgd_momentum": (rmsjax.sgd(LR, momentum=0.9), lambda gs: np_sgd(gs, beta=0.9), 1e38),
    "adagrad": (rmsjax.adagrad(LR), np_adagrad, F32_MAX),
    "adagrad_torch": (
        rmsjax.chain(rmsjax.scale_by_rss(0.0, 1e-10, eps_in_sqrt=False), rmsjax.scale(-LR)),
        None,
        F32_MAX,
    ),
    "adadelta": (rmsjax.adadelta(), np_adadelta, F32_MAX),
    "rprop": (rmsjax.rprop(LR), np_rprop, F32_MAX),
}


def _runner(opt: Any) -> Callable[[np.ndarray], tuple[Any, Any]]:
    @jax.jit
    def run(gs: jax.Array) -> tuple[Any, Any]:
        params = jnp.asarray(PARAMS)

        def body(state: Any, g: jax.Array) -> tuple[Any, Any]:
            u, state = opt.update(g, state, params)
            return state, u

        state, updates = jax.lax.scan(body, opt.init(params), gs)
        return updates, state

    return run


RUNNERS = {name: _runner(opt) for name, (opt, _, _) in RULES.items()}


def _check(name: str, gs: np.ndarray) -> None:
    _, reference, bound = RULES[name]
    gs = np.clip(gs, -bound, bound)
    updates, state = RUNNERS[name](gs)
    updates = np.asarray(updates)
    assert np.all(np.isfinite(updates)), (name, gs[~np.isfinite(updates)])
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        leaf = np.asarray(leaf)
        where = jax.tree_util.keystr(path)
        assert not np.any(np.isnan(leaf)), (name, where)
        if not any(f".{field}" in where for field in SECOND_MOMENTS):
            assert np.all(np.isfinite(leaf)), (name, where)
        assert not np.any(leaf == -np.inf), (name, where)
    if reference is None:
        return
    # XLA on CPU flushes float32 denormals to zero (inputs and results): a denormal gradient
    # is a zero gradient, and a result below TINY is 0 (the floor of the tolerance below; for
    # the normalised rules the difference is far below it on any backend).
    g64 = np.where(np.abs(gs) < TINY, 0.0, gs.astype(np.float64))
    expected = np.stack(reference(list(g64)))
    ok = np.all(np.abs(g64) < BELOW_OVERFLOW, axis=0)
    if name.startswith("adagrad"):  # the sum of squares overflows before any one square does
        ok &= 0.1 + np.sum(g64 * g64, axis=0) < F32_MAX
    if name == "rprop":  # like torch, rprop compares signs through the product g_t * g_{t-1},
        # which is flushed to 0 ("no comparison") below 1.18e-38 (documented there)
        product = np.abs(g64[1:] * g64[:-1])
        ok &= ~np.any((product < TINY) & (product > 0), axis=0)
        # and the sign of a denormal gradient depends on whether the backend flushes it
        ok &= ~np.any((gs != 0) & (np.abs(gs) < TINY), axis=0)
    if name.startswith("sgd"):  # u = lr * sum: a scale of its own
        scale = LR * np.sum(np.abs(g64), axis=0)
    elif name == "rprop":
        scale = np.full(SIZE, 1e-30)  # sign times a step size: no rounding but the step's
    else:  # normalised steps: |u| <= lr * O(1)
        scale = np.full(SIZE, LR)
    err = np.abs(updates[:, ok] - expected[:, ok])
    tol = 2e-5 * (np.abs(expected[:, ok]) + scale[ok]) + 4 * TINY
    assert np.all(err <= tol), (name, gs[:, ok][:, np.any(err > tol, axis=0)])


@pytest.mark.parametrize("name", list(RULES))
@settings(max_examples=60, deadline=None)
@given(gs=gradient_runs)
def test_full_float32_range_never_nan_and_float64_exact_below_overflow(name, gs) -> None:
    _check(name, gs)


@pytest.mark.parametrize("g", [1e38, -3.4e38, 2e20])
def test_centered_rms_gives_a_zero_step_where_optax_returns_nan(g: float) -> None:
    """optax's variance is inf - inf once |mu|^2 overflows too (|g| > ~1.8e20 on step one)."""
    grads = jnp.full((4,), g, jnp.float32)
    tx = rmsjax.rmsprop(0.1, centered=True)
    ours, _ = tx.update(grads, tx.init(grads))
    opt = optax.rmsprop(0.1, centered=True)
    theirs, _ = opt.update(grads, opt.init(grads))
    assert bool(jnp.all(jnp.isnan(theirs)))  # optax: inf - inf
    np.testing.assert_array_equal(np.asarray(ours), 0.0)


def test_overflow_threshold_is_two_to_the_64() -> None:
    """The documented threshold: the largest float32 below 2**64 still gives a finite square
    and a nonzero step; 2**64 gives the zero step."""
    below = np.nextafter(np.float32(2.0**64), np.float32(0))
    opt = rmsjax.scale_by_rms()
    for g, moves in ((below, True), (np.float32(2.0**64), False)):
        grads = jnp.full((2,), g, jnp.float32)
        u, state = opt.update(grads, opt.init(grads))
        assert bool(jnp.all(jnp.isfinite(state.nu))) is moves
        assert bool(jnp.all(u != 0)) is moves
