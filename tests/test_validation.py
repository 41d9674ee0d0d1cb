"""Bad input: clear errors at construction for concrete values; traced values pass untouched."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
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
    (lambda v: rmsjax.rmsprop(v), "learning_rate", jnp.float32(-1.0), "[0, inf)"),
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


# --------------------------------------------------------------------------------------------
# Learning rates: None, and what inject_hyperparams hands over
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rmsprop", "adam", "adamw", "sgd", "adagrad", "rprop"])
def test_none_learning_rate_is_rejected_not_an_ascent(name: str) -> None:
    """optax.<name>(None) skips the scaling and steps UP the gradient; rmsjax refuses."""
    params = {"w": jnp.ones(2)}
    if name != "rprop":  # optax.rprop(None) fails in init
        opt = getattr(optax, name)(None)
        updates, _ = opt.update({"w": jnp.ones(2)}, opt.init(params), params)
        assert float(updates["w"][0]) > 0  # the optax behaviour this guards against
    with pytest.raises(ValueError, match=r"`learning_rate` is None; pass a learning rate"):
        getattr(rmsjax, name)(None)


def test_documented_none_learning_rates_are_kept() -> None:
    assert rmsjax.scale_by_learning_rate(None).update(jnp.ones(2), None)[0].tolist() == [1, 1]
    opt = rmsjax.adadelta(None)  # rate 1, descending (tested in test_family.py)
    assert isinstance(opt, optax.GradientTransformation)


def test_concrete_jax_and_numpy_scalars_are_checked() -> None:
    for bad in (jnp.float32(-0.1), np.float64(-0.1), jnp.asarray(-0.1), np.asarray(np.nan)):
        with pytest.raises(ValueError, match="`learning_rate`"):
            rmsjax.rmsprop(bad)
    rmsjax.rmsprop(jnp.float32(0.1), decay=np.float32(0.5), momentum=jnp.asarray(0.9))


def test_injected_hyperparameters_of_a_complex_model_are_accepted() -> None:
    """optax.inject_hyperparams casts the hyperparameters to the params' widest dtype:
    complex64 (with a zero imaginary part) for a complex model, checked as the real value."""
    params = {"z": jnp.asarray([1 + 1j, -2j], jnp.complex64), "r": jnp.asarray([0.5, -1.0])}
    for factory in (rmsjax.rmsprop, rmsjax.adamw):
        opt = optax.inject_hyperparams(factory)(learning_rate=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no complex value is cast into a real array
            state = opt.init(params)
            assert state.hyperparams["learning_rate"].dtype == jnp.complex64
            updates, _ = opt.update(params, state, params)
        direct = factory(0.1)
        expected, _ = direct.update(params, direct.init(params), params)
        for key in params:
            # array hyperparameters round like float32 (1 - b1), Python floats do not
            np.testing.assert_allclose(updates[key], expected[key], rtol=2e-5)
    with pytest.raises(TypeError, match="complex number is not real"):
        rmsjax.rmsprop(jnp.asarray(0.1 + 0.1j))


def test_callable_only_where_a_schedule_is_allowed() -> None:
    schedule = optax.constant_schedule(0.1)
    rmsjax.adamw(schedule, weight_decay=schedule)  # both take schedules
    with pytest.raises(TypeError, match=r"`decay`.*only learning rates and weight decays"):
        rmsjax.rmsprop(0.1, decay=schedule)
    with pytest.raises(TypeError, match="`min_step_size`"):
        rmsjax.rprop(0.1, min_step_size=None)  # would have turned the clipping off


# --------------------------------------------------------------------------------------------
# State dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_and_boolean_params_get_float_moments(dtype) -> None:
    params = {"i": jnp.ones(3, dtype)}
    g = {"i": jnp.asarray([1.0, -2.0, 0.5], jnp.float32)}
    for opt in (rmsjax.rmsprop(0.1, centered=True), rmsjax.adam(0.1), rmsjax.sgd(0.1, 0.9)):
        state = opt.init(params)
        moments = [x for x in jax.tree.leaves(state) if x.ndim == 1]
        assert moments and all(x.dtype == jnp.float32 for x in moments)
        _, state = opt.update(g, state, params)
    # optax's Adam keeps nu of an int32 parameter in int32 (README table): it never moves
    assert optax.adam(0.1).init(params)[0].nu["i"].dtype == jnp.int32 or dtype == jnp.bool_
    # the second moment moved: nu = (1 - 0.9) g^2 after one step (optax's float32 value too)
    opt = rmsjax.rmsprop(0.1)
    _, state = opt.update(g, opt.init(params), params)
    np.testing.assert_allclose(state[0].nu["i"], 0.1 * np.asarray(g["i"]) ** 2, rtol=1e-6)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda d: rmsjax.adam(0.1, mu_dtype=d), "mu_dtype"),
        (lambda d: rmsjax.adamw(0.1, mu_dtype=d), "mu_dtype"),
        (lambda d: rmsjax.scale_by_amsgrad(mu_dtype=d), "mu_dtype"),
        (lambda d: rmsjax.sgd(0.1, momentum=0.9, accumulator_dtype=d), "accumulator_dtype"),
        (lambda d: rmsjax.sgd(0.1, accumulator_dtype=d), "accumulator_dtype"),
        (lambda d: rmsjax.trace(0.9, accumulator_dtype=d), "accumulator_dtype"),
        (lambda d: rmsjax.dampened_trace(0.9, accumulator_dtype=d), "accumulator_dtype"),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, "uint8"])
def test_integer_state_dtypes_are_rejected(make, name: str, dtype) -> None:
    with pytest.raises(ValueError, match=f"`{name}` must be None or a floating dtype"):
        make(dtype)
    make(jnp.bfloat16)  # a float dtype is fine


# --------------------------------------------------------------------------------------------
# The state of another optimizer
# --------------------------------------------------------------------------------------------


def test_state_of_another_optimizer_is_a_type_error() -> None:
    params = {"w": jnp.ones(3)}
    sgd_state = rmsjax.sgd(0.1, momentum=0.9).init(params)
    with pytest.raises(TypeError) as info:
        rmsjax.adam(0.1).update(params, sgd_state, params)
    message = str(info.value)
    assert "ScaleByAdamState" in message and "TraceState" in message
    assert "Pass the state returned by this optimizer's `init`" in message
    adamw_state = rmsjax.adamw(0.1).init(params)
    with pytest.raises(TypeError, match="expected its state as ScaleByRStdDevState, got Scale"):
        rmsjax.rmsprop(0.1, centered=True).update(params, adamw_state, params)
    # another configuration of the same transformation does not fit either
    with pytest.raises(TypeError, match="ScaleByRmsWithCountState, got ScaleByRmsState"):
        rmsjax.scale_by_rms(bias_correction=True).update(params, rmsjax.scale_by_rms().init(params))


class _Foreign(NamedTuple):
    other: Any


# Every transformation with a state. The stateless ones (scale, scale_by_learning_rate and
# add_decayed_weights with a number: optax.EmptyState) accept any state, as optax's do
# (test_parity.py compares them with optax).
TRANSFORMS = [
    rmsjax.scale_by_schedule(optax.constant_schedule(0.1)),
    rmsjax.scale_by_learning_rate(optax.constant_schedule(0.1)),
    rmsjax.scale_by_rms(),
    rmsjax.scale_by_rms(bias_correction=True),
    rmsjax.scale_by_centered_rms(),
    rmsjax.scale_by_centered_rms(bias_correction=True),
    rmsjax.scale_by_rss(),
    rmsjax.scale_by_adadelta(),
    rmsjax.scale_by_adam(),
    rmsjax.scale_by_amsgrad(),
    rmsjax.scale_by_adam_exact_bias(amsgrad=True),
    rmsjax.scale_by_adam_eps_hat(),
    rmsjax.trace(0.9),
    rmsjax.dampened_trace(0.9),
    rmsjax.add_decayed_weights(optax.constant_schedule(0.1)),
    rmsjax.decoupled_weight_decay(0.1, 0.1),
    rmsjax.scale_by_rprop(0.1),
    rmsjax.split_real_and_imaginary(rmsjax.scale_by_rms()),
]


@pytest.mark.parametrize("tx", TRANSFORMS)
def test_every_transformation_checks_its_state_type(tx) -> None:
    params = {"w": jnp.ones(3)}
    assert not isinstance(tx.init(params), optax.EmptyState)
    tx.update(params, tx.init(params), params)  # its own state is fine
    with pytest.raises(TypeError, match=r"expected its state as .*got _Foreign.*`init`"):
        tx.update(params, _Foreign(other=params), params)


# name -> (the stateless rmsjax transformation, optax's)
STATELESS = {
    "scale": (rmsjax.scale(0.5), optax.scale(0.5)),
    "scale_by_learning_rate": (
        rmsjax.scale_by_learning_rate(0.1),
        optax.scale_by_learning_rate(0.1),
    ),
    "add_decayed_weights": (rmsjax.add_decayed_weights(0.1), optax.add_decayed_weights(0.1)),
}


@pytest.mark.parametrize("name", sorted(STATELESS))
@pytest.mark.parametrize("state", [{}, 0, None, _Foreign(other=1)], ids=repr)
def test_stateless_transformations_ignore_their_state_as_optax_does(name, state) -> None:
    tx, reference = STATELESS[name]
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, 0.25, -1.0])}
    got, new_state = tx.update(grads, state, params)
    want, want_state = reference.update(grads, state, params)
    chex.assert_trees_all_equal(got, want)
    assert new_state is state and want_state is state


# --------------------------------------------------------------------------------------------
# Structure errors say which tree is which
# --------------------------------------------------------------------------------------------


def test_structure_error_attributes_each_key_to_its_tree() -> None:
    opt = rmsjax.rmsprop(0.1)
    state = opt.init({"w": jnp.ones(2)})
    with pytest.raises(ValueError) as info:
        opt.update({"v": jnp.ones(2)}, state)
    message = str(info.value)
    assert "the gradients have ['v'], which the optimizer state lacks" in message
    assert "the optimizer state has ['w'], which the gradients lack" in message
    assert "expected keys" not in message.lower()


def test_structure_error_for_nested_and_container_mismatches() -> None:
    opt = rmsjax.adam(0.1)
    params = {"layer": {"w": jnp.ones(2), "b": jnp.ones(1)}}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"(?i)at \['layer'\], the gradients have \['c'\]"):
        opt.update({"layer": {"w": jnp.ones(2), "c": jnp.ones(1)}}, state)
    state = opt.init((jnp.ones(2), jnp.ones(2)))
    with pytest.raises(ValueError, match="the gradients have a list where the optimizer state"):
        opt.update([jnp.ones(2), jnp.ones(2)], state)


def test_apply_updates_errors_talk_about_updates_and_params() -> None:
    with pytest.raises(ValueError) as info:
        rmsjax.apply_updates({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
    message = str(info.value)
    assert "tree of updates does not have the structure of the params" in message
    assert "the params have ['a'], which the updates lack" in message
    assert "the updates have ['b'], which the params lack" in message
    assert "gradient" not in message


# --------------------------------------------------------------------------------------------
# None parameters and None updates, as optax
# --------------------------------------------------------------------------------------------


def test_apply_updates_with_none_params_matches_optax() -> None:
    x = jnp.asarray([1.0, 2.0])
    assert rmsjax.apply_updates(None, x) is optax.apply_updates(None, x) is None
    params = {"w": x, "frozen": None}
    for updates in ({"w": x, "frozen": None}, {"w": x, "frozen": jnp.ones(3)}):
        ours = rmsjax.apply_updates(params, updates)
        theirs = optax.apply_updates(params, updates)
        assert ours["frozen"] is None and theirs["frozen"] is None
        np.testing.assert_array_equal(ours["w"], theirs["w"])


@pytest.mark.parametrize(
    "name, args",
    [
        ("add_decayed_weights", (0.1,)),
        ("add_decayed_weights", (optax.constant_schedule(0.1),)),
        ("scale", (0.5,)),
        ("scale_by_learning_rate", (0.1,)),
        ("scale_by_schedule", (optax.constant_schedule(0.1),)),
    ],
)
def test_none_updates_give_none_as_in_optax(name: str, args: tuple) -> None:
    params = {"w": jnp.ones(3)}
    for lib in (optax, rmsjax):
        tx = getattr(lib, name)(*args)
        state = tx.init(params)
        updates, new_state = tx.update(None, state, params)
        assert updates is None
        assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_none_updates_keep_the_state_of_stateful_transformations() -> None:
    """optax replaces the moments by None here (state nu=None); rmsjax keeps them."""
    params = {"w": jnp.ones(3)}
    for tx in (rmsjax.scale_by_rms(), rmsjax.trace(0.9), rmsjax.scale_by_adam()):
        state = tx.init(params)
        updates, new_state = tx.update(None, state, params)
        assert updates is None
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
