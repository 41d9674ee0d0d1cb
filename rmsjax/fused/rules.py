"""The two rules of one group of leaves, from a :class:`~rmsjax.fused.plans.Plan`.

:func:`group_step` returns ``core(hp_dyn, sub_state, p_list, g_list) -> (p_list, slot_lists)``
for the leaves of one group (:mod:`rmsjax.fused.selection`): ``sub_state`` is the optimizer
state whose slot fields are lists of those leaves. ``core`` binds one
:func:`rmsjax.fused.primitive.bind` of

* the *kernel* rule: the plan's flags (with the group's storage flags), its scalars as the
  kernel's scalar operand, the codec operands of 8-bit state, and the kernel calls of
  :func:`rmsjax._native.call.run`;
* the *pure* rule: the protocol optimizer rebuilt from the (possibly traced) hyperparameters,
  ``update`` + ``apply_updates`` over the same leaves (:func:`pure_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from rmsjax._native import call, codecs, table
from rmsjax.fused import primitive
from rmsjax.fused.plans import Plan, Planner, find_state
from rmsjax.fused.selection import kernel_view
from rmsjax.storage import is_stored
from rmsjax.updates import apply_updates

__all__ = ["group_step", "pure_step"]


def pure_step(
    tx: optax.GradientTransformation, params: Any, grads: Any, state: Any
) -> tuple[Any, Any]:
    """``tx.update`` followed by :func:`rmsjax.apply_updates`: the step of the optax protocol."""
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


def group_step(
    factory: Callable[..., optax.GradientTransformation],
    planner: Planner,
    hp_static: dict[str, Any],
) -> Callable[..., Any]:
    """``core(hp_dyn, sub_state, p_list, g_list) -> (p_list, slot_lists)`` for the leaves of
    one group (see the module docstring); ``hp_static`` and ``hp_dyn`` are the factory's
    hyperparameters, concrete and dynamic."""

    def plan_of(hp_dyn: Any) -> Plan:
        plan = planner({**hp_static, **hp_dyn})
        assert plan is not None  # a configuration with no plan never reaches the core
        return plan

    def pure(hp_dyn: Any, sub_state: Any, p_list: Any, g_list: Any) -> Any:
        plan = plan_of(hp_dyn)
        tx = factory(**hp_static, **hp_dyn)
        p_new, s_new = pure_step(tx, p_list, g_list, sub_state)
        names = table.present_slots(plan.kind, plan.flags)
        return p_new, [getattr(find_state(s_new, plan.slots[s], s), s) for s in names]

    def kernel(hp_dyn: Any, sub_state: Any, p_list: Any, g_list: Any) -> Any:
        plan = plan_of(hp_dyn)
        names = table.present_slots(plan.kind, plan.flags)
        slot_lists = {s: getattr(find_state(sub_state, plan.slots[s], s), s) for s in names}
        dtype = jnp.dtype(p_list[0].dtype)
        q8 = bool(names) and is_stored(slot_lists[names[0]][0])
        flags = {
            **plan.flags,
            **plan.dtype_flags(sub_state, dtype),
            "bf16": dtype == jnp.bfloat16,
            "q8": q8,
        }
        vector = call.visible_work(call.scalar_vector(plan.kind, plan.scalars(sub_state, dtype)))
        codec_operands: list[Any] = []
        operands = slot_lists
        if q8:
            # every leaf of the group has the same codecs (the group's key, see leaf_key)
            views = {
                s: [
                    kernel_view(x, tuple(p.shape))
                    for x, p in zip(slot_lists[s], p_list, strict=True)
                ]
                for s in names
            }
            codec_operands = [jnp.asarray(codecs.operand(views[s][0].codec)) for s in names]
            operands = {s: [v.arrays for v in views[s]] for s in names}
        p_new, s_new = call.run(plan.kind, flags, vector, p_list, g_list, operands, codec_operands)
        if q8:  # the stored moments, holding the kernel's new arrays
            return p_new, [
                [
                    old.with_arrays(tuple(new))
                    for old, new in zip(slot_lists[s], s_new[s], strict=True)
                ]
                for s in names
            ]
        return p_new, [s_new[s] for s in names]

    def core(hp_dyn: Any, sub_state: Any, p_list: Any, g_list: Any) -> Any:
        plan = plan_of(hp_dyn)
        names = table.present_slots(plan.kind, plan.flags)
        # the results are the new parameters and slots: the same arrays as those operands
        slots = [getattr(find_state(sub_state, plan.slots[s], s), s) for s in names]
        args = (hp_dyn, sub_state, p_list, g_list)
        return primitive.bind(kernel, pure, args, (p_list, slots), f"{len(p_list)} leaves")

    return core
