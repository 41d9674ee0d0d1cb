"""The fused step: which path each step takes, and the optimizer that holds it.

:func:`build` turns any optax-protocol transformation ``tx`` into a :class:`FusedOptimizer`.
Its ``step`` first records the rules ``tx.update`` applies (:mod:`rmsjax.stages`: the
transformations the kernel can run record themselves instead of computing) and plans the
kernel call that applies the same rules in the same order (:func:`rmsjax.fused.plans.plan`).
It then sends the eligible leaves (:mod:`rmsjax.fused.selection`) through the native kernel, one
primitive per group (:mod:`rmsjax.fused.rules`, :mod:`rmsjax.fused.primitive`), and everything
else (counts, schedule states, other leaves) through ``tx.update`` + :func:`rmsjax.apply_updates`.

A step runs the pure-JAX chain for all its leaves (the *fallback*) for exactly the reasons of
:func:`route` (each a :data:`Fallback` string, logged at DEBUG level on the ``rmsjax.fused``
logger each time the step's Python runs: once per trace under ``jit``); anything else that
goes wrong in the engine raises.
``backend="native"`` raises instead of falling back where the kernel is unavailable or cannot
update a leaf's state.

Test hooks (documented): ``accelerator_present`` in :mod:`rmsjax.fused.primitive`,
``LEAVES_PER_CALL`` and ``RESULTS_PER_CALL`` in :mod:`rmsjax._native.call`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import optax

from rmsjax import native
from rmsjax._native import table
from rmsjax.fused import primitive, selection
from rmsjax.fused.plans import Plan, StateLayoutError, find_state, plan, replace_field
from rmsjax.fused.rules import group_step, pure_step, split_args
from rmsjax.stages import Stage, recording
from rmsjax.tree import is_none

__all__ = [
    "BACKENDS",
    "MIN_NATIVE_SIZE",
    "Fallback",
    "FusedOptimizer",
    "NativeFallbackWarning",
    "Route",
    "build",
    "record",
    "route",
]

logger = logging.getLogger("rmsjax.fused")

BACKENDS = ("auto", "native", "jax")
# Leaves smaller than this many elements are left to the XLA-compiled pure-JAX rule: for them a
# step costs per-array overhead, not bandwidth, and benchmarks/run.py measured the kernel slower
# than the compiled chain on trees of 4K-element leaves (1024 leaves, 4M parameters) and faster
# from 32K-element leaves up. The fused factories' ``min_native_size`` argument overrides it.
MIN_NATIVE_SIZE = 16384


class FusedOptimizer(NamedTuple):
    """An optimizer with the optax protocol (``init``, ``update``) plus a fused ``step``.

    ``step(params, grads, state) -> (new_params, new_state)`` equals
    ``update(grads, state, params)`` followed by ``rmsjax.apply_updates``. ``init`` and
    ``update`` are the pure-JAX optax-protocol functions, so the object can also be passed to
    ``optax.chain`` and friends like any ``GradientTransformation``.
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    step: Callable[[Any, Any, Any], tuple[Any, Any]]


class NativeFallbackWarning(UserWarning):
    """The native kernel is unavailable, so fused steps run the (slower) pure-JAX path.

    Issued once per process, at the first fused step with ``backend="auto"`` that has leaves
    the kernel would take, in a CPU-only process where the kernel could not be built or loaded
    (not when ``RMSJAX_NATIVE=0`` or ``backend="jax"`` chose the pure-JAX path on purpose).
    Silence it with ``warnings.filterwarnings("ignore", category=NativeFallbackWarning)``.
    """


_fallback_warned = False


def _warn_fallback() -> None:
    global _fallback_warned
    if _fallback_warned or not native.enabled() or primitive.accelerator_present():
        return
    _fallback_warned = True
    warnings.warn(
        f"rmsjax.fused: the native CPU kernel is unavailable ({native.status()}); fused steps "
        "run the pure-JAX path instead (same numbers, slower). Run `python -m rmsjax.native` "
        "to see why; pass backend='jax' (or set RMSJAX_NATIVE=0) to choose the pure-JAX path "
        "on purpose.",
        NativeFallbackWarning,
        stacklevel=4,
    )


# Why a step runs the pure-JAX chain for all its leaves: one of these strings (the last one
# followed by ": " and rmsjax.native.status()).
Fallback = str
JAX_BACKEND: Fallback = "backend='jax'"
NOT_STRAIGHT: Fallback = (
    "a transformation that is not one of the kernel's rules changes the updates between them "
    "(or after them)"
)
NO_PLAN: Fallback = "no kernel kind applies the chain's rules"
SEVERAL_DEVICES: Fallback = "more than one device, or an input sharded over several"
GRADIENT_TREE: Fallback = "the gradients' tree is not the parameters'"
NOT_THIS_STATE: Fallback = "the state is not this optimizer's"
SLOT_TREE: Fallback = "a state slot's tree is not the parameters'"
NO_LEAF: Fallback = "no leaf the kernel takes"
UNAVAILABLE: Fallback = "the native kernel is unavailable"


class Route(NamedTuple):
    """How a step that uses the kernel runs: the recorded stages and their plan, the trees
    flattened like the parameters, and the groups of leaves the kernel updates
    (:func:`rmsjax.fused.selection.group_leaves`)."""

    stages: list[Stage]
    plan: Plan
    treedef: Any  # the parameters' structure, None leaves included
    p_leaves: list[Any]
    g_leaves: list[Any]
    s_leaves: dict[str, list[Any]]  # per present slot of the plan
    groups: dict[Any, list[int]]


def record(tx: optax.GradientTransformation, params: Any, grads: Any, state: Any) -> Any:
    """The :class:`~rmsjax.stages.Stage` list of ``tx.update(grads, state, params)``, or
    :data:`NOT_STRAIGHT` when a transformation that is not a stage changes the updates (then
    the stages would not see the gradients, nor the chain return what they return)."""
    with recording() as rec:
        out, _ = tx.update(grads, state, params)
    if out is not grads or any(s.updates is not grads for s in rec.stages):
        return NOT_STRAIGHT
    return rec.stages


def slot_state(stages: Sequence[Stage], kernel_plan: Plan, slot: str) -> Any:
    """The state (before the step) of the stage that holds ``slot``."""
    return stages[kernel_plan.slots[slot]].state


def route(
    tx: optax.GradientTransformation,
    backend: str,
    min_native_size: int,
    params: Any,
    grads: Any,
    state: Any,
) -> Route | Fallback:
    """The :class:`Route` of one step, or why it runs the pure-JAX chain for every leaf.

    The reasons, checked in this order (after ``backend="native"`` with an unavailable kernel,
    which raises): :data:`JAX_BACKEND`, :data:`NOT_STRAIGHT` and
    :data:`NO_PLAN` (followed by the rules the chain applies: a chain the kernel does not
    run, such as AdamW with a ``mask``, or AdaGrad), :data:`SEVERAL_DEVICES`,
    :data:`GRADIENT_TREE` and :data:`NOT_THIS_STATE` (the pure-JAX chain then reports the
    mistake as without the fused step), :data:`SLOT_TREE` (e.g. 8-bit moments of Flax NNX
    ``Param`` variables, which hold no variable), :data:`NO_LEAF` (see
    :mod:`rmsjax.fused.selection`) and :data:`UNAVAILABLE`. Recording the chain's rules runs
    each transformation's state check, so a state of another optimizer raises its
    ``TypeError`` here, as ``update`` would.

    Raises:
      RuntimeError: ``backend="native"`` and the kernel is unavailable.
      ValueError: ``backend="native"`` and the kernel cannot update a leaf's state.
    """
    if backend == "jax":
        return JAX_BACKEND
    if backend == "native" and not native.available():
        raise RuntimeError(
            f"backend='native' was requested but the native kernel is unavailable "
            f"({native.status()}). Use backend='auto' to fall back to pure JAX."
        )
    stages = record(tx, params, grads, state)
    if isinstance(stages, str):
        return stages
    kernel_plan = plan(stages)
    if isinstance(kernel_plan, str):
        return f"{NO_PLAN}: {kernel_plan}"
    if not selection.single_device((params, grads)):
        return SEVERAL_DEVICES
    p_leaves, treedef = jax.tree.flatten(params, is_leaf=is_none)
    g_leaves = selection.leaves_like(treedef, grads)
    if g_leaves is None:
        return GRADIENT_TREE
    names = table.present_slots(kernel_plan.kind, kernel_plan.flags)
    s_leaves: dict[str, list[Any]] = {}
    for s in names:
        sub = slot_state(stages, kernel_plan, s)
        try:  # the step finds the slot again in the new state by the stage state's type
            found = find_state(state, (type(sub),), s)
        except StateLayoutError:
            return NOT_THIS_STATE
        if found is not sub:
            return NOT_THIS_STATE
        leaves = selection.leaves_like(treedef, getattr(sub, s))
        if leaves is None:
            return SLOT_TREE
        s_leaves[s] = leaves
    grouping = selection.group_leaves(p_leaves, g_leaves, s_leaves, min_native_size)
    if grouping.refused and backend == "native":
        i, why = grouping.refused[0]
        path = jax.tree_util.keystr(selection.leaf_paths(params)[i]) or "the root"
        raise ValueError(
            f"backend='native': the native kernel cannot update the parameter at "
            f"{path}: {why}. Use backend='auto' to run such leaves with the "
            "pure-JAX chain (the other leaves still use the kernel)."
        )
    if not grouping.groups:
        return NO_LEAF
    if not native.available():
        _warn_fallback()
        return f"{UNAVAILABLE}: {native.status()}"
    return Route(stages, kernel_plan, treedef, p_leaves, g_leaves, s_leaves, grouping.groups)


def build(
    tx: optax.GradientTransformation, *, backend: str, min_native_size: int
) -> FusedOptimizer:
    """The fused optimizer of ``tx``: ``init``/``update`` are ``tx``'s, ``step`` fuses.

    Args:
      tx: any optax-protocol transformation; its stages (:mod:`rmsjax.stages`) decide,
        at each step's trace, whether and how the kernel runs it.
      backend: ``"auto"``, ``"native"`` or ``"jax"``.
      min_native_size: leaves with fewer elements take the pure-JAX path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    if not isinstance(min_native_size, int) or isinstance(min_native_size, bool):
        raise TypeError(f"`min_native_size` must be an int >= 0, got {min_native_size!r}.")
    if min_native_size < 0:
        raise ValueError(
            f"`min_native_size` must be an int >= 0 (elements), got {min_native_size!r}."
        )

    def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        way = route(tx, backend, min_native_size, params, grads, state)
        if not isinstance(way, Route):
            logger.debug("rmsjax.fused: the step runs the pure-JAX chain: %s", way)
            return pure_step(tx, params, grads, state)
        names = table.present_slots(way.plan.kind, way.plan.flags)
        types = {s: (type(slot_state(way.stages, way.plan, s)),) for s in names}
        treedef, p_leaves, g_leaves, s_leaves = (
            way.treedef,
            way.p_leaves,
            way.g_leaves,
            way.s_leaves,
        )
        chosen = {i for idx in way.groups.values() for i in idx}
        # Counts, schedule states and the other leaves: the pure chain, with the kernel's
        # leaves masked out by None gradients (they pass through untouched).
        rest = treedef.unflatten([None if i in chosen else g for i, g in enumerate(g_leaves)])
        new_params, new_state = pure_step(tx, params, rest, state)
        out_p = treedef.flatten_up_to(new_params)
        out_s = {
            s: treedef.flatten_up_to(getattr(find_state(new_state, types[s], s), s)) for s in names
        }
        static, dynamic = split_args(way.stages)
        core = group_step(way.plan, way.stages, static)
        for idx in way.groups.values():  # one kernel configuration per group
            slot_lists = [[s_leaves[s][i] for i in idx] for s in names]
            p_sub, s_sub = core(
                dynamic, slot_lists, [p_leaves[i] for i in idx], [g_leaves[i] for i in idx]
            )
            for j, i in enumerate(idx):
                out_p[i] = p_sub[j]
                for k, s in enumerate(names):
                    out_s[s][i] = s_sub[k][j]
        for s in names:
            new_state = replace_field(new_state, types[s], s, treedef.unflatten(out_s[s]))
        return treedef.unflatten(out_p), new_state

    return FusedOptimizer(tx.init, tx.update, step)
