"""Properties of RMSProp that hold for every input (hypothesis).

Hyperparameters are passed into one jitted function as traced arguments, so every example
reuses the same compilation (and traced hyperparameters are exercised on the way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import rmsjax

STEPS, SIZE = 6, 5

magnitudes = st.one_of(
    st.just(0.0),
    st.floats(1e-3, 1e3).flatmap(lambda x: st.sampled_from([x, -x])),
)
gradient_runs = hnp.arrays(np.float32, (STEPS, SIZE), elements=magnitudes)
decays = st.floats(0.0, 0.999)
learning_rates = st.floats(1e-4, 1.0)
settings_ = settings(max_examples=60, deadline=None)


@jax.jit
def _rmsprop_updates(grads, lr, decay, centered_flag):
    """Updates of plain and centered RMSProp (eps = 0, no momentum) over the rows of grads."""

    def run(centered):
        opt = rmsjax.rmsprop(lr, decay=decay, eps=0.0, centered=centered)

        def body(state, g):
            u, state = opt.update(g, state)
            return state, u

        return jax.lax.scan(body, opt.init(grads[0]), grads)[1]

    return jnp.where(centered_flag, run(True), run(False))


@settings_
@given(grads=gradient_runs, lr=learning_rates, decay=decays)
def test_step_bounded_by_lr_over_sqrt_one_minus_decay(grads, lr, decay) -> None:
    updates = np.asarray(_rmsprop_updates(grads, lr, decay, False))
    bound = lr / np.sqrt(1.0 - decay)
    assert np.all(np.isfinite(updates))
    assert np.all(np.abs(updates) <= bound * (1 + 1e-5))


@settings_
@given(grads=gradient_runs, lr=learning_rates, decay=decays, factor=st.floats(1e-2, 1e2))
def test_invariant_to_positive_gradient_scale(grads, lr, decay, factor) -> None:
    # (Centered RMSProp is scale free too in exact arithmetic, but where the variance cancels
    # to ~0 its step is rounding noise, so the property is stated for plain RMSProp.)
    base = np.asarray(_rmsprop_updates(grads, lr, decay, False))
    scaled = np.asarray(_rmsprop_updates(grads * np.float32(factor), lr, decay, False))
    assert np.all(np.isfinite(base)) and np.all(np.isfinite(scaled))
    np.testing.assert_allclose(scaled, base, rtol=1e-5, atol=1e-7 * lr)


@settings_
@given(grads=gradient_runs, lr=learning_rates, decay=st.floats(0.5, 0.999))
def test_centered_steps_are_always_finite(grads, lr, decay) -> None:
    updates = np.asarray(_rmsprop_updates(grads, lr, decay, True))
    assert np.all(np.isfinite(updates))


@jax.jit
def _zero_gradient_updates(lr, decay, eps, momentum, b1, b2):
    params = {"w": jnp.linspace(-1.0, 1.0, SIZE), "s": jnp.float32(3.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    opts = [
        rmsjax.rmsprop(lr, decay=decay, eps=eps),
        rmsjax.rmsprop(lr, decay=decay, eps=eps, centered=True, momentum=momentum),
        rmsjax.rmsprop(lr, decay=decay, eps=eps, momentum=momentum, nesterov=True),
        rmsjax.rmsprop(lr, decay=decay, eps=eps, bias_correction=True, eps_in_sqrt=False),
        rmsjax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=0.0),
    ]
    out = []
    for opt in opts:
        state = opt.init(params)
        for _ in range(3):
            updates, state = opt.update(zeros, state, params)
            out.append(updates)
    return out


@settings_
@given(
    lr=learning_rates,
    decay=decays,
    eps=st.sampled_from([0.0, 1e-8, 1e-3]),
    momentum=st.floats(0.0, 1.0),
    b1=decays,
    b2=decays,
)
def test_zero_gradients_never_move_parameters(lr, decay, eps, momentum, b1, b2) -> None:
    for updates in _zero_gradient_updates(lr, decay, eps, momentum, b1, b2):
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)
