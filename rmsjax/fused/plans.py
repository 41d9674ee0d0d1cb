"""How each optax-protocol optimizer runs on the native kernel: kind, flags, slots, scalars.

A *planner* takes the hyperparameters of one call of a protocol optimizer factory (its bound
arguments, defaults applied, e.g. those of ``rmsjax.rmsprop(1e-3, centered=True)``) and returns
a :class:`Plan`: the kernel kind and flags (names from :mod:`rmsjax._native.table`), the state
types each state slot is a field of, and how to compute the kernel's scalars, by name, from the
optimizer's state before the step. It returns ``None`` for a configuration the kernel does not
cover (AdamW with a weight-decay ``mask``), which then always runs the pure-JAX chain.

The scalars are computed with the same functions the transformations use: the moving-average
weights of :func:`rmsjax._numerics.ema`, the bias corrections of :func:`~rmsjax._numerics.debias`
at the count :func:`~rmsjax._numerics.increment` gives, and the step size (and weight decay)
by applying the chain's own ``scale_by_learning_rate`` (``add_decayed_weights``) to a unit
value; so the kernel and the pure-JAX path see the same float32 constants.

State arrays and counts are found in the optimizer's state by state TYPE and FIELD name (the
unique sub-state of one of the given rmsjax or optax state types that has that field), never by
position in the chain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rmsjax import optimizers as O
from rmsjax import transforms as T
from rmsjax._native import table
from rmsjax._numerics import debias, ema, increment

__all__ = [
    "PLANS",
    "Plan",
    "Planner",
    "StateLayoutError",
    "find_state",
    "planner_for",
    "replace_field",
    "state_types",
]


class StateLayoutError(ValueError):
    """The optimizer state does not hold exactly one sub-state with the field looked for."""


def state_types(*names: str) -> tuple[type, ...]:
    """The classes called ``names`` in :mod:`rmsjax.transforms` and in optax (either may lack
    some: rmsjax adopts optax's state types where it shares optax's transformations)."""
    found: list[type] = []
    for module in (T, optax):
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return tuple(found)


RMS_STATES = state_types(
    "ScaleByRmsState",
    "ScaleByRmsWithCountState",
    "ScaleByCenteredRmsState",
    "ScaleByRStdDevState",
    "ScaleByRStdDevWithCountState",
)
ADAM_STATES = state_types("ScaleByAdamState")
TRACE_STATES = state_types("TraceState")
SCHEDULE_STATES = state_types("ScaleByScheduleState")
DECAY_STATES = state_types("AddDecayedWeightsState", "WeightDecaySchedule")


def _matcher(types: tuple[type, ...], field: str) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, types) and field in getattr(x, "_fields", ())


def _locate(state: Any, types: tuple[type, ...], field: str) -> tuple[list[Any], Any, int]:
    is_match = _matcher(types, field)
    leaves, treedef = jax.tree.flatten(state, is_leaf=is_match)
    hits = [i for i, x in enumerate(leaves) if is_match(x)]
    if len(hits) != 1:
        names = sorted({t.__qualname__ for t in types})
        raise StateLayoutError(
            f"expected exactly one state of type {' / '.join(names)} with a field {field!r} in "
            f"the optimizer state, found {len(hits)}; pass the state made by this optimizer's "
            "`init` (or by its `update`/`step`)."
        )
    return leaves, treedef, hits[0]


def find_state(state: Any, types: tuple[type, ...], field: str) -> Any:
    """The unique sub-state of ``state`` that is an instance of ``types`` with field ``field``.

    Raises:
      StateLayoutError: there is no such sub-state, or more than one.
    """
    leaves, _, i = _locate(state, types, field)
    return leaves[i]


def replace_field(state: Any, types: tuple[type, ...], field: str, value: Any) -> Any:
    """``state`` with ``field`` of its unique sub-state of ``types`` set to ``value``."""
    leaves, treedef, i = _locate(state, types, field)
    leaves[i] = leaves[i]._replace(**{field: value})
    return jax.tree.unflatten(treedef, leaves)


def _no_flags(state: Any, dtype: Any) -> dict[str, bool]:
    del state, dtype
    return {}


class Plan(NamedTuple):
    """What the kernel needs to run one configuration of a protocol optimizer."""

    kind: table.Kind
    # the flags of ``kind`` that do not depend on the leaves (the storage flags ``bf16`` and
    # ``q8`` are set per group of leaves by the engine)
    flags: dict[str, bool]
    # state types holding each slot of ``kind`` (the slot's name is the field's name)
    slots: dict[str, tuple[type, ...]]
    # (the optimizer's state BEFORE the step, the parameters' dtype) -> every scalar of
    # ``kind``, by name, as the pure chain uses it for parameters of that dtype
    scalars: Callable[[Any, Any], dict[str, Any]]
    # (state, parameter dtype) -> flags that depend on the dtype of the parameters
    dtype_flags: Callable[[Any, Any], dict[str, bool]] = _no_flags


Planner = Callable[[Mapping[str, Any]], "Plan | None"]


def _ema_weights(decay: Any) -> tuple[Any, Any]:
    """The weights :func:`rmsjax._numerics.ema` gives the new sample and the old average."""
    one, zero = jnp.ones([], jnp.float32), jnp.zeros([], jnp.float32)
    return ema(one, zero, decay), ema(zero, one, decay)


def _step_size(learning_rate: Any, state: Any, dtype: Any) -> Any:
    """What ``scale_by_learning_rate(learning_rate)`` multiplies an update of ``dtype`` by at
    this step (for bfloat16 updates, the step size rounded to bfloat16, as the chain casts it)."""
    tx = T.scale_by_learning_rate(learning_rate)
    sub = find_state(state, SCHEDULE_STATES, "count") if callable(learning_rate) else tx.init(None)
    step_size, _ = tx.update(jnp.ones([], dtype), sub)
    return step_size


def _decay_coefficient(weight_decay: Any, state: Any) -> Any:
    """The coefficient ``add_decayed_weights(weight_decay)`` uses at this step, as its rule
    receives it (a Python number stays weakly typed)."""
    if callable(weight_decay):
        return weight_decay(find_state(state, DECAY_STATES, "count").count)
    return weight_decay


def _decay_in(dtype: Any, weight_decay: Any, state: Any) -> Any:
    """The dtype of the product ``weight_decay * p`` for parameters of ``dtype``."""
    return jnp.result_type(_decay_coefficient(weight_decay, state), dtype)


def _weight_decay(weight_decay: Any, state: Any, dtype: Any) -> Any:
    """What ``add_decayed_weights(weight_decay)`` multiplies the parameters by at this step,
    in the dtype of that product for parameters of ``dtype``."""
    tx = T.add_decayed_weights(weight_decay)
    sub = find_state(state, DECAY_STATES, "count") if callable(weight_decay) else tx.init(None)
    unit = _decay_in(dtype, weight_decay, state)
    coefficient, _ = tx.update(jnp.zeros([], unit), sub, jnp.ones([], unit))
    return coefficient


def rmsprop_plan(hp: Mapping[str, Any]) -> Plan:
    """:func:`rmsjax.rmsprop`: kind ``rms``."""
    has_momentum = hp["momentum"] is not None
    flags = {
        "centered": bool(hp["centered"]),
        "eps_in_sqrt": bool(hp["eps_in_sqrt"]),
        "momentum": has_momentum,
        "nesterov": bool(hp["nesterov"]) and has_momentum,
    }

    def scalars(state: Any, dtype: Any) -> dict[str, Any]:
        decay = hp["decay"]
        new, old = _ema_weights(decay)
        correction: Any = 1.0  # unbias(nu, None) is nu itself, as is nu / 1
        if hp["bias_correction"]:
            correction = debias(decay, increment(find_state(state, RMS_STATES, "count").count))
        return {
            "one_minus_decay": new,
            "decay": old,
            "eps": hp["eps"],
            "correction": correction,
            "step_size": _step_size(hp["learning_rate"], state, dtype),
            "momentum": hp["momentum"] if has_momentum else 0.0,
        }

    slots = {"mu": RMS_STATES, "nu": RMS_STATES, "trace": TRACE_STATES}
    return Plan(table.kind("rms"), flags, slots, scalars)


def _adam_plan(hp: Mapping[str, Any], *, weight_decay: bool) -> Plan:
    flags = {"nesterov": bool(hp["nesterov"]), "weight_decay": weight_decay}

    def scalars(state: Any, dtype: Any) -> dict[str, Any]:
        b1, b2 = hp["b1"], hp["b2"]
        count = increment(find_state(state, ADAM_STATES, "count").count)
        new1, old1 = _ema_weights(b1)
        new2, old2 = _ema_weights(b2)
        return {
            "one_minus_b1": new1,
            "b1": old1,
            "one_minus_b2": new2,
            "b2": old2,
            "eps": hp["eps"],
            "eps_root": hp["eps_root"],
            "c1": debias(b1, count),
            "c2": debias(b2, count),
            "c1_next": debias(b1, increment(count)),
            "step_size": _step_size(hp["learning_rate"], state, dtype),
            "weight_decay": (
                _weight_decay(hp["weight_decay"], state, dtype) if weight_decay else 0.0
            ),
        }

    def dtype_flags(state: Any, dtype: Any) -> dict[str, bool]:
        # bfloat16 parameters: with a Python-number weight decay, add_decayed_weights computes
        # in bfloat16 (two roundings); with a float32 array or schedule value, in float32.
        low = weight_decay and _decay_in(dtype, hp["weight_decay"], state) == jnp.bfloat16
        return {"decay_bf16": bool(low)}

    slots = {"mu": ADAM_STATES, "nu": ADAM_STATES}
    return Plan(table.kind("adam"), flags, slots, scalars, dtype_flags)


def adam_plan(hp: Mapping[str, Any]) -> Plan:
    """:func:`rmsjax.adam`: kind ``adam`` without weight decay."""
    return _adam_plan(hp, weight_decay=False)


def adamw_plan(hp: Mapping[str, Any]) -> Plan | None:
    """:func:`rmsjax.adamw`: kind ``adam`` with weight decay; none with a ``mask`` (the decay is
    then per leaf, in an ``optax.masked`` state)."""
    if hp["mask"] is not None:
        return None
    return _adam_plan(hp, weight_decay=True)


def sgd_plan(hp: Mapping[str, Any]) -> Plan:
    """:func:`rmsjax.sgd`: kind ``sgd``."""
    has_momentum = hp["momentum"] is not None
    flags = {"momentum": has_momentum, "nesterov": bool(hp["nesterov"]) and has_momentum}

    def scalars(state: Any, dtype: Any) -> dict[str, Any]:
        return {
            "step_size": _step_size(hp["learning_rate"], state, dtype),
            "momentum": hp["momentum"] if has_momentum else 0.0,
        }

    return Plan(table.kind("sgd"), flags, {"trace": TRACE_STATES}, scalars)


# The protocol optimizers the kernel runs, and their planners.
PLANS: dict[Callable[..., Any], Planner] = {
    O.rmsprop: rmsprop_plan,
    O.adam: adam_plan,
    O.adamw: adamw_plan,
    O.sgd: sgd_plan,
}


def planner_for(factory: Callable[..., Any]) -> Planner:
    """The planner of a protocol optimizer factory; ``TypeError`` naming the supported ones."""
    try:
        return PLANS[factory]
    except (KeyError, TypeError):
        known = ", ".join(f"rmsjax.{f.__name__}" for f in PLANS)
        raise TypeError(
            f"the native kernel has no plan for {getattr(factory, '__qualname__', factory)!r}; "
            f"rmsjax.fused.fuse takes one of {known}."
        ) from None
