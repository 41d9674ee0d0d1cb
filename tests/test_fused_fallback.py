"""The fused step falls back to the pure-JAX chain for the reasons it names, and only for them.

Each reason of ``rmsjax.fused.step.route`` is provoked the way a user would meet it and must be
the one logged (``rmsjax.fused`` logger, DEBUG); the step then equals ``update`` +
``apply_updates``, or, where the inputs are wrong, raises the pure chain's own error. A bug
inside the engine (a helper raising what the old catch-all ``except`` swallowed) must raise,
not turn into a silent pure-JAX step.
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax import fused, native
from rmsjax.fused import selection
from rmsjax.fused import step as engine

N = 64  # elements of the leaf the kernel takes (with min_native_size=0)
PARAMS = {"w": jnp.linspace(-1.0, 1.0, N, dtype=jnp.float32), "b": jnp.ones(3, jnp.float32)}
GRADS = jax.tree.map(lambda x: 0.1 * x + 0.01, PARAMS)


def traced(opt, params, grads, state, caplog) -> tuple[list[str], str]:
    """The fallback reasons logged while tracing one step, and the step's jaxpr."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="rmsjax.fused"):
        jaxpr = str(jax.make_jaxpr(opt.step)(params, grads, state))
    reasons = [str(r.args[0]) for r in caplog.records if r.name == "rmsjax.fused"]
    return reasons, jaxpr


def assert_pure(opt, params, grads, state):
    """The step equals update + apply_updates (the protocol's own step), both compiled."""

    def protocol(params, grads, state):
        updates, new_state = opt.update(grads, state, params)
        return rmsjax.apply_updates(params, updates), new_state

    got = jax.jit(opt.step)(params, grads, state)
    want = jax.jit(protocol)(params, grads, state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernel off: {native.status()}"
)


@needs_native
def test_a_step_the_kernel_can_take_does_not_fall_back(caplog):
    # the control for every test below: the same inputs, nothing changed, use the kernel
    opt = fused.rmsprop(0.1, momentum=0.9, min_native_size=0)
    reasons, jaxpr = traced(opt, PARAMS, GRADS, opt.init(PARAMS), caplog)
    assert reasons == [] and "ffi_call" in jaxpr


@pytest.mark.parametrize(
    "reason, make, params",
    [
        (engine.JAX_BACKEND, lambda: fused.rmsprop(0.1, backend="jax", min_native_size=0), PARAMS),
        # a weight-decay mask: optax.masked hands the decay a tree of its own
        (
            engine.NOT_STRAIGHT,
            lambda: fused.adamw(0.1, mask={"w": True, "b": False}, min_native_size=0),
            PARAMS,
        ),
        # a rule the kernel does not have
        (
            f"{engine.NO_PLAN}: the chain applies the rules ['rms', 'scale', 'trace', "
            "'add_decayed_weights']",
            lambda: fused.fused(
                optax.chain(
                    rmsjax.scale_by_rms(),
                    rmsjax.scale(-0.1),
                    rmsjax.trace(0.9),
                    rmsjax.add_decayed_weights(0.1),
                ),
                min_native_size=0,
            ),
            PARAMS,
        ),
        # default min_native_size: every leaf is below it
        (engine.NO_LEAF, lambda: fused.rmsprop(0.1, momentum=0.9), PARAMS),
        # float16 parameters: not a dtype the kernel takes
        (
            engine.NO_LEAF,
            lambda: fused.sgd(0.1, momentum=0.9, min_native_size=0),
            jax.tree.map(lambda x: x.astype(jnp.float16), PARAMS),
        ),
    ],
    ids=["backend_jax", "mask", "no_plan", "small_leaves", "float16"],
)
def test_named_fallbacks_run_the_pure_chain_and_say_why(reason, make, params, caplog):
    opt = make()
    grads = jax.tree.map(lambda x: 0.1 * x, params)
    state = opt.init(params)
    reasons, jaxpr = traced(opt, params, grads, state, caplog)
    assert len(reasons) == 1 and reasons[0].startswith(reason)
    assert "ffi_call" not in jaxpr
    assert_pure(opt, params, grads, state)


@needs_native
def test_several_devices_fall_back(monkeypatch, caplog):
    # (a real two-device process: test_native.py::test_several_devices_fall_back_to_pure_jax)
    monkeypatch.setattr(selection, "single_device", lambda trees: False)
    opt = fused.rmsprop(0.1, momentum=0.9, min_native_size=0)
    reasons, jaxpr = traced(opt, PARAMS, GRADS, opt.init(PARAMS), caplog)
    assert reasons == [engine.SEVERAL_DEVICES] and "ffi_call" not in jaxpr


@pytest.mark.filterwarnings("ignore::rmsjax.fused.NativeFallbackWarning")
def test_unavailable_kernel_falls_back_and_names_the_status(monkeypatch, caplog):
    monkeypatch.setattr(native, "available", lambda: False)
    opt = fused.rmsprop(0.1, momentum=0.9, min_native_size=0)
    state = opt.init(PARAMS)
    reasons, jaxpr = traced(opt, PARAMS, GRADS, state, caplog)
    assert reasons == [f"{engine.UNAVAILABLE}: {native.status()}"]
    assert "ffi_call" not in jaxpr
    assert_pure(opt, PARAMS, GRADS, state)


def test_gradients_of_another_tree_get_the_pure_chains_error(caplog):
    opt = fused.rmsprop(0.1, momentum=0.9, min_native_size=0)
    state = opt.init(PARAMS)
    with caplog.at_level(logging.DEBUG, logger="rmsjax.fused"):
        with pytest.raises(ValueError, match="tree of gradients does not have the structure"):
            opt.step(PARAMS, {"w": GRADS["w"]}, state)
    assert [str(r.args[0]) for r in caplog.records] == [engine.GRADIENT_TREE]


def test_the_state_of_another_optimizer_gets_the_pure_chains_error():
    opt = fused.rmsprop(0.1, momentum=0.9, min_native_size=0)
    other = rmsjax.adam(0.1).init(PARAMS)  # holds no rms state with a field 'nu'
    with pytest.raises(Exception) as protocol:  # what update + apply_updates says
        opt.update(GRADS, other, PARAMS)
    # recording the chain's rules runs each transformation's own state check
    with pytest.raises(protocol.type, match=re.escape(str(protocol.value))):
        opt.step(PARAMS, GRADS, other)


@needs_native
def test_stored_moments_of_nnx_variables_fall_back(caplog):
    # nnx.Param parameters with 8-bit moments: a stored moment holds no variable, so the state's
    # tree is not the parameters'; the pure chain handles them (tests/test_fused_nnx.py).
    nnx = pytest.importorskip("flax.nnx")
    w = jnp.linspace(-1.0, 1.0, 8192, dtype=jnp.float32)  # above quantized()'s min_size
    params, grads = {"w": nnx.Param(w)}, {"w": nnx.Param(0.1 * w)}
    q8 = rmsjax.quantized(bits=8)
    opt = fused.adamw(1e-2, mu_dtype=q8, nu_dtype=q8, min_native_size=0)
    state = opt.init(params)
    reasons, jaxpr = traced(opt, params, grads, state, caplog)
    assert reasons == [engine.SLOT_TREE] and "ffi_call" not in jaxpr
    assert_pure(opt, params, grads, state)
    # the same moments for plain arrays use the kernel
    plain = nnx.as_pure((params, grads))
    reasons, jaxpr = traced(opt, *plain, opt.init(plain[0]), caplog)
    assert reasons == [] and "ffi_call" in jaxpr


class EngineBug(Exception):
    """What a bug in a helper of the engine raises (any type but the named reasons')."""


@pytest.mark.parametrize("error", [TypeError, AttributeError, IndexError, ValueError, EngineBug])
@pytest.mark.parametrize("where", ["leaves_like", "find_state", "leaf_key", "single_device"])
def test_a_bug_in_the_engine_is_not_swallowed(where, error, monkeypatch):
    # The errors the old catch-all turned into a silent pure-JAX step, from each helper the
    # routing calls: they must reach the caller.
    def broken(*args, **kwargs):
        raise error("a bug in the engine")

    owner = engine if where == "find_state" else selection
    monkeypatch.setattr(owner, where, broken)
    opt = fused.rmsprop(0.1, momentum=0.9, min_native_size=0)
    with pytest.raises(error, match="a bug in the engine"):
        jax.make_jaxpr(opt.step)(PARAMS, GRADS, opt.init(PARAMS))


def test_a_state_holding_a_stage_state_type_twice_falls_back(caplog):
    # a pass-through transformation whose state is also a ScaleByRmsState: the step could not
    # tell which of the two to write the kernel's moments into
    bystander = optax.GradientTransformation(
        lambda params: optax.ScaleByRmsState(nu=jax.tree.map(jnp.zeros_like, params)),
        lambda updates, state, params=None: (updates, state),
    )
    opt = fused.fused(optax.chain(rmsjax.rmsprop(0.1), bystander), min_native_size=0)
    state = opt.init(PARAMS)
    reasons, jaxpr = traced(opt, PARAMS, GRADS, state, caplog)
    assert reasons == [engine.NOT_THIS_STATE] and "ffi_call" not in jaxpr
    assert_pure(opt, PARAMS, GRADS, state)
