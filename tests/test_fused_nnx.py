"""rmsjax.fused.nnx.Optimizer: Flax NNX training through the fused step; and stored moments
(quantized, stochastically rounded) under flax's own nnx.Optimizer.

Reference: ``flax.nnx.Optimizer`` over the protocol optimizer of the same name and arguments
(``update`` + ``apply_updates``, checked against optax elsewhere), run from the same weights on
the same batches. The parameters and optimizer state must agree to float32 rounding.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax import native

nnx = pytest.importorskip("flax.nnx")

CASES = {
    "centered_momentum": (
        lambda: rmsjax.rmsprop(1e-2, centered=True, momentum=0.9),
        lambda: rmsjax.fused.rmsprop(1e-2, centered=True, momentum=0.9),
    ),
    "adamw": (
        lambda: rmsjax.adamw(1e-2, weight_decay=1e-2),
        lambda: rmsjax.fused.adamw(1e-2, weight_decay=1e-2),
    ),
    "sgd_nesterov": (
        lambda: rmsjax.sgd(0.05, momentum=0.9, nesterov=True),
        lambda: rmsjax.fused.sgd(0.05, momentum=0.9, nesterov=True),
    ),
}


class MLP(nnx.Module):
    """200 -> 100 -> 3: the first kernel (20000 elements) takes the native kernel by default,
    the others the compiled pure-JAX rule (fewer than rmsjax.fused.MIN_NATIVE_SIZE elements)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(200, 100, rngs=rngs)
        self.out = nnx.Linear(100, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def batches(steps: int) -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(0)
    return [
        (jnp.asarray(rng.normal(size=(16, 200)), jnp.float32), jnp.asarray(rng.integers(0, 3, 16)))
        for _ in range(steps)
    ]


def train(optimizer_cls, tx, steps: int = 5, donate: bool = False):
    model = MLP(nnx.Rngs(0))
    optimizer = optimizer_cls(model, tx, wrt=nnx.Param)

    def train_step(model, optimizer, x, y):
        grads = nnx.grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)

    step = nnx.jit(train_step, donate_argnums=(0, 1) if donate else ())
    for x, y in batches(steps):
        step(model, optimizer, x, y)
    return model, optimizer


def assert_close(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("name", list(CASES))
def test_same_parameters_as_the_unfused_nnx_optimizer(name):
    protocol, fused_factory = CASES[name]
    ref_model, ref_opt = train(nnx.Optimizer, protocol())
    model, opt = train(rmsjax.fused.nnx.Optimizer, fused_factory(), donate=True)
    assert_close(nnx.state(model), nnx.state(ref_model))
    # the same optimizer state, by structure (checkpoints move between the two) and value
    assert_close(nnx.state(opt), nnx.state(ref_opt))
    assert int(opt.step.get_value()) == 5


def test_update_runs_the_kernel():
    model = MLP(nnx.Rngs(0))
    optimizer = rmsjax.fused.nnx.Optimizer(model, rmsjax.fused.adamw(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    x, y = batches(1)[0]

    def step(state):
        model, optimizer = nnx.merge(graphdef, state)
        optimizer.update(model, nnx.grad(loss_fn)(model, x, y))
        return nnx.state((model, optimizer))

    assert ("ffi_call" in str(jax.make_jaxpr(step)(state))) == native.available()


def test_rejects_a_protocol_optimizer_and_extra_arguments():
    model = MLP(nnx.Rngs(0))
    with pytest.raises(TypeError, match="needs a fused optimizer"):
        rmsjax.fused.nnx.Optimizer(model, rmsjax.rmsprop(1e-3), wrt=nnx.Param)
    optimizer = rmsjax.fused.nnx.Optimizer(model, rmsjax.fused.rmsprop(1e-3), wrt=nnx.Param)
    grads = nnx.grad(loss_fn)(model, *batches(1)[0])
    with pytest.raises(TypeError, match="no extra arguments"):
        optimizer.update(model, grads, value=1.0)


def test_rmsjax_imports_without_flax():
    code = (
        "import sys\n"
        "sys.modules['flax'] = None  # any import of flax now fails\n"
        "import rmsjax, rmsjax.fused\n"
        "assert rmsjax.fused.rmsprop(1e-3) is not None\n"
        "try:\n"
        "    rmsjax.fused.nnx\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# Stored moments (codes and scales, or a value and its random key) are small trees of their
# own; nnx.Optimizer wraps every state array in a variable and writes the new state back with
# nnx.update, which must keep them. Reference: the functional loop on plain arrays.
STORED = {
    "adamw_8bit": lambda: rmsjax.adamw(
        1e-2, mu_dtype=rmsjax.quantized(bits=8), nu_dtype=rmsjax.quantized(bits=8)
    ),
    "centered_4bit": lambda: rmsjax.rmsprop(
        1e-2,
        centered=True,
        momentum=0.9,
        nu_dtype=rmsjax.quantized(bits=4),
        mu_dtype=rmsjax.quantized(bits=4),
        momentum_dtype=rmsjax.quantized(bits=4),
    ),
    "adamw_bf16_stochastic": lambda: rmsjax.adamw(
        1e-2, nu_dtype=rmsjax.stochastic_rounding(jnp.bfloat16, seed=3)
    ),
    "adamw_4bit_factored": lambda: rmsjax.adamw(
        1e-2, mu_dtype=rmsjax.quantized(bits=4), nu_dtype=rmsjax.factored(min_size=64)
    ),
    "adamw_fp8": lambda: rmsjax.adamw(
        1e-2, mu_dtype=rmsjax.float8(min_size=64), nu_dtype=rmsjax.float8(min_size=64)
    ),
}


def functional(tx, steps: int = 5, *, pure: bool = True):
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)))
    if pure:  # plain arrays; else nnx.Param variables (the gradients then are variables too)
        params = nnx.as_pure(params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), x, y))(params)
        updates, state = tx.update(grads, state, params)
        return rmsjax.apply_updates(params, updates), state

    for x, y in batches(steps):
        params, state = step(params, state, x, y)
    return params, state


def assert_same_leaves(actual, expected):
    a, e = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(a) == len(e)
    for x, y in zip(a, e, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", list(STORED))
def test_nnx_optimizer_keeps_stored_moments(name):
    params, state = functional(STORED[name]())
    model, optimizer = train(nnx.Optimizer, STORED[name](), donate=True)
    is_stored = lambda x: isinstance(x, rmsjax.StoredArray)
    stored = [x for x in jax.tree.leaves(optimizer.opt_state, is_leaf=is_stored) if is_stored(x)]
    assert stored, "the hidden kernel's moments should be stored"
    assert_same_leaves(nnx.as_pure(nnx.state(model)), params)
    assert_same_leaves(nnx.as_pure(optimizer.opt_state), state)


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_nnx_optimizer_with_quantized_state(bits):
    # 8 bits: the kernel updates the codes; 4 bits (stochastic codes): the pure-JAX fallback
    q = dict(mu_dtype=rmsjax.quantized(bits=bits), nu_dtype=rmsjax.quantized(bits=bits))
    ref_model, ref_opt = train(nnx.Optimizer, rmsjax.adamw(1e-2, **q))
    model, opt = train(rmsjax.fused.nnx.Optimizer, rmsjax.fused.adamw(1e-2, **q), donate=True)
    assert_close(nnx.state(model), nnx.state(ref_model))
    assert_close(nnx.state(opt), nnx.state(ref_opt))


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_bf16_stochastic"])
def test_functional_loop_over_nnx_variables(name):
    # the state of a stored moment holds no variable; gradients and parameters that are
    # nnx.Param variables must meet it all the same, and come back as variables
    params, state = functional(STORED[name](), pure=False)
    assert all(
        isinstance(x, nnx.Param)
        for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    ref_params, ref_state = functional(STORED[name]())
    assert_same_leaves(nnx.as_pure(params), ref_params)
    assert_same_leaves(state, ref_state)
