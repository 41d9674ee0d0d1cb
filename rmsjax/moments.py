r"""The one builder of transformations that keep per-parameter state: :func:`moment_transform`.

A transformation states what is particular to it: its rule for ONE array, the moments it keeps
(:class:`Moment`: name, sign, initial value, storage), its state class (optax's own where
rmsjax shares optax's name), and the hyperparameters its rule needs at each step
(``step_args``). The builder wires the rest, identically for every transformation:

* ``init``: each moment built by :func:`rmsjax.tree.state_like` in its storage (float dtypes,
  :func:`rmsjax.quantized`, :func:`rmsjax.stochastic_rounding`), a count of 0 when the state
  has a ``count`` field, an absent moment stored as ``()``;
* ``update``: the state's type checked (:func:`rmsjax.tree.check_state`), ``step_args``
  evaluated at the count before the step, the rule lifted over the tree by
  :func:`rmsjax.tree.map_rule` (which decodes and encodes stored moments), the count advanced
  (saturating), the new state built; a state class without fields (``optax.EmptyState``) makes
  a stateless transformation, which ignores the state it is given, as optax's do.

The storage arguments of every transformation are documented by one sentence,
:data:`STORAGE_CHOICES`, which :func:`document_storage` puts where a docstring says
``{storage}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import optax

from rmsjax import stages
from rmsjax._numerics import increment, zero_count
from rmsjax.storage import check_storage
from rmsjax.tree import check_state, map_rule, state_like

__all__ = ["STORAGE_CHOICES", "Moment", "document_storage", "moment_transform"]

STORAGE_CHOICES = (
    "``None`` (the default dtype policy: the parameter's float dtype, float32 for "
    "float16/bfloat16 parameters unless ``promote_half=False``), a float dtype, "
    ":func:`rmsjax.quantized` (8 or 4 bits) or :func:`rmsjax.stochastic_rounding` (see "
    ":mod:`rmsjax.storage`)"
)
"""What a moment's storage argument (``mu_dtype``, ``nu_dtype``, ...) takes, in the words of
every docstring."""

F = TypeVar("F", bound=Callable[..., Any])


def document_storage(fn: F) -> F:
    """Put :data:`STORAGE_CHOICES` where ``fn``'s docstring says ``{storage}`` (a decorator)."""
    if fn.__doc__:
        fn.__doc__ = fn.__doc__.replace("{storage}", STORAGE_CHOICES)
    return fn


class Moment(NamedTuple):
    """One per-parameter state array of a transformation (a field of its state class).

    Attributes:
      name: the state field (``"nu"``); also keeps the random streams of the moments of one
        parameter apart (stochastic rounding).
      storage: the user's storage choice for it (see :data:`STORAGE_CHOICES`).
      argument: the name of the argument that took ``storage`` (for its error message); by
        default ``name + "_dtype"``.
      fill: the initial value (a number or a traced value).
      real: a real moment of complex parameters (a second moment: :math:`|g|^2`).
      signed: whether the moment can be negative (it picks a quantization map); by default
        ``not real``.
      present: ``False`` leaves the moment out: its field holds ``()`` and the rule does not
        get it (AMSGrad's maximum when ``amsgrad=False``).
      both_parts: for complex parameters, fill the real and the imaginary part with ``fill``
        (a moment that treats the two parts as separate reals, as Rprop's step sizes).
    """

    name: str
    storage: Any = None
    argument: str | None = None
    fill: Any = 0.0
    real: bool = False
    signed: bool | None = None
    present: bool = True
    both_parts: bool = False


def _no_args(count: Any) -> dict[str, Any]:
    del count
    return {}


def moment_transform(
    name: str,
    rule: Callable[..., tuple[Any, ...]],
    moments: Sequence[Moment] = (),
    *,
    state: type,
    step_args: Callable[[Any], Mapping[str, Any]] = _no_args,
    promote_half: bool = True,
    with_params: bool = False,
    stage: str | None = None,
) -> optax.GradientTransformation:
    """An optax transformation that applies ``rule`` leaf by leaf and keeps ``moments``.

    Args:
      name: the transformation's public name (in error messages).
      rule: ``rule(g, *moments, [param], **step_args(count)) -> (update, *new_moments)`` for
        one array, over the present moments in the order given.
      moments: the per-parameter state arrays; each is a field of ``state``.
      state: the state class, a ``NamedTuple`` whose fields are the moments' names and,
        optionally, ``count`` (int32, the number of updates done: 0 at ``init``, then
        advanced once per ``update``, saturating). A class without fields makes a stateless
        transformation.
      step_args: ``count -> keyword arguments of the rule`` at this step, from the count
        BEFORE the step (``None`` when ``state`` has no count): bias corrections, schedules.
      promote_half: moments of float16/bfloat16 parameters in float32 (the default dtype
        policy, see :func:`rmsjax.tree.state_dtype`).
      with_params: the rule also takes the parameter leaf; ``update`` then requires
        ``params`` (``ValueError`` naming the transformation otherwise).
      stage: the name under which the fused step knows this rule (see :mod:`rmsjax.stages`),
        or ``None`` for a rule the native kernel does not have.
    """
    for m in moments:
        check_storage(m.argument or f"{m.name}_dtype", m.storage)
    fields = tuple(getattr(state, "_fields", ()))
    counted = "count" in fields
    present = [m for m in moments if m.present]
    names = {m.name for m in moments}
    if set(fields) - {"count"} != names:
        raise TypeError(f"{state.__name__} has the fields {fields}, not count and {names}")

    def build(params: Any, m: Moment) -> Any:
        if not m.present:
            return ()
        return state_like(
            params,
            m.fill,
            dtype=m.storage,
            promote_half=promote_half,
            real=m.real,
            signed=m.signed,
            name=m.name,
            both_parts=m.both_parts,
        )

    def init_fn(params: Any) -> Any:
        values = {m.name: build(params, m) for m in moments}
        return state(**values, **({"count": zero_count()} if counted else {}))

    def apply(
        updates: Any, moments_: tuple[Any, ...], params: Any, args: Mapping[str, Any]
    ) -> tuple[Any, tuple[Any, ...]]:
        extras = (params,) if with_params else ()
        return map_rule(lambda *a: rule(*a, **args), updates, moments_, extras)

    def update_fn(updates: Any, state_: Any, params: Any = None) -> tuple[Any, Any]:
        if fields:  # (a stateless transformation ignores its state, as optax's do)
            check_state(state_, state, name)
        if with_params and params is None:
            raise ValueError(f"{name} needs the parameters: call `update(grads, state, params)`.")
        kwargs = step_args(state_.count if counted else None)
        stored = tuple(getattr(state_, m.name) for m in present)
        moment_names = tuple(m.name for m in present)
        if stage is not None and stages.record(
            stages.Stage(stage, kwargs, state_, moment_names, updates, apply)
        ):
            return updates, state_
        out, new = apply(updates, stored, params, kwargs)
        if not fields:
            return out, state_
        values: dict[str, Any] = {m.name: () for m in moments}
        values.update({m.name: x for m, x in zip(present, new, strict=True)})
        if counted:
            values["count"] = increment(state_.count)
        return out, state(**values)

    return optax.GradientTransformation(init_fn, update_fn)
