"""Fusion by capability: what a chain records (rmsjax.stages) and which kernel call it plans
(rmsjax.fused.plans), whatever way the chain was built."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax
import pytest

import rmsjax
import rmsjax.compat.keras as keras_optim
import rmsjax.compat.pytorch as torch_optim
import rmsjax.compat.tf1 as tf1
from rmsjax.fused.plans import plan
from rmsjax.stages import Stage, recording

PARAMS = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}


def recorded(opt: Any) -> tuple[list[Stage], bool]:
    """The stages ``opt.update`` records, and whether every stage (and the chain's output)
    saw the very gradient tree the chain was given."""
    state = opt.init(PARAMS)
    grads = {"w": jnp.full((4, 3), 0.5), "b": jnp.full(3, -0.5)}
    with recording() as rec:
        out, _ = opt.update(grads, state, PARAMS)
    straight = out is grads and all(s.updates is grads for s in rec.stages)
    return rec.stages, straight


# name -> (optimizer, the kernel kind it must plan to, or None when no kind runs it)
CASES: dict[str, tuple[Any, str | None]] = {
    "rmsjax.rmsprop": (rmsjax.rmsprop(0.1), "rms"),
    "rmsjax.rmsprop centered momentum": (
        rmsjax.rmsprop(0.1, centered=True, momentum=0.9, nesterov=True),
        "rms",
    ),
    "rmsjax.adam": (rmsjax.adam(0.1), "adam"),
    "rmsjax.adamw": (rmsjax.adamw(0.1), "adam"),
    "rmsjax.sgd": (rmsjax.sgd(0.1), "sgd"),
    "rmsjax.sgd momentum": (rmsjax.sgd(0.1, momentum=0.9), "sgd"),
    "user chain": (
        optax.chain(rmsjax.scale_by_rms(decay=0.95), rmsjax.scale(-0.01), rmsjax.trace(0.5)),
        "rms",
    ),
    "user chain, optax identity inside": (
        optax.chain(rmsjax.scale_by_adam(), optax.identity(), rmsjax.scale_by_learning_rate(0.1)),
        "adam",
    ),
    "nested chains": (
        optax.chain(optax.chain(rmsjax.scale_by_rms()), optax.chain(rmsjax.scale(-1.0))),
        "rms",
    ),
    "torch rmsprop": (torch_optim.rmsprop(lr=0.01), "rms"),
    "torch adam": (torch_optim.adam(lr=0.01), "adam"),
    "keras rmsprop momentum": (keras_optim.rmsprop(momentum=0.9), "rms"),
    "tf1 rmsprop": (tf1.rmsprop(0.01, momentum=0.9), "rms"),
    # the linear terms around the rules, and the step size after the momentum buffer
    "torch rmsprop every flag": (
        torch_optim.rmsprop(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1, maximize=True),
        "rms",
    ),
    "torch adam weight decay": (torch_optim.adam(lr=0.01, weight_decay=0.1, maximize=True), "adam"),
    "torch adamw": (torch_optim.adamw(lr=0.01, maximize=True), "adam"),
    "torch sgd weight decay": (torch_optim.sgd(lr=0.01, weight_decay=0.1, maximize=True), "sgd"),
    "keras rmsprop weight decay": (keras_optim.rmsprop(momentum=0.9, weight_decay=0.1), "rms"),
    "keras adam": (keras_optim.adam(), "adam"),
    "keras adamw": (keras_optim.adamw(), "adam"),
    "keras sgd momentum": (keras_optim.sgd(momentum=0.9, nesterov=True, weight_decay=0.1), "sgd"),
    "user chain, decay on both sides": (
        optax.chain(
            rmsjax.add_decayed_weights(0.1),
            rmsjax.scale_by_rms(),
            rmsjax.scale(-0.1),
            rmsjax.decoupled_weight_decay(0.1, 0.1),
        ),
        None,  # at most one decay term
    ),
    "a leading scale that is not a sign": (
        optax.chain(rmsjax.scale(-2.0), rmsjax.scale_by_rms(), rmsjax.scale(-0.1)),
        None,
    ),
    "torch adam amsgrad": (torch_optim.adam(lr=0.01, amsgrad=True), None),
    "nesterov momentum with a decay term": (
        optax.chain(
            rmsjax.scale_by_rms(),
            rmsjax.scale(-0.1),
            rmsjax.trace(0.9, nesterov=True),
            rmsjax.decoupled_weight_decay(0.1, 0.1),
        ),
        None,  # the table's exclusive flags: the kernel has no such loop
    ),
    # rules the kernel does not run, or a transformation that is not a stage in the chain
    "rmsjax.adagrad": (rmsjax.adagrad(0.1), None),
    "optax clip in the chain": (
        optax.chain(optax.clip(1.0), rmsjax.scale_by_rms(), rmsjax.scale(-0.1)),
        None,
    ),
    "optax's own rms": (optax.chain(optax.scale_by_rms(), rmsjax.scale(-0.1)), None),
    "wrong order": (optax.chain(rmsjax.scale(-0.1), rmsjax.scale_by_rms()), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_chain_plans_by_what_it_records(name: str) -> None:
    opt, kind = CASES[name]
    stages, straight = recorded(opt)
    got = plan(stages) if straight else "the gradients were changed between stages"
    if kind is None:
        assert isinstance(got, str), [s.name for s in stages]
    else:
        assert not isinstance(got, str), got
        assert got.kind.name == kind


# name -> (optimizer, the plan's flags that name the chain's shape)
FLAGS: dict[str, tuple[Any, dict[str, bool]]] = {
    "optax rmsprop: step size inside the buffer": (
        rmsjax.rmsprop(0.1, momentum=0.9),
        {"scale_first": True, "maximize": False},
    ),
    "torch rmsprop: after it, with every term": (
        torch_optim.rmsprop(lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True),
        {"scale_first": False, "maximize": True, "coupled_decay": True, "eps_in_sqrt": False},
    ),
    "keras rmsprop: decoupled decay": (
        keras_optim.rmsprop(momentum=0.9, weight_decay=0.1),
        {"scale_first": True, "decoupled_decay": True, "eps_in_sqrt": True},
    ),
    "optax adamw: decay before the step size": (
        rmsjax.adamw(0.1),
        {"weight_decay": True, "eps_hat": False},
    ),
    "torch adamw: decoupled": (torch_optim.adamw(lr=0.1), {"decoupled_decay": True}),
    "keras adam: epsilon hat": (keras_optim.adam(), {"eps_hat": True, "nesterov": False}),
    "optax sgd: step size after the buffer": (
        rmsjax.sgd(0.1, momentum=0.9),
        {"scale_first": False},
    ),
    "keras sgd: before it": (keras_optim.sgd(momentum=0.9), {"scale_first": True}),
}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_the_plan_names_the_chains_order_and_terms(name: str) -> None:
    opt, want = FLAGS[name]
    stages, straight = recorded(opt)
    got = plan(stages)
    assert straight and not isinstance(got, str), got
    assert {k: got.flags.get(k, False) for k in want} == want, got.flags


def test_a_recorded_update_computes_nothing_and_keeps_the_state() -> None:
    opt = rmsjax.adamw(0.1, mu_dtype=rmsjax.quantized(8))
    state = opt.init(PARAMS)
    with recording() as rec:
        out, new_state = opt.update(PARAMS, state, PARAMS)
    assert out is PARAMS
    assert new_state[0] is state[0]  # scale_by_adam's state, count not advanced
    assert [s.name for s in rec.stages] == ["adam", "add_decayed_weights", "scale"]
    assert rec.stages[0].state is state[0] and rec.stages[0].moments == ("mu", "nu")


def test_outside_a_recording_nothing_is_recorded() -> None:
    opt = rmsjax.rmsprop(0.1)
    state = opt.init(PARAMS)
    with recording() as rec:
        pass
    opt.update(PARAMS, state, PARAMS)
    assert rec.stages == []
