"""Schedules: optax's re-exported as they are; inverse_time_decay against its formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax import schedules

REEXPORTED = [
    "constant_schedule",
    "exponential_decay",
    "polynomial_schedule",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "piecewise_constant_schedule",
    "join_schedules",
]


@pytest.mark.parametrize("name", REEXPORTED)
def test_reexports_are_optax_functions(name: str) -> None:
    # the same objects, so the same numbers, and nothing to keep in sync
    assert getattr(rmsjax, name) is getattr(optax, name)
    assert getattr(schedules, name) is getattr(optax, name)


def test_reexported_schedules_evaluate_under_jit() -> None:
    fns = [
        rmsjax.constant_schedule(0.1),
        rmsjax.exponential_decay(0.1, transition_steps=10, decay_rate=0.9, staircase=True),
        rmsjax.polynomial_schedule(0.1, 0.01, power=2, transition_steps=40),
        rmsjax.cosine_decay_schedule(0.1, decay_steps=40, alpha=0.1),
        rmsjax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=5, decay_steps=40),
        rmsjax.piecewise_constant_schedule(0.1, {10: 0.5, 30: 0.1}),
        rmsjax.join_schedules(
            [rmsjax.constant_schedule(0.1), rmsjax.constant_schedule(0.01)], [20]
        ),
    ]
    counts = jnp.arange(50)
    traced = jax.jit(lambda c: jnp.stack([jax.vmap(f)(c) for f in fns]))(counts)
    eager = np.array([[float(f(int(c))) for c in counts] for f in fns])
    np.testing.assert_allclose(np.asarray(traced), eager, rtol=1e-6)
    # the classic step decay: multiply by 0.9 every 10 steps
    np.testing.assert_allclose(eager[1], 0.1 * 0.9 ** (np.arange(50) // 10), rtol=1e-6)


def inverse_time_reference(t: np.ndarray, lr0: float, rate: float, steps: float, stair: bool):
    tau = np.floor(t / steps) if stair else t / steps
    return lr0 / (1.0 + rate * tau)


@pytest.mark.parametrize("staircase", [False, True])
@pytest.mark.parametrize("lr0, rate, steps", [(0.1, 0.5, 10), (1.0, 2.0, 3), (0.03, 0.0, 1)])
def test_inverse_time_decay_formula(lr0: float, rate: float, steps: int, staircase: bool) -> None:
    fn = rmsjax.inverse_time_decay(lr0, rate, steps, staircase=staircase)
    t = np.arange(200)
    expected = inverse_time_reference(t.astype(np.float64), lr0, rate, steps, staircase)
    eager = np.array([float(fn(int(c))) for c in t[:5]])
    traced = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(t, jnp.int32)))
    np.testing.assert_allclose(eager, expected[:5], rtol=1e-6)
    np.testing.assert_allclose(traced, expected, rtol=1e-6)
    assert float(fn(0)) == pytest.approx(lr0)


def test_inverse_time_decay_staircase_is_flat_between_boundaries() -> None:
    fn = rmsjax.inverse_time_decay(0.2, decay_rate=1.0, decay_steps=5, staircase=True)
    values = np.asarray(jax.vmap(fn)(jnp.arange(15)))
    np.testing.assert_allclose(values, 0.2 / (1 + np.repeat([0.0, 1.0, 2.0], 5)), rtol=1e-6)


def test_inverse_time_decay_drives_optimizers_like_optax() -> None:
    # The same schedule object given to rmsjax.sgd and optax.sgd: same trajectory.
    fn = rmsjax.inverse_time_decay(0.3, decay_rate=0.5, decay_steps=4)
    f = lambda p: jnp.sum((p - 1.0) ** 2 * jnp.arange(1.0, 4.0))

    def run(opt: optax.GradientTransformation) -> jax.Array:
        def step(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(f)(p), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        p0 = jnp.zeros(3)
        return jax.lax.scan(step, (p0, opt.init(p0)), None, length=20)[1]

    both = jax.jit(lambda: (run(rmsjax.sgd(fn, momentum=0.5)), run(optax.sgd(fn, momentum=0.5))))
    ours, theirs = both()
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(init_value=float("nan"), decay_rate=0.5, decay_steps=10), "init_value"),
        (dict(init_value=0.1, decay_rate=-0.5, decay_steps=10), "decay_rate"),
        (dict(init_value=0.1, decay_rate=0.5, decay_steps=0), "decay_steps"),
        (dict(init_value=0.1, decay_rate=0.5, decay_steps=-3), "decay_steps"),
    ],
)
def test_inverse_time_decay_validation(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        rmsjax.inverse_time_decay(**kw)


def test_inverse_time_decay_under_inject_hyperparams_style_tracing() -> None:
    # traced hyperparameters are not checked and do not break tracing
    make = jax.jit(lambda lr0, rate: rmsjax.inverse_time_decay(lr0, rate, 10)(jnp.int32(20)))
    assert float(make(0.1, 0.5)) == pytest.approx(0.1 / 2.0)
