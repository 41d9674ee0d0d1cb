"""rmsjax inside the optax ecosystem: each wrapper checked against the same wrapper around optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from tests.common import assert_trees_close, loss, mixed_tree, trajectory


def _compare(make, steps: int = 20) -> None:
    params = mixed_tree()
    expected = trajectory(make(optax), params, steps)
    actual = trajectory(make(rmsjax), params, steps)
    assert_trees_close(actual, expected)


def test_instances_of_optax_base_classes() -> None:
    assert isinstance(rmsjax.scale_by_rms(), optax.GradientTransformation)
    assert isinstance(rmsjax.rmsprop(0.1), optax.GradientTransformationExtraArgs)
    assert isinstance(rmsjax.adamw(0.1), optax.GradientTransformationExtraArgs)


def test_optax_chain_with_rmsjax_parts() -> None:
    _compare(
        lambda lib: optax.chain(
            optax.clip_by_global_norm(1.0), lib.scale_by_rms(), lib.scale_by_learning_rate(0.05)
        )
    )


def test_rmsjax_chain_with_optax_parts() -> None:
    _compare(
        lambda lib: rmsjax.chain(
            lib.scale_by_centered_rms() if lib is rmsjax else optax.scale_by_stddev(),
            optax.clip(0.5),
            optax.scale_by_learning_rate(0.05),
            lib.trace(0.9),
        )
    )


def test_extra_args_pass_through_chain() -> None:
    seen = {}

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, *, tag=None):
        seen["tag"] = tag
        return updates, state

    opt = rmsjax.chain(rmsjax.scale_by_rms(), optax.GradientTransformationExtraArgs(init, update))
    params = mixed_tree()
    opt.update(params, opt.init(params), params, tag="hello")
    assert seen["tag"] == "hello"


RMSPROP_HPARAMS = dict(learning_rate=0.05, decay=0.9, eps=1e-6, initial_scale=0.1, momentum=0.8)
ADAMW_HPARAMS = dict(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-6, eps_root=1e-9, weight_decay=0.1)
CHANGED = dict(
    learning_rate=0.02,
    decay=0.5,
    eps=1e-2,
    initial_scale=0.1,  # only read by init; changing it later has (correctly) no effect
    momentum=0.3,
    b1=0.5,
    b2=0.7,
    eps_root=1e-3,
    weight_decay=0.5,
)


@pytest.mark.parametrize(
    ("name", "hparams", "extra", "jit"),
    [
        ("rmsprop", RMSPROP_HPARAMS, {}, True),
        ("rmsprop", RMSPROP_HPARAMS, {}, False),
        (
            "rmsprop",
            {**RMSPROP_HPARAMS, "eps": 1e-3},  # see test_parity: centered + bias_correction
            dict(centered=True, nesterov=True, bias_correction=True),
            True,
        ),
        ("adamw", ADAMW_HPARAMS, dict(nesterov=True), True),
    ],
    ids=["rmsprop-jit", "rmsprop-eager", "centered-jit", "adamw-jit"],
)
def test_inject_hyperparams_every_numeric_hyperparameter(name, hparams, extra, jit) -> None:
    params = mixed_tree()
    grads = jax.grad(loss)(params)

    def run(lib, changes):
        opt = optax.inject_hyperparams(getattr(lib, name))(**hparams, **extra)
        state = opt.init(params)
        update = jax.jit(opt.update) if jit else opt.update
        p = params
        for step in range(6):
            if step == 3:  # change every hyperparameter mid-run
                for k in changes:
                    state.hyperparams[k] = jnp.asarray(changes[k], jnp.float32)
            u, state = update(grads, state, p)
            p = optax.apply_updates(p, u)
        return p

    unchanged = run(rmsjax, {})
    for key in hparams:
        if key == "initial_scale":
            continue
        ours, theirs = run(rmsjax, {key: CHANGED[key]}), run(optax, {key: CHANGED[key]})
        assert_trees_close(ours, theirs)
        moved = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(unchanged), strict=True)
        )
        assert moved > 1e-6, f"changing {key} had no effect"


def test_inject_hyperparams_initial_scale_is_injectable() -> None:
    params = mixed_tree()
    opt = optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=0.1, initial_scale=2.0)
    state = opt.init(params)
    nu = state.inner_state[0].nu
    assert all(bool(jnp.all(leaf == 2.0)) for leaf in jax.tree.leaves(nu))


def test_multisteps() -> None:
    _compare(lambda lib: optax.MultiSteps(lib.rmsprop(0.05, momentum=0.9), every_k_schedule=3))


def test_masked() -> None:
    mask = {"scalar": False, "layer": {"w": True, "b": False}, "pair": (True, True)}
    _compare(lambda lib: optax.masked(lib.rmsprop(0.05, centered=True), mask))


def test_multi_transform() -> None:
    labels = {"scalar": "sgd", "layer": {"w": "rms", "b": "adamw"}, "pair": ("rms", "adamw")}
    _compare(
        lambda lib: optax.multi_transform(
            {
                "rms": lib.rmsprop(0.05, momentum=0.9),
                "adamw": lib.adamw(0.05, weight_decay=0.1),
                "sgd": optax.sgd(0.01),
            },
            labels,
        )
    )


def test_apply_if_finite() -> None:
    params = mixed_tree()
    grads = jax.grad(loss)(params)
    bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
    results = []
    for lib in (rmsjax, optax):
        opt = optax.apply_if_finite(lib.rmsprop(0.05, momentum=0.9), max_consecutive_errors=2)
        state, p = opt.init(params), params
        update = jax.jit(opt.update)
        for g in (grads, bad, grads, bad, bad, grads):
            u, state = update(g, state, p)
            p = optax.apply_updates(p, u)
        results.append((p, int(state.total_notfinite)))
    assert results[0][1] == results[1][1] == 3
    assert_trees_close(results[0][0], results[1][0])


def test_state_roundtrip_through_numpy() -> None:
    params = mixed_tree()
    opt = rmsjax.rmsprop(0.05, centered=True, momentum=0.9, bias_correction=True)
    state = opt.init(params)
    grads = jax.grad(loss)(params)
    for _ in range(3):
        _, state = opt.update(grads, state, params)
    leaves, treedef = jax.tree.flatten(state)
    saved = [np.array(leaf) for leaf in leaves]  # e.g. what np.savez would store
    restored = jax.tree.unflatten(treedef, [jnp.asarray(leaf) for leaf in saved])
    u1, s1 = opt.update(grads, state, params)
    u2, s2 = opt.update(grads, restored, params)
    assert_trees_close(u2, u1, rtol=0, atol=0)
    assert_trees_close(s2, s1, rtol=0, atol=0)
    assert restored[0].count.dtype == jnp.int32
