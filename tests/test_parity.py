"""rmsjax against optax, called live: same parameter trajectory over 20 jitted steps."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import optax
import pytest

import rmsjax
from tests.common import assert_trees_close, enable_x64, mixed_tree, trajectory

SCHEDULE = optax.exponential_decay(0.05, transition_steps=3, decay_rate=0.7)
LEARNING_RATES = {"const": 0.05, "schedule": SCHEDULE}

# Every combination of rmsprop's options (optax's _OPTIMIZERS_UNDER_TEST idea, as a table).
# Centered RMSProp with bias correction has a variance of exactly zero at step 1 (both moments
# are g^2 after correction), so its first update is g / sqrt(eps + rounding noise): with a tiny
# eps that is rounding noise in any implementation, so that pairing runs with eps = 1e-3 only.
RMSPROP_CASES = [
    dict(
        decay=decay,
        eps=eps,
        initial_scale=initial_scale,
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
        bias_correction=bias_correction,
    )
    for (
        centered,
        eps_in_sqrt,
        bias_correction,
        (momentum, nesterov),
        (decay, eps, initial_scale),
    ) in itertools.product(
        (False, True),
        (True, False),
        (False, True),
        ((None, False), (0.9, False), (0.9, True)),
        ((0.9, 1e-8, 0.0), (0.99, 1e-3, 1.0)),
    )
    if not (centered and bias_correction and eps < 1e-4)
]

# AdamW: each option on and off at least once, and the interesting pairings together.
_MASK = lambda p: {"scalar": False, "layer": True, "pair": (True, False)}
ADAMW_CASES = [
    dict(),
    dict(nesterov=True),
    dict(eps_root=1e-8),
    dict(mu_dtype=jnp.bfloat16),
    dict(weight_decay=0.1),
    dict(weight_decay=0.0),
    dict(weight_decay=optax.linear_schedule(0.1, 0.0, 10)),
    dict(weight_decay=0.1, mask=_MASK),
    dict(
        nesterov=True, eps_root=1e-8, weight_decay=optax.linear_schedule(0.1, 0.0, 10), mask=_MASK
    ),
]


def _case_id(case: dict) -> str:
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in case.items())


def _compare(make, steps: int = 20) -> None:
    params = mixed_tree()
    expected = trajectory(make(optax), params, steps)
    actual = trajectory(make(rmsjax), params, steps)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        try:
            assert_trees_close(a, e)
        except AssertionError as err:
            raise AssertionError(f"trajectories diverge at step {i + 1}") from err


def _with_learning_rates(cases: list[dict]) -> list:
    """Each case once with a constant and once with a scheduled learning rate."""
    return [
        pytest.param(case, lr, id=f"{lr_name}:{_case_id(case)}")
        for case in cases
        for lr_name, lr in LEARNING_RATES.items()
    ]


@pytest.mark.parametrize(("case", "lr"), _with_learning_rates(RMSPROP_CASES))
def test_rmsprop_matches_optax(case: dict, lr) -> None:
    _compare(lambda lib: lib.rmsprop(lr, **case))


@pytest.mark.parametrize(("case", "lr"), _with_learning_rates(ADAMW_CASES))
def test_adamw_matches_optax(case: dict, lr) -> None:
    _compare(lambda lib: lib.adamw(lr, b1=0.8, b2=0.95, eps=1e-6, **case))


BLOCKS = {
    "scale": lambda lib: lib.scale(-0.1),
    "scale_by_learning_rate": lambda lib: lib.scale_by_learning_rate(0.1),
    "scale_by_learning_rate_schedule": lambda lib: lib.scale_by_learning_rate(SCHEDULE),
    "scale_by_learning_rate_no_flip": lambda lib: lib.chain(
        lib.scale_by_learning_rate(0.1, flip_sign=False), lib.scale(-1.0)
    ),
    "scale_by_schedule": lambda lib: lib.scale_by_schedule(lambda c: -0.1 / (1.0 + c)),
    "scale_by_rms": lambda lib: lib.chain(lib.scale_by_rms(0.8, 1e-6, 0.5), lib.scale(-0.05)),
    "scale_by_rms_bc": lambda lib: lib.chain(
        lib.scale_by_rms(0.8, bias_correction=True, eps_in_sqrt=False), lib.scale(-0.05)
    ),
    "scale_by_stddev": lambda lib: lib.chain(
        lib.scale_by_stddev(0.8, 1e-6, 1.0, bias_correction=True), lib.scale(-0.05)
    ),
    "trace": lambda lib: lib.chain(lib.scale(-0.01), lib.trace(0.9)),
    "trace_nesterov_bf16_acc": lambda lib: lib.chain(
        lib.scale(-0.01), lib.trace(0.9, nesterov=True, accumulator_dtype=jnp.bfloat16)
    ),
    "add_decayed_weights": lambda lib: lib.chain(
        lib.add_decayed_weights(0.3), lib.scale_by_learning_rate(0.01)
    ),
    "add_decayed_weights_schedule_mask": lambda lib: lib.chain(
        lib.add_decayed_weights(
            optax.linear_schedule(0.5, 0.0, 8),
            mask={"scalar": True, "layer": {"w": True, "b": False}, "pair": False},
        ),
        lib.scale_by_learning_rate(0.01),
    ),
    "scale_by_adam": lambda lib: lib.chain(lib.scale_by_adam(), lib.scale(-0.05)),
    "scale_by_adam_nesterov": lambda lib: lib.chain(
        lib.scale_by_adam(0.5, 0.9, 1e-5, 1e-7, nesterov=True), lib.scale(-0.05)
    ),
}


@pytest.mark.parametrize("make", BLOCKS.values(), ids=BLOCKS.keys())
def test_building_blocks_match_optax(make) -> None:
    _compare(make)


# optax's stateless transformations (state optax.EmptyState) ignore the state they are given:
# optax.scale(2.0).update(g, {}) and optax.add_decayed_weights(1e-4).update(g, 0, params) work,
# and return that state unchanged. rmsjax's do the same.
STATELESS = {
    "scale": (lambda lib: lib.scale(2.0), {}),
    "scale_by_learning_rate": (lambda lib: lib.scale_by_learning_rate(0.1), ()),
    "add_decayed_weights": (lambda lib: lib.add_decayed_weights(1e-4), 0),
}


@pytest.mark.parametrize(("make", "state"), STATELESS.values(), ids=STATELESS.keys())
def test_stateless_transformations_accept_any_state_as_optax(make, state) -> None:
    params = mixed_tree()
    grads = mixed_tree(seed=1)
    expected, optax_state = make(optax).update(grads, state, params)
    actual, rmsjax_state = make(rmsjax).update(grads, state, params)
    assert_trees_close(actual, expected, rtol=0, atol=0)
    assert optax_state is state and rmsjax_state is state


# The same transformations with a schedule have a state (the count): they still check it.
STATEFUL = {
    "scale_by_learning_rate": lambda lib: lib.scale_by_learning_rate(SCHEDULE),
    "add_decayed_weights": lambda lib: lib.add_decayed_weights(SCHEDULE),
}


@pytest.mark.parametrize("make", STATEFUL.values(), ids=STATEFUL.keys())
def test_stateful_transformations_still_reject_another_state(make) -> None:
    params = mixed_tree()
    assert not isinstance(make(optax).init(params), optax.EmptyState)
    with pytest.raises(TypeError, match=r"expected its state as \w+, got dict"):
        make(rmsjax).update(params, {}, params)


def test_scale_by_learning_rate_none_is_identity() -> None:
    params = mixed_tree()
    tx = rmsjax.scale_by_learning_rate(None)
    updates, _ = tx.update(params, tx.init(params))
    assert_trees_close(updates, params, rtol=0, atol=0)


def test_float64_parity() -> None:
    """In float64 the two implementations agree far below float32 rounding."""
    import jax

    with enable_x64(True):
        params = mixed_tree(dtype=jnp.float64)
        for make in (
            lambda lib: lib.rmsprop(0.05, centered=True, momentum=0.9, nesterov=True),
            lambda lib: lib.rmsprop(0.05, eps_in_sqrt=False, bias_correction=True),
            lambda lib: lib.adamw(0.05, nesterov=True),
        ):
            expected = trajectory(make(optax), params, 20)[-1]
            actual = trajectory(make(rmsjax), params, 20)[-1]
            assert jax.tree.leaves(actual)[0].dtype == jnp.float64
            assert_trees_close(actual, expected, rtol=1e-12, atol=1e-14)
