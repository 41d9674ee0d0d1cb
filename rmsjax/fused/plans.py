"""Which kernel call runs a recorded update: the stages of a chain matched to a kernel kind.

:func:`plan` takes the :class:`~rmsjax.stages.Stage` list that an optimizer's ``update``
recorded (see :mod:`rmsjax.stages`: any composition of rmsjax transformations records the rules
it applies, in order) and returns the :class:`Plan` of the kernel kind that applies the same
rules in the same order, or the reason why no kind does. Nothing here knows how the chain was
built: ``rmsjax.rmsprop``, ``optax.chain(rmsjax.scale_by_rms(), rmsjax.scale(-0.1))`` and
``rmsjax.compat.keras.rmsprop()`` record the same stages and get the same plan.

The stage sequences the kernel runs (``[x]``: optional; ``a | b``: either), each a rule with
the linear terms the framework presets put around it:

  ``[maximize] [coupled decay]`` *core* ``[decoupled decay]``

with at most one decay term (and none of these terms with Nesterov momentum: the operand table's
exclusive flags), where ``maximize`` is a ``scale`` by the number -1 (or 1: a no-op),
``coupled decay`` an ``add_decayed_weights`` (before the rule: PyTorch's ``weight_decay``),
``decoupled decay`` a ``decoupled_weight_decay`` (last: PyTorch's AdamW, Keras' ``weight_decay``),
and the cores of the kinds are

* ``rms``: ``rms | centered_rms``, then ``scale``, ``scale, trace`` (the learning rate inside
  the momentum buffer: optax's, Keras' and TF1's RMSProp) or ``trace, scale`` (after it:
  PyTorch's RMSprop);
* ``adam``: ``adam | adam_eps_hat``, ``[add_decayed_weights]``, ``scale`` (optax's Adam and
  AdamW, PyTorch's Adam and AdamW, Keras' Adam and AdamW: ``adam_eps_hat``);
* ``sgd``: ``scale``, ``trace, scale`` (optax's and PyTorch's SGD) or ``scale, trace`` (Keras').

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


def _is_sign(stage: Stage) -> bool:
    """A ``scale`` stage by the Python number -1 or 1: ``maximize``'s sign flip (or a no-op),
    exact in every dtype, which the kernel applies to the gradient first."""
    step = stage.args.get("step_size")
    return (
        isinstance(step, int | float) and not isinstance(step, bool) and float(step) in (-1.0, 1.0)
    )


class _Shape(NamedTuple):
    """A recorded chain cut into its parts (indices into the stage list; None: absent)."""

    kind: str
    sign: int | None  # the leading scale(+-1)
    decay: int | None  # the decay stage
    decay_flag: str | None  # its place: coupled_decay, weight_decay or decoupled_decay
    rule: int | None  # the rule (rms, centered_rms, adam, adam_eps_hat)
    scale: int  # the step size
    trace: int | None  # the momentum buffer


# The cores of the kinds: the stage names in order ("rule" stands for the kind's rules).
_RULES = {"rms": ("rms", "centered_rms"), "adam": ("adam", "adam_eps_hat"), "sgd": ()}
_CORES: dict[str, tuple[tuple[str, ...], ...]] = {
    "rms": (("rule", "scale"), ("rule", "scale", "trace"), ("rule", "trace", "scale")),
    "adam": (("rule", "scale"), ("rule", "add_decayed_weights", "scale")),
    "sgd": (("scale",), ("scale", "trace"), ("trace", "scale")),
}


def _shapes() -> list[tuple[str, tuple[str, ...]]]:
    """Every sequence the kernel runs, as (kind, tags): the tags are stage names, "rule",
    "sign" (a scale by +-1), "coupled" (add_decayed_weights before the rule) and
    "decoupled"."""
    out = []
    for kind, cores in _CORES.items():
        for core in cores:
            for prefix in ((), ("sign",), ("coupled",), ("sign", "coupled")):
                for suffix in ((), ("decoupled",)):
                    tags = (*prefix, *core, *suffix)
                    decays = sum(t in ("coupled", "add_decayed_weights", "decoupled") for t in tags)
                    if decays <= 1:
                        out.append((kind, tags))
    return out


_SHAPES = _shapes()
_STAGE_OF_TAG = {
    "sign": "scale",
    "coupled": "add_decayed_weights",
    "decoupled": "decoupled_weight_decay",
}


def _shape(stages: Sequence[Stage]) -> _Shape | None:
    """The first of :data:`_SHAPES` that ``stages`` match, cut into its parts."""
    for kind, tags in _SHAPES:
        if len(tags) != len(stages):
            continue
        ok = True
        for tag, stage in zip(tags, stages, strict=True):
            if tag == "rule":
                ok = stage.name in _RULES[kind]
            else:
                ok = stage.name == _STAGE_OF_TAG.get(tag, tag)
                ok = ok and (tag != "sign" or _is_sign(stage))
            if not ok:
                break
        if not ok:
            continue
        at = {tag: i for i, tag in enumerate(tags)}
        decay = next((t for t in ("coupled", "add_decayed_weights", "decoupled") if t in at), None)
        flag = {
            "coupled": "coupled_decay",
            "add_decayed_weights": "weight_decay",
            "decoupled": "decoupled_decay",
            None: None,
        }[decay]
        return _Shape(
            kind,
            at.get("sign"),
            None if decay is None else at[decay],
            flag,
            at.get("rule"),
            at["scale"],
            at.get("trace"),
        )
    return None


def _decay_scalar(shape: _Shape, args: Args, dtype: Any) -> Any:
    """The decay term's coefficient as the rule multiplies it (0 without a decay term)."""
    if shape.decay is None:
        return 0.0
    return cast_to(args[shape.decay]["coefficient"], _decay_dtype(args[shape.decay], dtype))


def _term_flags(shape: _Shape, stages: Sequence[Stage]) -> dict[str, bool]:
    flags = {"maximize": shape.sign is not None and float(stages[shape.sign].args["step_size"]) < 0}
    if shape.decay_flag is not None:
        flags[shape.decay_flag] = True
    return flags


def _decay_flags(shape: _Shape) -> Callable[[Args, Any], dict[str, bool]]:
    def dtype_flags(args: Args, dtype: Any) -> dict[str, bool]:
        # bfloat16 parameters: with a Python-number coefficient the decay product is a bfloat16
        # multiplication (two roundings); with a float32 array or schedule value, float32.
        weak = shape.decay is not None and _decay_dtype(args[shape.decay], dtype) == jnp.bfloat16
        return {"decay_bf16": weak}

    return dtype_flags


def _buffer_flags(shape: _Shape, stages: Sequence[Stage]) -> dict[str, bool]:
    momentum = shape.trace is not None
    return {
        "momentum": momentum,
        "nesterov": momentum and bool(stages[shape.trace].args["nesterov"]),  # type: ignore[index]
        "scale_first": momentum and shape.scale < shape.trace,  # type: ignore[operator]
    }


def _rms(shape: _Shape, stages: Sequence[Stage]) -> Plan:
    rule = stages[shape.rule]  # type: ignore[index]
    centered = rule.name == "centered_rms"
    flags = {
        "centered": centered,
        "eps_in_sqrt": bool(rule.args["eps_in_sqrt"]),
        **_buffer_flags(shape, stages),
        **_term_flags(shape, stages),
    }

    def scalars(args: Args, dtype: Any) -> dict[str, Any]:
        rms = args[shape.rule]  # type: ignore[index]
        new, old = _ema_weights(rms["decay"])
        correction = rms["correction"]
        return {
            "one_minus_decay": new,
            "decay": old,
            "eps": rms["eps"],
            "correction": 1.0 if correction is None else correction,  # nu / 1 is nu
            "step_size": _step_size(args[shape.scale], dtype),
            "momentum": 0.0 if shape.trace is None else args[shape.trace]["decay"],
            "weight_decay": _decay_scalar(shape, args, dtype),
        }

    slots = {"nu": shape.rule, **({"mu": shape.rule} if centered else {})}
    if shape.trace is not None:
        slots["trace"] = shape.trace
    return Plan(table.kind("rms"), flags, slots, scalars, _decay_flags(shape))  # type: ignore[arg-type]


def _adam(shape: _Shape, stages: Sequence[Stage]) -> Plan:
    rule = stages[shape.rule]  # type: ignore[index]
    eps_hat = rule.name == "adam_eps_hat"
    flags = {
        "nesterov": bool(rule.args.get("nesterov", False)),
        "eps_hat": eps_hat,
        **_term_flags(shape, stages),
    }

    def scalars(args: Args, dtype: Any) -> dict[str, Any]:
        adam = args[shape.rule]  # type: ignore[index]
        new1, old1 = _ema_weights(adam["b1"])
        new2, old2 = _ema_weights(adam["b2"])
        return {
            "one_minus_b1": new1,
            "b1": old1,
            "one_minus_b2": new2,
            "b2": old2,
            "eps": adam["eps"],
            # the epsilon-hat form reads only alpha (and the others not at all)
            "eps_root": adam.get("eps_root", 0.0),
            "c1": adam.get("c1", 1.0),
            "c2": adam.get("c2", 1.0),
            "c1_next": adam.get("c1_next", 1.0),  # only read with nesterov
            "alpha": adam.get("alpha", 1.0),  # only read with eps_hat
            "step_size": _step_size(args[shape.scale], dtype),
            "weight_decay": _decay_scalar(shape, args, dtype),
        }

    slots = {"mu": shape.rule, "nu": shape.rule}
    return Plan(table.kind("adam"), flags, slots, scalars, _decay_flags(shape))  # type: ignore[arg-type]


def _sgd(shape: _Shape, stages: Sequence[Stage]) -> Plan:
    flags = {**_buffer_flags(shape, stages), **_term_flags(shape, stages)}

    def scalars(args: Args, dtype: Any) -> dict[str, Any]:
        return {
            "step_size": _step_size(args[shape.scale], dtype),
            "momentum": 0.0 if shape.trace is None else args[shape.trace]["decay"],
            "weight_decay": _decay_scalar(shape, args, dtype),
        }

    slots = {} if shape.trace is None else {"trace": shape.trace}
    return Plan(table.kind("sgd"), flags, slots, scalars, _decay_flags(shape))


_PLANNERS: dict[str, Callable[[_Shape, Sequence[Stage]], Plan]] = {
    "rms": _rms,
    "adam": _adam,
    "sgd": _sgd,
}


def plan(stages: Sequence[Stage]) -> Plan | str:
    """The kernel call that applies ``stages`` in order, or why there is none."""
    shape = _shape(stages)
    if shape is not None:
        found = _PLANNERS[shape.kind](shape, stages)
        try:  # the table's exclusive flags (e.g. Nesterov momentum with the terms around a rule)
            table.complete_flags(found.kind, found.flags)
        except ValueError as err:
            return f"the kernel has no loop for this chain: {err}"
        return found
    names = [s.name for s in stages]
    return (
        f"the chain applies the rules {names}, which no kernel kind runs in that order (the "
        "kernel runs [scale(-1)] [add_decayed_weights] followed by rms|centered_rms with "
        "scale and [trace] in either order, adam|adam_eps_hat [add_decayed_weights] scale, "
        "or scale with [trace] in either order, then [decoupled_weight_decay]; at most one "
        "decay term)"
    )
