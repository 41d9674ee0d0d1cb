"""State layouts are optax's: same NamedTuple classes, fields and order, for every shared name.

A state (or an Orbax checkpoint of one) written by an optax optimizer therefore restores into
the rmsjax optimizer of the same name, and training continues with rmsjax's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import rmsjax
from tests.common import loss, mixed_tree


def _mask(params: Any) -> Any:
    return jax.tree.map(lambda x: x.ndim > 1, params)


SCHEDULE = optax.exponential_decay(0.05, transition_steps=3, decay_rate=0.5)

# (name, kwargs): the transformation or optimizer `name` of both libraries, built alike.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("scale", dict(step_size=0.5)),
    ("scale_by_schedule", dict(step_size_fn=SCHEDULE)),
    ("scale_by_learning_rate", dict(learning_rate=0.1)),
    ("scale_by_learning_rate", dict(learning_rate=SCHEDULE)),
    ("scale_by_rms", dict()),
    ("scale_by_rms", dict(bias_correction=True)),
    ("scale_by_rms", dict(eps_in_sqrt=False, initial_scale=0.1)),
    ("scale_by_stddev", dict()),
    ("scale_by_stddev", dict(bias_correction=True)),
    ("scale_by_rss", dict()),
    ("scale_by_adadelta", dict()),
    ("scale_by_adam", dict()),
    ("scale_by_adam", dict(nesterov=True, mu_dtype=jnp.bfloat16)),
    ("scale_by_amsgrad", dict()),
    ("trace", dict(decay=0.9)),
    ("trace", dict(decay=0.9, nesterov=True)),
    ("add_decayed_weights", dict(weight_decay=0.1)),
    ("add_decayed_weights", dict(weight_decay=SCHEDULE)),
    ("add_decayed_weights", dict(weight_decay=0.1, mask=_mask)),
    ("scale_by_rprop", dict(learning_rate=0.1)),
    ("rmsprop", dict(learning_rate=0.1)),
    ("rmsprop", dict(learning_rate=SCHEDULE, centered=True, momentum=0.9, nesterov=True)),
    ("rmsprop", dict(learning_rate=0.1, bias_correction=True, momentum=0.5)),
    ("rmsprop", dict(learning_rate=0.1, centered=True, bias_correction=True)),
    ("adam", dict(learning_rate=0.1)),
    ("adam", dict(learning_rate=SCHEDULE, nesterov=True)),
    ("adamw", dict(learning_rate=0.1)),
    ("adamw", dict(learning_rate=SCHEDULE, weight_decay=SCHEDULE, mask=_mask)),
    ("sgd", dict(learning_rate=0.1)),
    ("sgd", dict(learning_rate=SCHEDULE, momentum=0.9, nesterov=True)),
    ("adagrad", dict(learning_rate=0.1)),
    ("adadelta", dict()),
    ("adadelta", dict(learning_rate=0.5, weight_decay=0.1, weight_decay_mask=_mask)),
    ("rprop", dict(learning_rate=0.1)),
]


def _both(name: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    return getattr(rmsjax, name)(**kwargs), getattr(optax, name)(**kwargs)


def _params() -> Any:
    return {**mixed_tree(), "frozen": None}


def _assert_same_layout(ours: Any, theirs: Any) -> None:
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    # the same container types all the way down (NamedTuple classes compare by identity)
    kinds = lambda tree: [
        type(x).__name__
        for x in jax.tree.leaves(tree, is_leaf=lambda y: isinstance(y, tuple) and y != ())
    ]
    assert kinds(ours) == kinds(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert jnp.shape(a) == jnp.shape(b)
        assert jnp.result_type(a) == jnp.result_type(b)


@pytest.mark.parametrize(
    ("name", "kwargs"), CONFIGS, ids=[f"{n}-{'-'.join(k)}" for n, k in CONFIGS]
)
def test_state_structure_is_optax(name: str, kwargs: dict[str, Any]) -> None:
    ours, theirs = _both(name, kwargs)
    params = _params()
    # traced, not run (jax.eval_shape): structure, shapes and dtypes are all that is compared
    state_ours = jax.eval_shape(ours.init, params)
    state_theirs = jax.eval_shape(theirs.init, params)
    _assert_same_layout(state_ours, state_theirs)
    # ... and after a step (counts stay int32, nothing is added or dropped)
    grads = jax.tree.map(jnp.ones_like, params)
    _assert_same_layout(
        jax.eval_shape(ours.update, grads, state_ours, params)[1],
        jax.eval_shape(theirs.update, grads, state_theirs, params)[1],
    )


def test_the_state_classes_are_optax_own() -> None:
    assert rmsjax.ScaleByRmsState is optax.ScaleByRmsState
    assert rmsjax.ScaleByRStdDevState is optax.ScaleByRStdDevState
    assert rmsjax.ScaleByCenteredRmsState is optax.ScaleByRStdDevState
    assert rmsjax.ScaleByAdamState is optax.ScaleByAdamState
    assert rmsjax.ScaleByAmsgradState is optax.ScaleByAmsgradState
    assert rmsjax.ScaleByRssState is optax.ScaleByRssState
    assert rmsjax.ScaleByAdaDeltaState is optax.ScaleByAdaDeltaState
    assert rmsjax.ScaleByRpropState is optax.ScaleByRpropState
    assert rmsjax.ScaleByScheduleState is optax.ScaleByScheduleState
    assert rmsjax.TraceState is optax.TraceState
    assert rmsjax.ScaleState is optax.ScaleState
    assert rmsjax.AddDecayedWeightsState is optax.AddDecayedWeightsState
    assert rmsjax.SplitRealAndImaginaryState is optax.contrib.SplitRealAndImaginaryState
    params = {"w": jnp.ones(2)}
    assert type(optax.scale_by_rms(bias_correction=True).init(params)) is (
        rmsjax.ScaleByRmsWithCountState
    )
    assert type(optax.scale_by_stddev(bias_correction=True).init(params)) is (
        rmsjax.ScaleByRStdDevWithCountState
    )
    assert type(optax.add_decayed_weights(SCHEDULE).init(params)) is rmsjax.WeightDecaySchedule


@pytest.mark.filterwarnings("ignore:Casting complex values")  # optax's inject_hyperparams
def test_wrappers_and_complex_split_have_optax_layout() -> None:
    params = {**_params(), "z": jnp.asarray([1 + 2j, -1j], jnp.complex64)}
    pairs = [
        (
            rmsjax.split_real_and_imaginary(rmsjax.scale_by_rms()),
            optax.contrib.split_real_and_imaginary(optax.scale_by_rms()),
        ),
        (
            optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=0.1, momentum=0.9),
            optax.inject_hyperparams(optax.rmsprop)(learning_rate=0.1, momentum=0.9),
        ),
        (
            optax.MultiSteps(rmsjax.adamw(0.1), every_k_schedule=2),
            optax.MultiSteps(optax.adamw(0.1), every_k_schedule=2),
        ),
    ]
    for ours, theirs in pairs:
        assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))


# --------------------------------------------------------------------------------------------
# An optax checkpoint restores into rmsjax and continues with rmsjax's numbers
# --------------------------------------------------------------------------------------------

RESUMED: list[tuple[str, Callable[[Any], Any]]] = [
    ("rmsprop", lambda lib: lib.rmsprop(0.02, centered=True, momentum=0.9)),
    ("rmsprop_bias", lambda lib: lib.rmsprop(SCHEDULE, bias_correction=True)),
    ("adamw", lambda lib: lib.adamw(SCHEDULE, weight_decay=0.1, mask=_mask)),
    ("adadelta", lambda lib: lib.adadelta(0.5, weight_decay=0.01)),
]
STEPS = 3


def _run(opt: Any, params: Any, state: Any) -> tuple[Any, Any]:
    """STEPS steps of ``opt`` in one compiled scan."""

    def step(carry: Any, _: Any) -> tuple[Any, None]:
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    return jax.jit(lambda p, s: jax.lax.scan(step, (p, s), None, length=STEPS)[0])(params, state)


def test_optax_checkpoint_restores_into_rmsjax_and_continues(tmp_path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    params0 = mixed_tree()
    written, expected = {}, {}
    for name, make in RESUMED:
        p, s = _run(make(optax), params0, make(optax).init(params0))
        written[name] = {"params": p, "opt_state": s}
        expected[name] = _run(make(optax), p, s)  # optax continuing, no checkpoint
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", written)
    # A fresh rmsjax state is the template: Orbax restores into its classes and dtypes.
    template = {
        name: {"params": params0, "opt_state": make(rmsjax).init(params0)} for name, make in RESUMED
    }
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    for name, make in RESUMED:
        item = restored[name]
        assert jax.tree.structure(item) == jax.tree.structure(written[name])
        for a, b in zip(jax.tree.leaves(item), jax.tree.leaves(written[name]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # exact round trip
        ours = _run(make(rmsjax), item["params"], item["opt_state"])
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected[name]), strict=True):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6, err_msg=name
            )
