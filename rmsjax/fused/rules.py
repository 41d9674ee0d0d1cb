"""The two rules of one group of leaves: the kernel's and the pure-JAX chain's.

:func:`group_step` returns ``core(dynamic, slot_lists, p_list, g_list) -> (p_list, slot_lists)``
for the leaves of one group (:mod:`rmsjax.fused.selection`) of a step whose recorded stages
(:mod:`rmsjax.stages`) the :class:`~rmsjax.fused.plans.Plan` runs: ``slot_lists`` holds, per
slot of the plan, that moment's leaves of the group, and ``dynamic`` the stages' array-valued
arguments (traced hyperparameters, bias corrections). ``core`` binds one
:func:`rmsjax.fused.primitive.bind` of

* the *kernel* rule: the plan's flags (with the group's storage flags), its scalars from the
  stages' arguments as the kernel's scalar operand, the codec operands of 8-bit state, and the
  kernel calls of :func:`rmsjax._native.call.run`;
* the *pure* rule: each stage's own rule applied in turn (:attr:`rmsjax.stages.Stage.apply`,
  what its ``update`` applies), then ``apply_updates``: the optimizer's step over those leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsjax._native import call, codecs, table
from rmsjax.fused import primitive
from rmsjax.fused.plans import Plan
from rmsjax.fused.selection import kernel_view
from rmsjax.stages import Stage
from rmsjax.storage import is_stored
from rmsjax.updates import apply_updates

__all__ = ["group_step", "is_dynamic", "pure_step", "split_args"]


def pure_step(
    tx: optax.GradientTransformation, params: Any, grads: Any, state: Any
) -> tuple[Any, Any]:
    """``tx.update`` followed by :func:`rmsjax.apply_updates`: the step of the optax protocol."""
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


def is_dynamic(value: Any) -> bool:
    """Whether a stage argument is an array (an operand of the step's primitive) rather than a
    Python value (a constant of its rules)."""
    return isinstance(value, jax.Array | np.ndarray | np.generic) and not isinstance(value, bool)


def split_args(stages: Sequence[Stage]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The stages' arguments split into Python values and arrays, per stage."""
    static = [{k: v for k, v in s.args.items() if not is_dynamic(v)} for s in stages]
    dynamic = [{k: v for k, v in s.args.items() if is_dynamic(v)} for s in stages]
    return static, dynamic


def group_step(
    plan: Plan, stages: Sequence[Stage], static: Sequence[dict[str, Any]]
) -> Callable[..., Any]:
    """``core(dynamic, slot_lists, p_list, g_list) -> (p_list, slot_lists)`` for the leaves of
    one group (see the module docstring); ``static`` holds the stages' Python-valued
    arguments (:func:`split_args`)."""
    names = table.present_slots(plan.kind, plan.flags)
    appliers = [(s.moments, s.apply) for s in stages]

    def args_of(dynamic: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**s, **d} for s, d in zip(static, dynamic, strict=True)]

    def pure(dynamic: Any, slot_lists: Any, p_list: Any, g_list: Any) -> Any:
        moments = dict(zip(names, slot_lists, strict=True))
        updates = list(g_list)
        for (fields, apply), args in zip(appliers, args_of(dynamic), strict=True):
            updates, new = apply(updates, tuple(moments[f] for f in fields), p_list, args)
            moments.update(zip(fields, new, strict=True))
        return apply_updates(list(p_list), updates), [moments[s] for s in names]

    def kernel(dynamic: Any, slot_lists: Any, p_list: Any, g_list: Any) -> Any:
        args = args_of(dynamic)
        slots = dict(zip(names, slot_lists, strict=True))
        dtype = jnp.dtype(p_list[0].dtype)
        q8 = bool(names) and is_stored(slots[names[0]][0])
        flags = {
            **plan.flags,
            **plan.dtype_flags(args, dtype),
            "bf16": dtype == jnp.bfloat16,
            "q8": q8,
        }
        vector = call.visible_work(call.scalar_vector(plan.kind, plan.scalars(args, dtype)))
        codec_operands: list[Any] = []
        operands = slots
        if q8:
            # every leaf of the group has the same codecs (the group's key, see leaf_key)
            views = {
                s: [kernel_view(x, tuple(p.shape)) for x, p in zip(slots[s], p_list, strict=True)]
                for s in names
            }
            codec_operands = [jnp.asarray(codecs.operand(views[s][0].codec)) for s in names]
            operands = {s: [v.arrays for v in views[s]] for s in names}
        p_new, s_new = call.run(plan.kind, flags, vector, p_list, g_list, operands, codec_operands)
        if q8:  # the stored moments, holding the kernel's new arrays
            return p_new, [
                [old.with_arrays(tuple(new)) for old, new in zip(slots[s], s_new[s], strict=True)]
                for s in names
            ]
        return p_new, [s_new[s] for s in names]

    def core(dynamic: Any, slot_lists: Any, p_list: Any, g_list: Any) -> Any:
        # the results are the new parameters and slots: the same arrays as those operands
        args = (dynamic, slot_lists, p_list, g_list)
        return primitive.bind(kernel, pure, args, (p_list, slot_lists), f"{len(p_list)} leaves")

    return core
