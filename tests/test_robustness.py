"""Where optax is fragile, rmsjax is not: centered variance, half precision, zero divisors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax


def _run(tx, grads: jax.Array) -> jax.Array:
    """All updates of ``tx`` fed the rows of ``grads`` (one jitted scan)."""

    @jax.jit
    def run(gs):
        def body(s, g):
            u, s = tx.update(g, s, g)  # the gradient doubles as params (weight decay)
            return s, u

        return jax.lax.scan(body, tx.init(gs[0]), gs)[1]

    return run(grads)


def test_centered_rms_stays_finite_where_optax_returns_nan() -> None:
    rng = np.random.default_rng(0)
    # Nearly constant gradients: nu - mu^2 is a difference of two almost equal numbers.
    grads = jnp.asarray(1.0 + 1e-7 * rng.standard_normal((300, 1000)), jnp.float32)
    ours = _run(rmsjax.scale_by_centered_rms(decay=0.9), grads)
    theirs = _run(optax.scale_by_stddev(decay=0.9), grads)
    assert not bool(jnp.all(jnp.isfinite(theirs))), "optax no longer NaNs here: update the docs"
    assert bool(jnp.all(jnp.isfinite(ours)))
    # Where optax is still finite, the two agree; ours is bounded by g / sqrt(eps).
    ok = jnp.isfinite(theirs)
    np.testing.assert_allclose(ours[ok], theirs[ok], rtol=1e-5)
    assert float(jnp.max(jnp.abs(ours))) <= float(jnp.max(jnp.abs(grads))) / np.sqrt(1e-8) * 1.001


def test_centered_rmsprop_optimizer_never_nan_with_momentum() -> None:
    grads = jnp.full((400, 8), 0.5, jnp.float32)
    for eps in (1e-8, 0.0):
        updates = _run(rmsjax.rmsprop(1e-3, centered=True, momentum=0.9, eps=eps), grads)
        assert bool(jnp.all(jnp.isfinite(updates))), eps


def _float32_reference(g: float) -> jax.Array:
    """The same update computed by optax entirely in float32 (independent reference)."""
    tx = optax.rmsprop(1e-2)
    grads = jnp.full((3, 4), g, jnp.float32)
    return _run(tx, grads)


@pytest.mark.parametrize("g", [300.0, 1e-4, 1e-6, 2.5])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_updates_are_finite_and_accurate(g: float, dtype) -> None:
    grads = jnp.full((3, 4), g, dtype)
    ours = _run(rmsjax.rmsprop(1e-2), grads)
    assert ours.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(ours)))
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(_float32_reference(g)), rtol=0.02
    )


@pytest.mark.parametrize(
    ("g", "symptom"), [(300.0, "zero"), (1e-4, "nonfinite"), (1e-6, "nonfinite")]
)
def test_optax_float16_failures_are_real(g: float, symptom: str) -> None:
    """The failures the README lists for optax, checked live (so the claim stays true)."""
    updates = np.asarray(_run(optax.rmsprop(1e-2), jnp.full((3, 4), g, jnp.float16)), np.float32)
    if symptom == "zero":
        assert np.any(updates == 0)
    else:
        assert not np.all(np.isfinite(updates))


def test_half_precision_state_is_float32_unless_asked() -> None:
    params = {"w": jnp.ones(3, jnp.float16), "b": jnp.ones(2, jnp.bfloat16)}
    state = rmsjax.scale_by_centered_rms().init(params)
    assert {leaf.dtype for leaf in jax.tree.leaves((state.mu, state.nu))} == {
        jnp.dtype(jnp.float32)
    }
    state = rmsjax.scale_by_centered_rms(promote_half=False).init(params)
    assert state.nu["w"].dtype == jnp.float16 and state.nu["b"].dtype == jnp.bfloat16
    opt_state = rmsjax.adamw(1e-3).init(params)
    assert opt_state[0].mu["w"].dtype == jnp.float32
    assert rmsjax.adamw(1e-3, mu_dtype=jnp.bfloat16).init(params)[0].mu["w"].dtype == jnp.bfloat16


def test_update_dtype_is_gradient_dtype() -> None:
    params = {"w": jnp.ones(3, jnp.float16)}
    grads = {"w": jnp.full(3, 0.5, jnp.float16)}
    for opt in (
        rmsjax.rmsprop(0.1, momentum=0.9, centered=True),
        rmsjax.adamw(0.1),
        rmsjax.trace(0.9, accumulator_dtype=jnp.float32),
    ):
        updates, _ = opt.update(grads, opt.init(params), params)
        assert updates["w"].dtype == jnp.float16


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_zero_gradient_with_zero_eps_is_zero_not_nan(eps_in_sqrt: bool) -> None:
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.zeros(4)}
    for opt in (
        rmsjax.rmsprop(0.1, eps=0.0, eps_in_sqrt=eps_in_sqrt),
        rmsjax.rmsprop(0.1, eps=0.0, eps_in_sqrt=eps_in_sqrt, centered=True),
        rmsjax.adamw(0.1, eps=0.0),
    ):
        updates, _ = opt.update(grads, opt.init(params), params)
        np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
    # optax divides 0 by 0 here.
    updates, _ = optax.rmsprop(0.1, eps=0.0).update(grads, optax.rmsprop(0.1).init(params))
    assert np.all(np.isnan(np.asarray(updates["w"])))


def test_complex_parameters_match_optax() -> None:
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.normal(size=(20, 5)) + 1j * rng.normal(size=(20, 5)), jnp.complex64)
    for make in (
        lambda lib: lib.rmsprop(0.1, centered=True, momentum=0.5),
        lambda lib: lib.adamw(0.1),
    ):
        ours, theirs = _run(make(rmsjax), z), _run(make(optax), z)
        assert ours.dtype == jnp.complex64
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-7)
    # Second moments of complex leaves are real.
    assert rmsjax.scale_by_rms().init(z[0]).nu.dtype == jnp.float32
