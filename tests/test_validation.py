"""Bad input: clear errors at construction for concrete values; traced values pass untouched."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import rmsjax

BAD = [
    # (factory, argument, value, range shown in the message)
    (lambda v: rmsjax.rmsprop(0.1, decay=v), "decay", 1.0, "[0, 1)"),
    (lambda v: rmsjax.rmsprop(0.1, decay=v), "decay", -0.1, "[0, 1)"),
    (lambda v: rmsjax.scale_by_rms(decay=v), "decay", 1.5, "[0, 1)"),
    (lambda v: rmsjax.scale_by_centered_rms(decay=v), "decay", 1.0, "[0, 1)"),
    (lambda v: rmsjax.rmsprop(0.1, eps=v), "eps", -1e-8, "[0, inf)"),
    (lambda v: rmsjax.rmsprop(0.1, initial_scale=v), "initial_scale", -1.0, "[0, inf)"),
    (lambda v: rmsjax.rmsprop(0.1, momentum=v), "momentum", 1.1, "[0, 1]"),
    (lambda v: rmsjax.rmsprop(0.1, momentum=v), "momentum", -0.5, "[0, 1]"),
    (lambda v: rmsjax.rmsprop(v), "learning_rate", -0.1, "[0, inf)"),
    (lambda v: rmsjax.rmsprop(v), "learning_rate", math.nan, "[0, inf)"),
    (lambda v: rmsjax.rmsprop(v), "learning_rate", math.inf, "[0, inf)"),
    (lambda v: rmsjax.adamw(v), "learning_rate", -1.0, "[0, inf)"),
    (lambda v: rmsjax.adamw(0.1, b1=v), "b1", 1.0, "[0, 1)"),
    (lambda v: rmsjax.adamw(0.1, b2=v), "b2", -0.1, "[0, 1)"),
    (lambda v: rmsjax.scale_by_adam(b2=v), "b2", 1.0, "[0, 1)"),
    (lambda v: rmsjax.adamw(0.1, eps=v), "eps", -1.0, "[0, inf)"),
    (lambda v: rmsjax.adamw(0.1, eps_root=v), "eps_root", -1.0, "[0, inf)"),
    (lambda v: rmsjax.adamw(0.1, weight_decay=v), "weight_decay", -1e-4, "[0, inf)"),
    (lambda v: rmsjax.add_decayed_weights(v), "weight_decay", -1.0, "[0, inf)"),
    (lambda v: rmsjax.trace(v), "decay", 2.0, "[0, 1]"),
    (lambda v: rmsjax.scale_by_learning_rate(v), "learning_rate", -0.1, "[0, inf)"),
    (lambda v: rmsjax.rmsprop(0.1, decay=v), "decay", jnp.array([0.5, 1.0]), "[0, 1)"),
]


@pytest.mark.parametrize(("factory", "name", "value", "interval"), BAD)
def test_out_of_range_raises_value_error_naming_argument(factory, name, value, interval):
    with pytest.raises(ValueError) as info:
        factory(value)
    message = str(info.value)
    assert f"`{name}`" in message
    assert interval in message
    if isinstance(value, float):
        assert repr(value) in message or str(value) in message


GOOD = [
    lambda: rmsjax.rmsprop(0.0, decay=0.0, eps=0.0, momentum=0.0),
    lambda: rmsjax.rmsprop(1.0, decay=0.999999, momentum=1.0),
    lambda: rmsjax.rmsprop(optax.constant_schedule(-1.0)),  # schedules are not evaluated
    lambda: rmsjax.adamw(1e-3, b1=0.0, b2=0.0, weight_decay=0.0),
    lambda: rmsjax.adamw(1e-3, weight_decay=lambda count: -1.0),
    lambda: rmsjax.scale(-3.0),
]


@pytest.mark.parametrize("factory", GOOD)
def test_edges_of_valid_ranges_are_accepted(factory) -> None:
    assert isinstance(factory(), optax.GradientTransformation)


def test_traced_hyperparameters_are_not_checked() -> None:
    """Inside jit a hyperparameter is a tracer: construction must neither check nor fail."""
    params = {"w": jnp.ones(3)}

    @jax.jit
    def step(lr, decay, momentum, b1):
        opt = rmsjax.chain(
            rmsjax.rmsprop(lr, decay=decay, momentum=momentum),
            rmsjax.adamw(lr, b1=b1),
        )
        updates, _ = opt.update(params, opt.init(params), params)
        return updates

    # Values that would be rejected if concrete still trace (the caller owns them here).
    out = step(jnp.float32(0.1), jnp.float32(0.9), jnp.float32(0.5), jnp.float32(0.9))
    assert out["w"].shape == (3,)
    step(jnp.float32(-0.1), jnp.float32(1.0), jnp.float32(2.0), jnp.float32(1.0))


def test_structure_mismatch_shows_both_structures() -> None:
    opt = rmsjax.rmsprop(0.1, momentum=0.9)
    state = opt.init({"w": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError) as info:
        opt.update({"w": jnp.ones(3), "c": jnp.ones(2)}, state)
    message = str(info.value)
    assert "does not have the structure" in message
    assert re.search(r"gradients: PyTreeDef\(\{'c'", message)
    assert re.search(r"optimizer state: PyTreeDef\(\{'b'", message)


def test_structure_mismatch_tuple_versus_list() -> None:
    opt = rmsjax.adamw(0.1)
    params = (jnp.ones(2), jnp.ones(2))
    state = opt.init(params)
    with pytest.raises(ValueError, match="does not have the structure"):
        opt.update([jnp.ones(2), jnp.ones(2)], state, params)


def test_apply_updates_structure_mismatch() -> None:
    with pytest.raises(ValueError, match="structure of the params"):
        rmsjax.apply_updates({"a": jnp.ones(2)}, {"b": jnp.ones(2)})


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_integer_and_boolean_gradients_raise_type_error(dtype) -> None:
    opt = rmsjax.rmsprop(0.1)
    params = {"w": jnp.ones(3), "steps": jnp.ones(3)}
    state = opt.init(params)
    grads = {"w": jnp.ones(3), "steps": jnp.ones(3, dtype)}
    with pytest.raises(TypeError, match=r"\['steps'\].*floating-point"):
        opt.update(grads, state)


def test_add_decayed_weights_needs_params() -> None:
    opt = rmsjax.adamw(0.1)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs the parameters"):
        opt.update(params, opt.init(params))
