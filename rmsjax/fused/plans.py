"""Which kernel call runs a recorded update: the stages of a chain matched to a kernel kind.

:func:`plan` takes the :class:`~rmsjax.stages.Stage` list that an optimizer's ``update``
recorded (see :mod:`rmsjax.stages`: any composition of rmsjax transformations records the rules
it applies, in order) and returns the :class:`Plan` of the kernel kind that applies the same
rules in the same order, or the reason why no kind does. Nothing here knows how the chain was
built: ``rmsjax.rmsprop``, ``optax.chain(rmsjax.scale_by_rms(), rmsjax.scale(-0.1))`` and
``rmsjax.compat.keras.rmsprop()`` record the same stages and get the same plan.

The kinds and the stage sequences they run (``[x]``: optional):

* ``rms``: ``rms | centered_rms, scale, [trace]`` (the learning rate inside the momentum
  buffer: optax's, Keras' and TF1's RMSProp);
* ``adam``: ``adam, [add_decayed_weights], scale`` (optax's Adam and AdamW; PyTorch's Adam);
* ``sgd``: ``[trace], scale``.

The kernel's scalars come from the stages' own arguments (the values their rules take at this
step), converted as the pure chain converts them for parameters of a given dtype; so the kernel
and the pure path see the same float32 constants.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._native import table
from rmsjax._numerics import cast_to, ema
from rmsjax.stages import Stage

__all__ = ["Plan", "StateLayoutError", "find_state", "plan", "replace_field"]

Args = Sequence[Mapping[str, Any]]


class Plan(NamedTuple):
    """The kernel call that applies a list of stages.

    Attributes:
      kind: the kernel kind (a row of :mod:`rmsjax._native.table`).
      flags: its flags that do not depend on the leaves (the storage flags ``bf16`` and
        ``q8`` are set per group of leaves by the engine).
      slots: for each state slot of ``kind`` present with ``flags``, the index of the stage
        whose moment of that name it is.
      scalars: ``(args, dtype) -> {scalar name: value}``: every scalar of ``kind`` from the
        stages' arguments (``args[i]`` those of stage ``i``, possibly traced) for parameters of
        ``dtype``.
      dtype_flags: ``(args, dtype) -> flags`` that depend on the parameters' dtype.
    """

    kind: table.Kind
    flags: dict[str, bool]
    slots: dict[str, int]
    scalars: Callable[[Args, Any], dict[str, Any]]
    dtype_flags: Callable[[Args, Any], dict[str, bool]]


class StateLayoutError(ValueError):
    """The optimizer state does not hold exactly one sub-state with the field looked for."""


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


def _ema_weights(decay: Any) -> tuple[Any, Any]:
    """The weights :func:`rmsjax._numerics.ema` gives the new sample and the old average."""
    one, zero = jnp.ones([], jnp.float32), jnp.zeros([], jnp.float32)
    return ema(one, zero, decay), ema(zero, one, decay)


def _step_size(args: Mapping[str, Any], dtype: Any) -> Any:
    """What the ``scale`` stage multiplies an update of ``dtype`` by (its rule casts the step
    size to the update's dtype: for bfloat16 updates, rounded to bfloat16)."""
    step_size = args["step_size"]
    if jnp.iscomplexobj(step_size):
        step_size = jnp.real(step_size)
    return jnp.asarray(step_size, dtype=dtype)


def _decay_dtype(args: Mapping[str, Any], dtype: Any) -> Any:
    """The dtype of ``coefficient * p`` in the ``add_decayed_weights`` rule for parameters of
    ``dtype`` (a Python-number coefficient is weakly typed: bfloat16 for bfloat16 params)."""
    return jnp.result_type(args["coefficient"], dtype)


def _no_flags(args: Args, dtype: Any) -> dict[str, bool]:
    del args, dtype
    return {}


def _rms(stages: Sequence[Stage]) -> Plan:
    centered = stages[0].name == "centered_rms"
    momentum = len(stages) == 3
    flags = {
        "centered": centered,
        "eps_in_sqrt": bool(stages[0].args["eps_in_sqrt"]),
        "momentum": momentum,
        "nesterov": momentum and bool(stages[2].args["nesterov"]),
    }

    def scalars(args: Args, dtype: Any) -> dict[str, Any]:
        rms, scale = args[0], args[1]
        new, old = _ema_weights(rms["decay"])
        correction = rms["correction"]
        return {
            "one_minus_decay": new,
            "decay": old,
            "eps": rms["eps"],
            "correction": 1.0 if correction is None else correction,  # nu / 1 is nu
            "step_size": _step_size(scale, dtype),
            "momentum": args[2]["decay"] if momentum else 0.0,
        }

    slots = {"nu": 0, **({"mu": 0} if centered else {}), **({"trace": 2} if momentum else {})}
    return Plan(table.kind("rms"), flags, slots, scalars, _no_flags)


def _adam(stages: Sequence[Stage]) -> Plan:
    decay = len(stages) == 3
    flags = {"nesterov": bool(stages[0].args.get("nesterov", False)), "weight_decay": decay}

    def scalars(args: Args, dtype: Any) -> dict[str, Any]:
        adam, scale = args[0], args[-1]
        new1, old1 = _ema_weights(adam["b1"])
        new2, old2 = _ema_weights(adam["b2"])
        weight_decay: Any = 0.0
        if decay:
            weight_decay = cast_to(args[1]["coefficient"], _decay_dtype(args[1], dtype))
        return {
            "one_minus_b1": new1,
            "b1": old1,
            "one_minus_b2": new2,
            "b2": old2,
            "eps": adam["eps"],
            "eps_root": adam["eps_root"],
            "c1": adam["c1"],
            "c2": adam["c2"],
            "c1_next": adam.get("c1_next", 1.0),  # only read with nesterov
            "step_size": _step_size(scale, dtype),
            "weight_decay": weight_decay,
        }

    def dtype_flags(args: Args, dtype: Any) -> dict[str, bool]:
        # bfloat16 parameters: with a Python-number weight decay the product is a bfloat16
        # multiplication (two roundings); with a float32 array or schedule value, float32.
        return {"decay_bf16": decay and _decay_dtype(args[1], dtype) == jnp.bfloat16}

    return Plan(table.kind("adam"), flags, {"mu": 0, "nu": 0}, scalars, dtype_flags)


def _sgd(stages: Sequence[Stage]) -> Plan:
    momentum = len(stages) == 2
    flags = {"momentum": momentum, "nesterov": momentum and bool(stages[0].args["nesterov"])}

    def scalars(args: Args, dtype: Any) -> dict[str, Any]:
        return {
            "step_size": _step_size(args[-1], dtype),
            "momentum": args[0]["decay"] if momentum else 0.0,
        }

    return Plan(table.kind("sgd"), flags, {"trace": 0} if momentum else {}, scalars, _no_flags)


# Each kernel kind: the stage sequences it runs (stage names, in order), and its planner.
_PATTERNS: tuple[tuple[tuple[str, ...], Callable[[Sequence[Stage]], Plan]], ...] = (
    (("rms", "scale"), _rms),
    (("rms", "scale", "trace"), _rms),
    (("centered_rms", "scale"), _rms),
    (("centered_rms", "scale", "trace"), _rms),
    (("adam", "scale"), _adam),
    (("adam", "add_decayed_weights", "scale"), _adam),
    (("scale",), _sgd),
    (("trace", "scale"), _sgd),
)


def plan(stages: Sequence[Stage]) -> Plan | str:
    """The kernel call that applies ``stages`` in order, or why there is none."""
    names = tuple(s.name for s in stages)
    for pattern, planner in _PATTERNS:
        if names == pattern:
            return planner(stages)
    return (
        f"the chain applies the rules {list(names)}, which no kernel kind runs in that order "
        f"(the kernel runs {[list(p) for p, _ in _PATTERNS]})"
    )
