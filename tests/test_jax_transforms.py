"""jit (no recompilation), vmap over a batch of parameter trees, donation, purity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from tests.common import assert_trees_close, loss, mixed_tree

OPTIMIZERS = {
    "rmsprop": lambda: rmsjax.rmsprop(0.05),
    "centered_momentum": lambda: rmsjax.rmsprop(0.05, centered=True, momentum=0.9),
    "adamw": lambda: rmsjax.adamw(0.05, weight_decay=optax.linear_schedule(0.1, 0.0, 5)),
}


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_jit_compiles_once(make) -> None:
    opt = make()
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)  # runs only while tracing
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return rmsjax.apply_updates(params, updates), state

    params = mixed_tree()
    state = opt.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_vmap_over_a_batch_of_parameter_trees(make) -> None:
    opt = make()
    batch = [mixed_tree(seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batch)

    def run(params):
        state = opt.init(params)
        for _ in range(4):
            updates, state = opt.update(jax.grad(loss)(params), state, params)
            params = rmsjax.apply_updates(params, updates)
        return params

    batched = jax.jit(jax.vmap(run))(stacked)
    for i, params in enumerate(batch):
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], batched), jax.jit(run)(params))


def test_donation_gives_same_result() -> None:
    opt = rmsjax.rmsprop(0.05, centered=True, momentum=0.9)

    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return rmsjax.apply_updates(params, updates), state

    params = mixed_tree()
    expected = jax.jit(step)(params, opt.init(params))
    donated = jax.jit(step, donate_argnums=(0, 1))
    fresh = mixed_tree()
    state = opt.init(fresh)
    result = donated(fresh, state)
    assert_trees_close(result, expected, rtol=0, atol=0)


def test_update_is_pure() -> None:
    opt = rmsjax.rmsprop(0.05, centered=True, momentum=0.9, bias_correction=True)
    params = mixed_tree()
    grads = jax.grad(loss)(params)
    state = opt.init(params)
    snapshot = jax.tree.map(np.array, (grads, state, params))
    first = opt.update(grads, state, params)
    second = opt.update(grads, state, params)
    assert_trees_close(first, second, rtol=0, atol=0)
    assert_trees_close((grads, state, params), snapshot, rtol=0, atol=0)


def test_none_leaves_pass_through() -> None:
    params = {"w": jnp.ones(3), "frozen": None, "pair": (None, jnp.ones(2))}
    for opt in (rmsjax.rmsprop(0.1, centered=True, momentum=0.9), rmsjax.adamw(0.1)):
        state = opt.init(params)
        grads = {"w": jnp.full(3, 0.5), "frozen": None, "pair": (None, jnp.full(2, 0.5))}
        updates, new_state = jax.jit(opt.update)(grads, state, params)
        assert updates["frozen"] is None and updates["pair"][0] is None
        new_params = rmsjax.apply_updates(params, updates)
        assert new_params["frozen"] is None
        assert float(new_params["w"][0]) < 1.0
    # A None gradient for a leaf that has state leaves that state untouched.
    opt = rmsjax.rmsprop(0.1, momentum=0.9)
    state = opt.init({"a": jnp.ones(2), "b": jnp.ones(2)})
    _, state = opt.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state)
    updates, new_state = opt.update({"a": None, "b": jnp.ones(2)}, state)
    assert updates["a"] is None
    np.testing.assert_array_equal(new_state[0].nu["a"], state[0].nu["a"])
    np.testing.assert_array_equal(new_state[2].trace["a"], state[2].trace["a"])
